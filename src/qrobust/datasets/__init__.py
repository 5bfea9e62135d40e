"""The data set loaders behind :func:`qrobust.data.load_dataset`, one module per file format.

Importing this package registers every loader in :data:`qrobust.registry.DATASETS`. A loader is
``loader(where: Where, **options) -> ImageData``; its keyword-only parameters are the options
``load_dataset`` accepts for that set. Users import :mod:`qrobust.data`, not this package.
"""

from qrobust.datasets import cifar, gtsrb, idx, svhn, synthetic
from qrobust.datasets.base import DatasetInfo, ImageData

INFOS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (idx.FASHION_MNIST, idx.MNIST, cifar.CIFAR10, cifar.CIFAR100, svhn.SVHN, gtsrb.GTSRB)
}

__all__ = ["INFOS", "DatasetInfo", "ImageData", "cifar", "gtsrb", "idx", "svhn", "synthetic"]
