"""Named image data sets as uint8 tensors, and a batch loader that augments on the device.

``load_dataset("fashion-mnist")`` returns :class:`ImageData`: the whole train and test sets as
uint8 ``[N, C, H, W]`` tensors with int64 labels, plus a :class:`DatasetInfo` (classes, per-channel
mean/std on the [0, 1] scale, which augmentations make sense). Sets: fashion-mnist (the default;
Debian package ``dataset-fashion-mnist``), mnist, cifar10, cifar100, svhn, gtsrb, and synthetic
(generated, for tests). Where files are looked for, and how ``download=True`` checks them, is
described in :mod:`qrobust.datasets.files`; the file formats in the other modules of
:mod:`qrobust.datasets`.

:class:`BatchLoader` keeps a set on the device and builds each batch with batched tensor ops
(random crop with zero padding, random horizontal flip), the idea of airbench's ``CifarLoader``.
Its randomness is a pure function of ``(seed, epoch)``, so a resumed training run sees exactly the
batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from qrobust.datasets import INFOS
from qrobust.datasets.base import DatasetInfo, ImageData, crop_windows
from qrobust.datasets.files import DATA_ENV, where_for
from qrobust.errors import ConfigError
from qrobust.registry import DATASETS

__all__ = [
    "DATA_ENV",
    "BatchLoader",
    "TensorLoader",
    "DatasetInfo",
    "ImageData",
    "dataset_info",
    "dataset_names",
    "load_dataset",
    "split_indices",
]


def dataset_names() -> list[str]:
    """The registered data set names, sorted (the valid values of ``load_dataset``'s ``name``)."""
    return DATASETS.names()


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False, **kwargs: Any
) -> ImageData:
    """Load a named data set into memory as uint8 tensors.

    ``data_dir`` overrides where files are looked for, ``download`` fetches missing files from the
    official URLs (md5-checked), ``kwargs`` are options of the set (only ``synthetic`` has some).
    Raises :class:`~qrobust.errors.ConfigError` for a bad name or option and
    :class:`~qrobust.errors.DataError` for missing or damaged files, each saying how to fix it.
    """
    key = _normalise(name)
    loader = DATASETS.get(key)
    _check_options(key, loader, kwargs)
    return loader(where_for(key, data_dir, download), **kwargs)


def dataset_info(name: str, **kwargs: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` of a named set without reading its files (``synthetic`` is generated)."""
    key = _normalise(name)
    if key in INFOS and not kwargs:
        return INFOS[key]
    return load_dataset(key, **kwargs).info


def _normalise(name: Any) -> str:
    if not isinstance(name, str):
        raise ConfigError(
            f"a data set name must be a string, got {name!r}; choose one of: {', '.join(dataset_names())}"
        )
    return name.strip().lower().replace("_", "-")


def _check_options(name: str, loader: Callable[..., ImageData], kwargs: dict[str, Any]) -> None:
    params = inspect.signature(loader).parameters.values()
    options = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepted = f"its options are: {', '.join(options)}" if options else "it takes no options"
        raise ConfigError(f"data set '{name}' has no option {', '.join(unknown)}; {accepted}")


def split_indices(n: int, fractions: dict[str, float], seed: int) -> dict[str, torch.Tensor]:
    """Disjoint random index sets (LongTensors) of ``floor(fraction * n)`` elements each.

    For example a victim/attacker/validation split of one training set. The splits are cut, in
    sorted-name order, from one permutation of ``range(n)`` drawn with ``seed``, so the result
    depends only on ``(n, fractions, seed)``. Indices within a split are in random order, so
    ``split[:k]`` is a random subset. Fractions must lie in [0, 1] and sum to at most 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"split_indices needs a whole number n >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"split_indices needs a whole-number seed, got {seed!r}")
    if not isinstance(fractions, dict) or not fractions:
        raise ConfigError(
            f"split_indices needs a dict of fractions, e.g. {{'train': 0.9, 'val': 0.1}}, got {fractions!r}"
        )
    bad = {
        k: f
        for k, f in fractions.items()
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 <= f <= 1
    }
    if bad:
        raise ConfigError(f"split fractions must be numbers in [0, 1], got {bad}")
    total = sum(fractions.values())
    if total > 1 + 1e-9:
        raise ConfigError(f"split fractions sum to {total:g} > 1: {fractions}; make them sum to at most 1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for key in sorted(fractions):
        size = min(math.floor(fractions[key] * n + 1e-9), n - start)  # 1e-9: 0.29 * 100 is 28.999...
        out[key] = perm[start : start + size].clone()
        start += size
    return out


class BatchLoader:
    """Batches of ``(x, y)`` from a uint8 image tensor kept whole on ``device``.

    Each batch is gathered, randomly cropped (``info.crop_padding`` zero padding) and flipped (only
    if ``info.flip``) with a few batched tensor ops when ``augment`` is set, then converted to
    float32 in [0, 1], channels-last. Shuffle order and augmentation are drawn on the CPU from a
    generator seeded with ``(seed, epoch)``, so they depend on nothing else (not the device, not
    earlier epochs). Each ``iter()`` uses the current epoch and then advances it by one; call
    :meth:`set_epoch` before each epoch to make that explicit, and to resume.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        info: DatasetInfo | None = None,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        seed: int = 0,
    ):
        _check_loader_args(x, y, batch_size, augment, info)
        self.device = _device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.padding = info.crop_padding if augment and info is not None else 0
        self.flip = bool(augment and info is not None and info.flip)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next ``iter()``; its order and augmentation depend only on it."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"set_epoch needs a whole number >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        order, dy, dx, flip = self._draw(epoch)
        for i in range(len(self)):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[s]
            yield self._batch(idx, dy[s], dx[s], flip[s]), self.y[idx]

    def _draw(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """The epoch's order, crop offsets and flip decisions, one entry per position in the epoch."""
        n, p = len(self.x), self.padding
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        return tuple(t.to(self.device) for t in (order, dy, dx, flip))

    def _batch(
        self, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        xb = self.x[idx]  # still uint8 here: cropping moves 4x fewer bytes than on float32
        if self.padding or self.flip:
            p = self.padding
            padded = F.pad(xb, (p, p, p, p)) if p else xb
            xb = crop_windows(padded, dy, dx, xb.shape[2], xb.shape[3], flip if self.flip else None)
        return xb.to(dtype=torch.float32, memory_format=torch.channels_last).div_(255.0)


class TensorLoader:
    """Shuffled mini-batches of ``(x, targets)`` already on the device: float images and any per-row
    targets (labels, or probability vectors such as a victim's answers). The loader protocol of
    :class:`BatchLoader` (``set_epoch``, ``len``, ``iter``) without augmentation, so the one training loop
    (:func:`qrobust.train.loop.fit`) can train on tensors an attack collected. The order is a pure
    function of ``(seed, epoch)``. A final batch of one row is dropped: BatchNorm cannot train on it.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or len(x) != len(y) or len(x) == 0:
            raise ConfigError("TensorLoader needs x and y as non-empty tensors with one target row per input")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        self.x, self.y, self.batch_size = x, y.to(x.device), batch_size
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0

    set_epoch = BatchLoader.set_epoch  # the same checked setter

    def __len__(self) -> int:
        n = len(self.x)
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest > 1 or (rest == 1 and n == 1) else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        n = len(self.x)
        if self.shuffle:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(n, generator=gen).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def _epoch_seed(seed: int, epoch: int) -> int:
    # hashing keeps nearby (seed, epoch) pairs from giving related generator streams
    digest = hashlib.sha256(f"qrobust-batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r} ({e}); use 'cpu', 'cuda' or 'cuda:0'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} was asked for, but this torch has no usable CUDA; use device='cpu'"
        )
    return dev


def _check_loader_args(x: Any, y: Any, batch_size: Any, augment: bool, info: DatasetInfo | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(
            f"BatchLoader needs x as a uint8 tensor [N, C, H, W], got {got}; pass ImageData.train_x, "
            "or convert with (x * 255).round().to(torch.uint8)"
        )
    if not isinstance(y, torch.Tensor) or y.shape != (len(x),):
        raise ConfigError(f"BatchLoader needs y as a tensor of {len(x)} labels, one per image")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if augment and info is None:
        raise ConfigError(
            "augment=True needs info=<DatasetInfo> (e.g. data.info) for the crop padding and flips"
        )
    if info is not None and x.shape[1] != info.channels:
        raise ConfigError(
            f"x has {x.shape[1]} channels but info '{info.name}' says {info.channels}; pass the matching info"
        )
