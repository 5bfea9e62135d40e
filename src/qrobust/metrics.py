"""Batched prediction and accuracy for any classifier (float, fake-quant twin or int8)."""

from __future__ import annotations

import torch
from torch import nn


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through (as float32)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (uint8 or float in [0, 1]) in eval mode, batch by batch, on CPU."""
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(x), batch_size):
            xb = as_float_images(x[i:i + batch_size].to(device))
            out.append(model(xb.contiguous(memory_format=torch.channels_last)).float().cpu())
        return torch.cat(out) if out else torch.empty(0)
    finally:
        model.train(was_training)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device=None) -> torch.Tensor:
    """Top-1 predictions (eval mode)."""
    return predict_logits(model, x, batch_size, device).argmax(1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512, device=None) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((predict(model, x, batch_size, device) == y.cpu()).float().mean())


def tie_rate(logits: torch.Tensor) -> float:
    """Share of rows whose top-1 logit is tied (two or more classes share the maximum).

    A tied row's prediction is decided by ``argmax`` picking the lowest class index, not by the model:
    quantized logits with few levels tie often (a 2-bit logit layer ties on about half of the images)."""
    if logits.dim() != 2 or len(logits) == 0:
        raise ValueError(f"tie_rate needs a non-empty (N, classes) tensor, got shape {tuple(logits.shape)}")
    top = logits.max(dim=1, keepdim=True).values
    return float(((logits == top).sum(dim=1) > 1).float().mean())


def accuracy_and_tie_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
                          device=None) -> dict:
    """``{"acc", "tie_rate"}`` of ``model`` on ``(x, y)`` from one pass (eval mode, mode restored)."""
    logits = predict_logits(model, x, batch_size, device)
    return {"acc": float((logits.argmax(1) == y.cpu()).float().mean()), "tie_rate": tie_rate(logits)}
