"""GTSRB (German Traffic Sign Recognition Benchmark) in its official layout.

Train: ``GTSRB/Final_Training/Images/000NN/*.ppm`` with ``GT-000NN.csv`` per class. Test:
``GTSRB/Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` from ``GTSRB_Final_Test_GT.zip`` (the
``GT-final_test.test.csv`` inside the image archive has no labels). CSV columns, ``;``-separated:
``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``. Each image is cropped to its ROI
(x2, y2 exclusive, the sign plus a ~10% margin) and resized to 32x32 with Pillow's bilinear filter.
Decoding ~52,000 small images takes a while (tens of seconds); nothing is cached.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qrobust.datasets.base import DatasetInfo, ImageData, checked
from qrobust.datasets.files import Where, locate, refetch_hint
from qrobust.errors import DataError
from qrobust.registry import DATASETS

_CLASSES = (
    *(f"Speed limit ({v}km/h)" for v in (20, 30, 50, 60, 70, 80)), "End of speed limit (80km/h)",
    "Speed limit (100km/h)", "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 t",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 t prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left", "Roundabout mandatory",
    "End of no passing", "End of no passing by vehicles over 3.5 t",
)  # fmt: skip
GTSRB = DatasetInfo(
    "gtsrb", 43, 3, (32, 32), (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), flip=False, crop_padding=4,
    classes=_CLASSES,
)  # fmt: skip
_GT_TEST = "GT-final_test.csv"
_FILES = {
    "train": ("GTSRB/Final_Training/Images", "Final_Training/Images"),
    "test": ("GTSRB/Final_Test/Images", "Final_Test/Images"),
    "test_gt": tuple(
        d + _GT_TEST for d in ("", "GTSRB/", "GTSRB/Final_Test/", "GTSRB/Final_Test/Images/", "Final_Test/")
    ),
}
_ROI = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")
Row = tuple[Path, tuple[int, int, int, int], int]


def read_annotations(path: Path, image_dir: Path) -> list[Row]:
    """Rows ``(image path, (x1, y1, x2, y2), class id)`` of a GTSRB annotation CSV."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter=";")
            if not {"Filename", "ClassId", *_ROI} <= set(reader.fieldnames or ()):
                raise DataError(
                    f"{path} lacks the columns Filename;...;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId; for the test set "
                    "use GT-final_test.csv from GTSRB_Final_Test_GT.zip (download=True fetches it)"
                )
            return [
                (image_dir / r["Filename"], tuple(int(r[k]) for k in _ROI), int(r["ClassId"])) for r in reader
            ]
    except (ValueError, TypeError) as e:
        raise DataError(f"{path} has a malformed row ({e}); {refetch_hint(path)}") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e}); {refetch_hint(path)}") from None


def read_sign(path: Path, roi: tuple[int, int, int, int]) -> np.ndarray:
    """The sign cropped to its ROI and resized to a 32x32x3 uint8 array."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            box = (max(roi[0], 0), max(roi[1], 0), min(roi[2], w), min(roi[3], h))
            if box[2] <= box[0] or box[3] <= box[1]:
                raise DataError(f"{path}: ROI {roi} lies outside the {w}x{h} image; fix its row in the CSV")
            small = im.convert("RGB").crop(box).resize((32, 32), Image.Resampling.BILINEAR)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e}); {refetch_hint(path)}") from None
    return np.asarray(small, dtype=np.uint8)


def _split(rows: list[Row], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not rows:
        raise DataError(
            f"gtsrb {what}: the annotation CSVs list no images; fetch GTSRB again (download=True)"
        )
    signs = [read_sign(p, roi) for p, roi, _ in tqdm(rows, desc=f"gtsrb {what}", disable=None, leave=False)]
    x = torch.from_numpy(np.stack(signs)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([c for _, _, c in rows], dtype=torch.int64)
    return checked(GTSRB, x, y, f"gtsrb {what} annotations")


@DATASETS.register("gtsrb")
def load_gtsrb(where: Where) -> ImageData:
    """GTSRB: 39,209 train and 12,630 test traffic signs in 43 classes, cropped and resized to 32x32."""
    paths = locate(where, _FILES)
    train_rows = []
    for class_dir in sorted(p for p in paths["train"].iterdir() if p.is_dir()):
        train_rows += read_annotations(class_dir / f"GT-{class_dir.name}.csv", class_dir)
    test_rows = read_annotations(paths["test_gt"], paths["test"])
    return ImageData(GTSRB, *_split(train_rows, "train"), *_split(test_rows, "test"))
