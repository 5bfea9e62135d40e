"""The data set types shared by every loader: :class:`DatasetInfo` and :class:`ImageData`.

Both are re-exported by :mod:`qrobust.data`, the module users import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qrobust.errors import ConfigError, DataError


@dataclass(frozen=True)
class DatasetInfo:
    """What models and loaders need to know about a data set.

    ``mean``/``std`` are per channel on the [0, 1] scale (models normalise inside ``forward``);
    ``flip`` says whether a horizontal flip keeps the class (not for digits or traffic signs);
    ``crop_padding`` is the zero padding of the random-crop augmentation, in pixels.
    """

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    crop_padding: int
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"DatasetInfo '{self.name}': mean and std need one value per channel ({self.channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if len(self.classes) != self.num_classes:
            raise ConfigError(
                f"DatasetInfo '{self.name}': {self.num_classes} classes but {len(self.classes)} class "
                "names; give one name per class"
            )
        if self.crop_padding < 0 or min(self.std) <= 0:
            raise ConfigError(f"DatasetInfo '{self.name}': crop_padding must be >= 0 and std > 0")


@dataclass
class ImageData:
    """A data set in memory: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def __post_init__(self) -> None:
        check_images(self.info, self.train_x, self.train_y, "train")
        check_images(self.info, self.test_x, self.test_y, "test")

    def __repr__(self) -> str:
        return (
            f"ImageData({self.info.name}: train {tuple(self.train_x.shape)}, "
            f"test {tuple(self.test_x.shape)}, {self.info.num_classes} classes)"
        )


def check_images(info: DatasetInfo, x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Raise :class:`ConfigError` unless ``x``/``y`` are uint8 images and int64 labels fitting ``info``."""
    shape = (info.channels, *info.image_size)
    if (
        not isinstance(x, torch.Tensor)
        or x.dtype != torch.uint8
        or x.dim() != 4
        or tuple(x.shape[1:]) != shape
    ):
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(
            f"{info.name} {what} images must be uint8 [N, {', '.join(map(str, shape))}], got {got}; "
            "convert with (x * 255).round().to(torch.uint8)"
        )
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(x),):
        got = f"{y.dtype} {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"{info.name} {what} labels must be int64 [{len(x)}] (one per image), got {got}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
        raise ConfigError(
            f"{info.name} {what} labels must lie in 0..{info.num_classes - 1}, got {int(y.min())}..{int(y.max())}"
        )


def checked(
    info: DatasetInfo, x: torch.Tensor, y: torch.Tensor, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` if they fit ``info``; else a :class:`DataError` naming the files they came from."""
    try:
        check_images(info, x, y, "data")
    except ConfigError as e:
        raise DataError(f"{source}: not a valid {info.name} split: {e}; replace the file(s)") from None
    return x, y


def crop_windows(
    padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Window ``[dy:dy+h, dx:dx+w]`` of each image of a batch ``[B, C, H', W']``, mirrored
    left-right where ``flip`` is True.

    Two gathers (rows, then columns; the flip is a reversed column index) with per-image offsets:
    no Python loop over images, and on CPU ~2x faster than one 4-index advanced-indexing op.
    """
    b, c, height, width = padded.shape
    ar_h, ar_w = torch.arange(h, device=padded.device), torch.arange(w, device=padded.device)
    out = padded
    if h != height:  # with no padding the only valid row offset is 0
        out = out.gather(2, (dy[:, None] + ar_h)[:, None, :, None].expand(b, c, h, width))
    cols = ar_w.expand(b, w) if flip is None else torch.where(flip[:, None], w - 1 - ar_w, ar_w)
    return out.gather(3, (dx[:, None] + cols)[:, None, None, :].expand(b, c, h, w))
