"""SVHN (cropped digits) from ``train_32x32.mat`` / ``test_32x32.mat``.

``X`` is stored as ``[H, W, C, N]`` and the digit 0 as label 10; both are converted here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qrobust.datasets.base import DatasetInfo, ImageData, checked
from qrobust.datasets.files import Where, locate, refetch_hint
from qrobust.errors import DataError
from qrobust.registry import DATASETS

SVHN = DatasetInfo(
    "svhn", 10, 3, (32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), flip=False, crop_padding=4,
    classes=tuple(str(d) for d in range(10)),
)  # fmt: skip


def read_svhn(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 3, 32, 32]`` and labels 0..9 from one SVHN ``.mat`` file."""
    from scipy.io import loadmat  # scipy is slow to import; only SVHN needs it
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except (MatReadError, OSError, ValueError, EOFError, TypeError) as e:
        raise DataError(
            f"{path} cannot be read ({e}): it is damaged or truncated; {refetch_hint(path)}"
        ) from None
    xs, ys = mat.get("X"), mat.get("y")
    if not isinstance(xs, np.ndarray) or xs.ndim != 4 or xs.shape[:3] != (32, 32, 3) or xs.dtype != np.uint8:
        raise DataError(f"{path}: 'X' is not a uint8 [32, 32, 3, N] array; {refetch_hint(path)}")
    if not isinstance(ys, np.ndarray) or ys.size != xs.shape[3]:
        raise DataError(f"{path}: 'y' must hold one label per image ({xs.shape[3]}); {refetch_hint(path)}")
    x = torch.from_numpy(np.ascontiguousarray(xs.transpose(3, 2, 0, 1)))  # H W C N -> N C H W
    y = torch.from_numpy(ys.reshape(-1).astype(np.int64))
    y[y == 10] = 0
    return checked(SVHN, x, y, str(path))


@DATASETS.register("svhn")
def load_svhn(where: Where) -> ImageData:
    """SVHN: 73,257 train and 26,032 test house-number digits, 32x32 RGB (``extra`` is not used)."""
    paths = locate(where, {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)})
    return ImageData(SVHN, *read_svhn(paths["train"]), *read_svhn(paths["test"]))
