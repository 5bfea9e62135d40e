"""CIFAR-10 and CIFAR-100 from the official python batches, extracted or inside the ``.tar.gz``.

The batches are pickles, and unpickling an untrusted pickle can run any code. They are read with
:class:`RestrictedUnpickler`, which admits only the numpy constructors these files need
(``_reconstruct``, ``ndarray``, ``dtype``) and refuses everything else before it is called.
"""

from __future__ import annotations

import codecs
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from qrobust.datasets.base import DatasetInfo, ImageData, checked
from qrobust.datasets.files import Where, locate, refetch_hint
from qrobust.errors import DataError
from qrobust.registry import DATASETS

CIFAR10 = DatasetInfo(
    "cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), flip=True, crop_padding=4,
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
)  # fmt: skip
_CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"""
CIFAR100 = DatasetInfo(
    "cifar100", 100, 3, (32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), flip=True, crop_padding=4,
    classes=tuple(_CIFAR100_CLASSES.split()),  # fine labels, in label order (as in the archive's `meta`)
)  # fmt: skip


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):  # files name numpy.core; numpy 2 writes numpy._core
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer  # arrays in protocol-5 pickles
    allowed[("_codecs", "encode")] = codecs.encode  # bytes in protocol-2 pickles written by Python 3
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays; any other global is refused."""

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file, encoding="bytes")  # the official batches are Python 2 pickles
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for ``module.name``; :class:`DataError` for anything else."""
        if (module, name) not in self.allowed:
            raise DataError(
                f"refusing to unpickle {self.source}: it asks for {module}.{name}, which a CIFAR batch never "
                "contains (only numpy arrays are allowed), so it is not an official CIFAR file; delete it and "
                "fetch it again (download=True, CLI: --download)"
            )
        return self.allowed[(module, name)]


def unpickle(file: IO[bytes], source: str) -> dict:
    """One CIFAR batch dict, read with :class:`RestrictedUnpickler`."""
    try:
        obj = RestrictedUnpickler(file, source).load()
    except DataError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        zlib.error,
        ValueError,
        TypeError,
        AttributeError,
    ) as e:
        raise DataError(
            f"{source} cannot be unpickled ({e}): it is damaged or truncated; {refetch_hint(Path(source))}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{source} holds a {type(obj).__name__}, not a CIFAR batch; {refetch_hint(Path(source))}"
        )
    return obj


def _read_batches(source: Path, folder: str, members: tuple[str, ...]) -> dict[str, dict]:
    """Unpickle ``members`` from the extracted ``folder`` or straight from the ``.tar.gz``."""
    out = {}
    if source.is_dir():
        for m in members:
            if (source / m).is_file():
                with open(source / m, "rb") as f:
                    out[m] = unpickle(f, str(source / m))
    else:
        wanted = {f"{folder}/{m}": m for m in members}
        try:
            with tarfile.open(source, "r:gz") as tar:
                for member in tar:  # one sequential pass: a gzip stream cannot seek back cheaply
                    if member.name in wanted and member.isfile():
                        out[wanted[member.name]] = unpickle(
                            tar.extractfile(member), f"{source}:{member.name}"
                        )
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{source} cannot be read ({e}): it is damaged or truncated; {refetch_hint(source)}"
            ) from None
    missing = [m for m in members if m not in out]
    if missing:
        raise DataError(f"{source} lacks {', '.join(missing)}; {refetch_hint(source)}")
    return out


def _arrays(batch: dict, label_key: str, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(label_key.encode(), batch.get(label_key))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{source}: 'data' is not a uint8 [N, 3072] array; {refetch_hint(Path(source))}")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise DataError(
            f"{source}: '{label_key}' is missing or not one label per image; {refetch_hint(Path(source))}"
        )
    x = torch.from_numpy(np.array(data, copy=True)).view(-1, 3, 32, 32)  # each row: R, G, B planes of 32x32
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


# name -> (extracted folder, archive, train batches, test batch, label key)
_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py", "cifar-10-python.tar.gz", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
        "labels",
    ),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "fine_labels"),
}  # fmt: skip


def _load_cifar(where: Where, info: DatasetInfo) -> ImageData:
    folder, archive, train, test, label_key = _LAYOUT[info.name]
    source = locate(where, {"source": (folder, archive)})["source"]
    batches = _read_batches(source, folder, (*train, test))
    parts = [_arrays(batches[m], label_key, f"{source}/{m}") for m in train]
    train_xy = checked(info, torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), str(source))
    test_xy = checked(info, *_arrays(batches[test], label_key, f"{source}/{test}"), str(source))
    return ImageData(info, *train_xy, *test_xy)


@DATASETS.register("cifar10")
def load_cifar10(where: Where) -> ImageData:
    """CIFAR-10: 50,000 train and 10,000 test images, 32x32 RGB, 10 classes."""
    return _load_cifar(where, CIFAR10)


@DATASETS.register("cifar100")
def load_cifar100(where: Where) -> ImageData:
    """CIFAR-100: 50,000 train and 10,000 test images, 32x32 RGB, 100 fine classes."""
    return _load_cifar(where, CIFAR100)
