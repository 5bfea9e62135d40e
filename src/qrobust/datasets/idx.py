"""MNIST and Fashion-MNIST from their idx files (``.gz`` or uncompressed).

idx layout: magic ``00 00 08 <ndim>`` (unsigned bytes), ``ndim`` big-endian int32 sizes, then the
data in C order. The byte count must match the sizes exactly, so a truncated file is caught.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qrobust.datasets.base import DatasetInfo, ImageData, checked
from qrobust.datasets.files import Where, locate, read_bytes, refetch_hint
from qrobust.errors import DataError
from qrobust.registry import DATASETS

FASHION_MNIST = DatasetInfo(
    "fashion-mnist", 10, 1, (28, 28), (0.2860,), (0.3530,), flip=True, crop_padding=2,
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)  # fmt: skip
MNIST = DatasetInfo(
    "mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), flip=False, crop_padding=2,
    classes=tuple(str(d) for d in range(10)),
)  # fmt: skip
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """The uint8 tensor stored in an idx file with ``ndim`` dimensions."""
    raw = read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header or bytes(raw[:4]) != bytes((0, 0, 8, ndim)):
        raise DataError(
            f"{path} is not an idx{ndim}-ubyte file (starts with {bytes(raw[:4]).hex() or 'nothing'}, "
            f"expected 000008{ndim:02x}); {refetch_hint(path)}"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = math.prod(dims)
    if count == 0 or len(raw) != header + count:
        raise DataError(
            f"{path} holds {len(raw)} bytes but its header (sizes {dims}) needs {header + count}: "
            f"the file is truncated or damaged; {refetch_hint(path)}"
        )
    return torch.frombuffer(raw, dtype=torch.uint8, offset=header, count=count).view(dims)


def _load_idx_set(where: Where, info: DatasetInfo) -> ImageData:
    paths = locate(where, {key: (f + ".gz", f) for key, f in IDX_FILES.items()})
    parts = []
    for split in ("train", "test"):
        x_path, y_path = paths[f"{split}_x"], paths[f"{split}_y"]
        x = read_idx(x_path, 3)[:, None]  # [N, H, W] -> [N, 1, H, W]
        y = read_idx(y_path, 1).to(torch.int64)
        parts += checked(info, x, y, f"{x_path} + {y_path}")
    return ImageData(info, *parts)


@DATASETS.register("mnist")
def load_mnist(where: Where) -> ImageData:
    """MNIST digits: 60,000 train and 10,000 test images, 28x28 grey."""
    return _load_idx_set(where, MNIST)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(where: Where) -> ImageData:
    """Fashion-MNIST (Zalando): 60,000 train and 10,000 test images, 28x28 grey, 10 clothing classes."""
    return _load_idx_set(where, FASHION_MNIST)
