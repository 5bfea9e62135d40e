"""Helpers shared by several test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qrobust.models import build_model
from qrobust.quant import QuantConfig, quantize


def train_briefly(model, synthetic, steps: int):
    """``steps`` Adam steps (lr 3e-3, batch 64, the training images in order) of ``model`` on the synthetic
    data; returned in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = synthetic.train_x.float() / 255, synthetic.train_y
    model.train()
    for i in range(steps):
        idx = torch.arange(i * 64, (i + 1) * 64) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_tiny_float(synthetic, arch: str = "lenet5", steps: int = 40):
    """A float ``arch`` briefly trained on the synthetic data (seed 0, :func:`train_briefly`)."""
    torch.manual_seed(0)
    info = synthetic.info
    model = build_model(arch, channels=info.channels, num_classes=info.num_classes, image_size=info.image_size)
    return train_briefly(model, synthetic, steps)


def train_tiny_qat(synthetic, arch: str = "convnet", steps: int = 30, model_kwargs: dict | None = None, **config):
    """A short QAT run on the synthetic data (seed 0, Adam lr 3e-3, batch 64) with ``QuantConfig(**config)``:
    activation ranges and BatchNorm statistics are real, as in a trained model. Returned in eval mode."""
    torch.manual_seed(0)
    info = synthetic.info
    model = build_model(arch, channels=info.channels, num_classes=info.num_classes, image_size=info.image_size,
                        **(model_kwargs or {}))
    return train_briefly(quantize(model, QuantConfig(**config)), synthetic, steps)
