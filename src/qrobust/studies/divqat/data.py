"""One seed's tensors: the victim data set's training images cut by seed into disjoint victim-train /
attacker pool / validation splits, a fixed test subset, and KnockoffNets' transfer set."""

from __future__ import annotations

import torch
from torch import nn

from qrobust import data as datasets
from qrobust.attacks.extraction.knockoff import prepare_transfer_set
from qrobust.errors import ConfigError
from qrobust.metrics import as_float_images
from qrobust.models import model_for_data
from qrobust.studies.divqat.config import StudyConfig


class SeedData:
    """Victim-train (uint8, for the loader), attacker pool, validation, test and transfer tensors.

    Everything a cell needs (:meth:`for_cells`) is plain tensors and the data set's info, so it pickles
    (it travels to Ray workers)."""

    def __init__(self, cfg: StudyConfig, seed: int, device: torch.device):
        d = cfg.data
        ds = datasets.load_dataset(d.name, data_dir=d.dir or None, download=d.download)
        self.info = ds.info
        self.image_shape = (ds.info.channels, *ds.info.image_size)
        split = datasets.split_indices(
            len(ds.train_y), {"victim": d.victim_fraction, "attacker": d.attacker_fraction, "val": d.val_fraction},
            seed)
        if min(len(v) for v in split.values()) < 2:
            raise ConfigError(f"{d.name} has {len(ds.train_y)} training images: the split fractions leave a split "
                              f"with < 2 images ({ {k: len(v) for k, v in split.items()} }); raise the fractions")
        self.train_x, self.train_y = ds.train_x[split["victim"]], ds.train_y[split["victim"]]
        self.attacker_x = as_float_images(ds.train_x[split["attacker"]]).to(device)
        self.val_x = as_float_images(ds.train_x[split["val"]]).to(device)
        self.val_y = ds.train_y[split["val"]].to(device)
        m = len(ds.test_y)
        test = torch.randperm(m, generator=torch.Generator().manual_seed(10_000 + seed))[: min(d.test_subset or m, m)]
        self.test_x = as_float_images(ds.test_x[test]).to(device)
        self.test_y = ds.test_y[test].to(device)
        self.split_sizes = {k: len(v) for k, v in split.items()} | {"test": len(test)}
        if d.transfer:
            other = datasets.load_dataset(d.transfer, data_dir=None, download=d.download)
            n = len(other.train_y)
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(20_000 + seed))
            pick = pick[: min(d.transfer_subset or n, n)]
            self.transfer = prepare_transfer_set(other.train_x[pick], self.image_shape).to(device)
        else:
            self.transfer = self.attacker_x
        needs_transfer = [a for a in cfg.attack.names if a in ("knockoff", "knockoff-hard")]
        if needs_transfer and cfg.knockoff.queries > len(self.transfer):
            raise ConfigError(f"knockoff.queries={cfg.knockoff.queries} exceeds the transfer set ({len(self.transfer)} "
                              "images); lower it or raise data.attacker_fraction / data.transfer_subset")

    def loader(self, cfg: StudyConfig, batch_size: int, seed: int, device: torch.device) -> datasets.BatchLoader:
        """The victims' training batches (augmented as ``data.augment``; order seeded by ``seed``)."""
        return datasets.BatchLoader(self.train_x, self.train_y, batch_size, shuffle=True, augment=cfg.data.augment,
                                    info=self.info, device=device, drop_last=True, seed=seed)

    def for_cells(self) -> dict:
        """What the attack cells read: test images and labels, the transfer set, the image shape, the info."""
        return {"test_x": self.test_x, "test_y": self.test_y, "transfer": self.transfer,
                "image_shape": self.image_shape, "info": self.info}


def build_model(cfg: StudyConfig, arch: str, info) -> nn.Module:
    """A victim or clone of ``arch`` sized for the data (``model.width`` for the convnet)."""
    if arch == "convnet":
        return model_for_data(arch, info, width=cfg.model.width)
    return model_for_data(arch, info)
