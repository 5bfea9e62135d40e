"""Batched prediction and accuracy for any classifier (float, fake-quant twin, int8 or randomised).

One input rule for every function here: ``x`` is a non-empty batch of images, either ``uint8`` in
[0, 255] (divided by 255 here) or floating point in [0, 1] (normalisation lives inside the model);
anything else is a :class:`~qrobust.errors.ConfigError`. Labels ``y`` are one integer per image.
Forwards run in eval mode without gradients, batch by batch on the model's device; the model's
train/eval flags (every submodule's) are restored afterwards (:func:`qrobust.utils.eval_mode`).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.utils import eval_mode, module_device


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through (as float32)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def check_images(x: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless ``x`` is a non-empty uint8 batch or a float batch in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"x must be a non-empty batch of images (N, C, H, W), got {shape}")
    if x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise ConfigError(f"x must be uint8 images in [0, 255] or float images in [0, 1], got dtype {x.dtype}")
    low, high = float(x.min()), float(x.max())
    if not (low >= 0.0 and high <= 1.0):  # also catches NaN
        raise ConfigError(
            f"float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; pass uint8 images or "
            "divide by 255, and put normalisation (mean/std) inside the model's forward"
        )


def _check_batch_size(batch_size: object) -> int:
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (see the module's input rule) in eval mode, batch by batch; on CPU.

    ``device`` (default: the model's) is where the forwards run; the model itself is not moved.
    Image batches (4-D) are passed in channels-last memory format.
    """
    check_images(x)
    batch_size = _check_batch_size(batch_size)
    device = device or module_device(model)
    with eval_mode(model):
        out = []
        for i in range(0, len(x), batch_size):
            xb = as_float_images(x[i:i + batch_size].to(device))
            if xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(model(xb).float().cpu())
    return torch.cat(out)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device=None) -> torch.Tensor:
    """Top-1 predictions (eval mode); ties go to the lowest class index (``argmax``)."""
    return predict_logits(model, x, batch_size, device).argmax(1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             device: torch.device | str | None = None, *, draws: int = 1) -> float:
    """Top-1 accuracy in [0, 1]: the share of ``x`` (see the module's input rule) classified as ``y``.

    A randomised model (stochastic quantizers, random precision, input noise: random in eval mode too)
    is run ``draws`` times over ``x``; an image counts only if *every* draw classifies it correctly, so
    such a model gets no credit for lucky single draws (as :func:`qrobust.attacks.whitebox.robust_accuracy`).
    The result is the float32 mean of the per-image hits (the number the studies have always stored).
    """
    if not isinstance(draws, numbers.Integral) or isinstance(draws, bool) or draws < 1:
        raise ConfigError(f"draws must be an integer >= 1, got {draws!r}")
    check_images(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.is_floating_point():
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"y must be an integer tensor of shape ({x.shape[0]},) (one label per image), got {shape}")
    y = y.cpu()
    correct = predict(model, x, batch_size, device) == y
    for _ in range(int(draws) - 1):
        correct &= predict(model, x, batch_size, device) == y
    return float(correct.float().mean())



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


def _check_probs_and_labels(probs: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or probs.ndim != 2 or len(probs) == 0 or not probs.is_floating_point():
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ConfigError(f"probs must be a non-empty float (N, classes) tensor of probabilities, got {shape}")
    if not isinstance(y, torch.Tensor) or y.shape != probs.shape[:1] or y.is_floating_point():
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"y must be an integer tensor of shape ({len(probs)},) (one label per row), got {shape}")
    if int(y.min()) < 0 or int(y.max()) >= probs.shape[1]:
        raise ConfigError(f"labels must lie in 0..{probs.shape[1] - 1} (one column of probs per class), "
                          f"got values in {int(y.min())}..{int(y.max())}")


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of probability rows ``probs`` for labels ``y`` (Guo et al. 2017, Eq. 3).

    Each row's confidence ``c_i = max_k p_ik`` and prediction ``argmax_k p_ik`` (ties: lowest index); rows
    fall in ``bins`` equal-width bins ``B_m = ((m-1)/M, m/M]`` (a confidence of 0 in the first), and
    ``ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)|`` with ``acc`` the bin's accuracy and ``conf`` its mean
    confidence. In [0, 1]; 0 = calibrated. Computed in float64.
    """
    _check_probs_and_labels(probs, y)
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ConfigError(f"bins must be an integer >= 1, got {bins!r}")
    p = probs.detach().double().cpu()
    confidence, prediction = p.max(dim=1)
    correct = (prediction == y.cpu()).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # (m-1)/M < c <= m/M -> m-1
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return float((conf_sum - acc_sum).abs().sum() / len(p))  # sum_m |B_m|/n |acc - conf| = sum_m |S_acc - S_conf|/n


def nll(probs: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-1/n sum_i log p_{i, y_i}`` of probability rows for labels ``y``.

    Probabilities are clamped at ``eps`` (default 1e-12) before the log, so a row that gives its true class
    exactly 0 (a label-only or top-k answer, a reverse-sigmoid zero) costs ``-log(eps)`` (27.6) instead of
    infinity. Computed in float64.
    """
    _check_probs_and_labels(probs, y)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
        raise ConfigError(f"eps must be a number in (0, 1), got {eps!r}")
    p = probs.detach().double().cpu().gather(1, y.cpu().long().view(-1, 1)).squeeze(1)
    return float(-p.clamp_min(eps).log().mean())


__all__ = ["accuracy", "accuracy_and_tie_rate", "as_float_images", "check_images", "expected_calibration_error", "nll",
           "predict", "predict_logits", "tie_rate"]
