"""A generated data set for tests and demos: no files, a few hundred images, learnable in seconds.

Each class is one smooth random template (a 4x4 grid of uniform values per channel, bilinearly
upsampled); an image is its class template shifted by up to ``size // 14`` pixels plus Gaussian
noise of std 0.12, stored as uint8. A tiny CNN reaches high accuracy in a few epochs. Templates
are not mirror-symmetric, so ``flip`` is False.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from qrobust.datasets.base import DatasetInfo, ImageData, crop_windows
from qrobust.datasets.files import Where
from qrobust.errors import ConfigError
from qrobust.registry import DATASETS

NOISE_STD = 0.12  # per-pixel Gaussian noise, on the [0, 1] scale


@DATASETS.register("synthetic")
def load_synthetic(
    where: Where,
    *,
    num_train: int = 512,
    num_test: int = 256,
    num_classes: int = 10,
    channels: int = 1,
    size: int = 28,
    seed: int = 0,
) -> ImageData:
    """Class-template images (see the module docstring); ``where`` is ignored."""
    lows = {"num_train": 1, "num_test": 1, "num_classes": 2, "channels": 1, "size": 8, "seed": 0}
    values = {"num_train": num_train, "num_test": num_test, "num_classes": num_classes}
    values |= {"channels": channels, "size": size, "seed": seed}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < lows[key]:
            raise ConfigError(f"synthetic data: {key} must be a whole number >= {lows[key]}, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    shift = max(1, size // 14)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
    templates = F.interpolate(coarse, size=(size + 2 * shift,) * 2, mode="bilinear", align_corners=True)
    train_x, train_y = _draw(templates, num_train, size, shift, gen)
    test_x, test_y = _draw(templates, num_test, size, shift, gen)
    pixels = train_x.double().div(255)
    mean = tuple(round(float(v), 4) for v in pixels.mean(dim=(0, 2, 3)))
    std = tuple(round(max(float(v), 1e-3), 4) for v in pixels.std(dim=(0, 2, 3)))
    classes = tuple(f"class{i}" for i in range(num_classes))
    info = DatasetInfo("synthetic", num_classes, channels, (size, size), mean, std, False, shift, classes)
    return ImageData(info, train_x, train_y, test_x, test_y)


def _draw(
    templates: torch.Tensor, n: int, size: int, shift: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randperm(n, generator=gen) % templates.shape[0]  # balanced classes in random order
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    x = crop_windows(templates[y], dy, dx, size, size) + NOISE_STD * torch.randn(
        n, templates.shape[1], size, size, generator=gen
    )
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


@DATASETS.register("synthetic-cifar10")
def load_synthetic_cifar10(where: Where, *, num_train: int = 512, num_test: int = 256, seed: int = 0) -> ImageData:
    """Synthetic images of CIFAR-10's shape (3x32x32, 10 classes): the paper presets' first steps on a CPU."""
    return _renamed(load_synthetic(where, num_train=num_train, num_test=num_test, num_classes=10, channels=3,
                                   size=32, seed=seed), "synthetic-cifar10")


@DATASETS.register("synthetic-cifar100")
def load_synthetic_cifar100(where: Where, *, num_train: int = 512, num_test: int = 256, seed: int = 1) -> ImageData:
    """Synthetic images of CIFAR-100's shape (3x32x32, 100 classes), e.g. a transfer set for CIFAR-10 runs."""
    return _renamed(load_synthetic(where, num_train=num_train, num_test=num_test, num_classes=100, channels=3,
                                   size=32, seed=seed), "synthetic-cifar100")


def _renamed(data: ImageData, name: str) -> ImageData:
    return ImageData(dataclasses.replace(data.info, name=name), data.train_x, data.train_y, data.test_x, data.test_y)
