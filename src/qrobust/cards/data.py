"""The card's images: who sees which part of the data (docs/card.md, "Data").

* evaluation images: a fixed seeded subset of the test set; every number is measured on them;
* held-out images: other test images; the defender calibrates DCP on them (never evaluated on);
* attacker images: a seeded subset of the training set: KnockoffNets' transfer set and the images a
  patch is trained on (an attacker with natural images of the task; the victim may have seen them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from qrobust.data import DatasetInfo, ImageData
from qrobust.errors import ConfigError
from qrobust.metrics import as_float_images

from .budget import Budget


@dataclass
class CardData:
    """Float images in [0, 1] on the CPU, int64 labels, and the data set's info."""

    info: DatasetInfo
    eval_x: Tensor
    eval_y: Tensor
    heldout_x: Tensor
    heldout_y: Tensor
    pool_x: Tensor
    pool_y: Tensor

    def sizes(self) -> dict:
        return {"eval": len(self.eval_y), "heldout": len(self.heldout_y), "attacker": len(self.pool_y)}

    def fingerprint(self) -> str:
        """A short hash of the evaluation images and labels (cached sections are only reused for them)."""
        h = hashlib.sha1()
        for t in (self.eval_x, self.eval_y, self.heldout_y, self.pool_y):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _check_pair(x, y, what: str) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or x.dim() != 4 or len(x) == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"card data: {what} images must be a non-empty tensor [N, C, H, W], got {shape}")
    if not isinstance(y, Tensor) or y.shape != (len(x),) or y.is_floating_point() or y.dtype == torch.bool:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(f"card data: {what} labels must be integers of shape ({len(x)},), got {shape}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ConfigError(f"card data: {what} images must be uint8 or float in [0, 1], got {x.dtype}")
        low, high = float(x.min()), float(x.max())
        if not (low >= 0.0 and high <= 1.0):
            raise ConfigError(f"card data: {what} images must lie in [0, 1], got [{low:.3g}, {high:.3g}]; divide "
                              "by 255 and put normalisation inside the model")
    if int(y.min()) < 0:
        raise ConfigError(f"card data: {what} labels must be class indices >= 0, got {int(y.min())}")
    return as_float_images(x.detach().cpu()), y.detach().cpu().long()


def _info_from(train_x: Tensor, num_classes: int) -> DatasetInfo:
    c, h, w = train_x.shape[1:]
    mean = tuple(float(v) for v in train_x.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in train_x.std(dim=(0, 2, 3)))
    return DatasetInfo("your data", num_classes, int(c), (int(h), int(w)), mean, std, False, 0,
                       tuple(str(i) for i in range(num_classes)))


def card_data(data, budget: Budget) -> CardData:
    """Split ``data`` (an :class:`~qrobust.data.ImageData` or ``(x_train, y_train, x_test, y_test)``
    tensors, uint8 or float in [0, 1]) into the card's evaluation, held-out and attacker images."""
    if isinstance(data, ImageData):
        info = data.info
        train_x, train_y, test_x, test_y = data.train_x, data.train_y.long(), data.test_x, data.test_y.long()
    elif isinstance(data, (tuple, list)) and len(data) == 4:
        train_x, train_y = _check_pair(data[0], data[1], "training")
        test_x, test_y = _check_pair(data[2], data[3], "test")
        if train_x.shape[1:] != test_x.shape[1:]:
            raise ConfigError(f"card data: training images are {tuple(train_x.shape[1:])} but test images "
                              f"{tuple(test_x.shape[1:])}; give images of one shape")
        info = _info_from(train_x, max(2, int(max(train_y.max(), test_y.max())) + 1))
    else:
        raise ConfigError("card data must be a qrobust ImageData (qr.load_dataset(...)) or a tuple "
                          f"(x_train, y_train, x_test, y_test) of tensors, got {type(data).__name__}")
    if len(test_y) < 4:
        raise ConfigError(f"card data: {len(test_y)} test images are too few; give at least 4 (the card "
                          f"evaluates on {budget.eval_images} and calibrates on {budget.heldout_images} others)")
    order = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(budget.seed + 101))
    n_eval = min(budget.eval_images, len(test_y) // 2)
    n_held = min(budget.heldout_images, len(test_y) - n_eval)
    ev, held = order[:n_eval], order[n_eval:n_eval + n_held]
    pool_n = min(len(train_y), max(budget.knockoff_queries, budget.patch_images))
    pool = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(budget.seed + 202))[:pool_n]
    return CardData(info, as_float_images(test_x[ev]), test_y[ev], as_float_images(test_x[held]), test_y[held],
                    as_float_images(train_x[pool]), train_y[pool])
