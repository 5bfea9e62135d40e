"""One seed's context for the QADT-R cells: the data split, the trained models (each a resumable
run folder: float, QAT per width, one per defense), the float model's patches (a cached tensor stage,
``float_patches.pt``) and the analysis images; the seed's figures are drawn here once."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import Tensor, nn

from qrobust import data as datasets
from qrobust.attacks.patch import apply_patch, make_patch_attack
from qrobust.attacks.whitebox import pgd
from qrobust.config import TrainSection
from qrobust.errors import ConfigError
from qrobust.experiment import QAT_EDGES, Stages, act_range_tag
from qrobust.metrics import as_float_images
from qrobust.quant import make_switchable_bn, set_bit_width
from qrobust.runs import atomic_write_bytes, safe_load
from qrobust.studies.qadtr.cells import clean_accuracy
from qrobust.studies.qadtr.config import StudyConfig
from qrobust.studies.qadtr.defenses import DEFENSES, build_float_model, qat_model
from qrobust.studies.qadtr.report import seed_figures
from qrobust.train.objectives import CrossEntropy, Objective


def load_data(cfg: StudyConfig, device: torch.device) -> dict[str, Any]:
    """Training images (uint8, for the loader), attacker and test images (float, on ``device``).

    The split is fixed (generators seeded 12345 and 54321), the same for every seed."""
    d = cfg.data
    ds = datasets.load_dataset(d.name, data_dir=d.dir or None, download=d.download)
    n = len(ds.train_y)
    n_train = min(d.train_subset or n, n)
    n_attack = min(d.attack_subset, n - n_train)
    if n_attack < 1 or n_train < 1:
        raise ConfigError(
            f"{d.name} has {n} training images: data.train_subset ({d.train_subset}) leaves "
            f"{n - n_train} for the attacker (data.attack_subset={d.attack_subset}); lower train_subset"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
    att = perm[n_train : n_train + n_attack]
    m = len(ds.test_y)
    test = torch.randperm(m, generator=torch.Generator().manual_seed(54321))[: min(d.test_subset or m, m)]
    return {"info": ds.info, "train_x": ds.train_x[perm[:n_train]], "train_y": ds.train_y[perm[:n_train]],
            "attack_x": as_float_images(ds.train_x[att]).to(device), "attack_y": ds.train_y[att].to(device),
            "test_x": as_float_images(ds.test_x[test]).to(device), "test_y": ds.test_y[test].to(device)}


class _Trainer:
    """Fits the study's models as stages of ``stages`` (each its own run folder)."""

    def __init__(self, cfg: StudyConfig, seed: int, stages: Stages, data: dict):
        self.cfg, self.seed, self.stages, self.data = cfg, seed, stages, data

    def section(self, epochs: int, lr: float, warmup: float) -> TrainSection:
        return TrainSection(epochs=epochs, batch_size=self.cfg.fp.batch_size, lr=lr, warmup_epochs=warmup,
                            device=self.cfg.device)

    def fit(self, name: str, model: nn.Module, objective: Objective, train: TrainSection,
            eval_bits: int | None, describe: dict) -> nn.Module:
        d, device = self.data, self.stages.device
        ctx = {"data": d, "device": device}

        def evaluate(m: nn.Module) -> dict:
            if eval_bits is not None:
                set_bit_width(m, eval_bits)
            return {"test_acc": clean_accuracy(ctx, m)}

        def loader() -> datasets.BatchLoader:
            return datasets.BatchLoader(d["train_x"], d["train_y"], train.batch_size, shuffle=True,
                                        augment=self.cfg.data.augment, info=d["info"], device=device,
                                        drop_last=True, seed=self.seed)

        model = self.stages.fit(name, model, objective, train, describe, loader, evaluate)[0]
        # fit leaves a model it trains in its training memory format; a model loaded from a finished run
        # gets the same one, so cells give the same numbers whether their models were trained or loaded.
        layout = torch.channels_last if train.channels_last else torch.contiguous_format
        return model.to(memory_format=layout).eval()

    def models(self) -> dict[str, nn.Module]:
        """The float model (``"32"``) and a QAT model per ``qat.bits`` fine-tuned from it."""
        cfg = self.cfg
        torch.manual_seed(self.seed)
        fp = build_float_model(cfg, self.data["info"])
        models = {"32": self.fit("fp32", fp, CrossEntropy(), self.section(cfg.fp.epochs, cfg.fp.lr, 0.5), None, {})}
        qat_train = self.section(cfg.qat.epochs, cfg.qat.lr, 0.0)
        for bits in cfg.qat.bits:
            q = qat_model(models["32"], bits, cfg.qat.act_range)
            models[str(bits)] = self.fit(f"qat{bits}", q, CrossEntropy(), qat_train, bits,
                                         act_range_tag(cfg.qat.act_range) | QAT_EDGES)
        return models

    def defenses(self, float_model: nn.Module) -> dict[str, nn.Module]:
        """One model per trained defense of ``defense.names``, fine-tuned from the float model."""
        cfg, d = self.cfg, self.cfg.defense
        defended: dict[str, nn.Module] = {}
        train = self.section(d.epochs, d.lr, 0.0)
        for name in d.names:
            spec = DEFENSES[name]
            if spec.make is None:
                continue
            torch.manual_seed(self.seed)
            model = qat_model(float_model, d.train_bits, cfg.qat.act_range)
            sbn = spec.switchable_bn(cfg)
            if sbn:
                make_switchable_bn(model, d.bit_widths)
            defended[name] = self.fit(f"defense-{name}", model, spec.make(cfg, self.seed), train, d.train_bits,
                                      {"switchable_bn": sbn, **act_range_tag(cfg.qat.act_range), **QAT_EDGES})
        return defended


def float_patches(cfg: StudyConfig, seed: int, stages: Stages, float_model: nn.Module, data: dict) -> dict[str, Tensor]:
    """A patch per Table-2 patch (``cfg.table2_specs()``: seen, unseen size/shape/place/all) made on the float
    model over the places it is evaluated on (Table 2's transfer patches, the analysis' patched images),
    cached in ``float_patches.pt``: computed once, read by several cells."""
    path = stages.root / "float_patches.pt"
    if path.exists():
        return {k: v.to(stages.device) for k, v in safe_load(path).items()}
    a = cfg.attack
    patches = {name: make_patch_attack("universal", spec, steps=a.steps, lr=a.lr, batch_size=a.batch_size)
               .fit(float_model, data["attack_x"], data["attack_y"], generator=torch.Generator().manual_seed(seed))
               for name, spec in cfg.table2_specs().items()}
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in patches.items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return patches


def analysis_inputs(cfg: StudyConfig, seed: int, float_model: nn.Module, patches: dict[str, Tensor],
                    data: dict) -> dict[str, Tensor]:
    """The first ``analysis.num_images`` test images: clean, with the float model's seen patch, and after
    PGD on the float model; ``y`` their labels."""
    n = min(cfg.analysis.num_images, len(data["test_y"]))
    x, y = data["test_x"][:n], data["test_y"][:n]
    spec = cfg.seen_specs()[0]
    locs = spec.locations(len(x), x.shape[-2:], torch.Generator().manual_seed(seed + 3)).to(x.device)
    x_patch, _ = apply_patch(x, patches[f"seen:{spec.key}"], spec, locations=locs)
    x_pgd = pgd(float_model, x, y, cfg.analysis.pgd_eps, steps=cfg.analysis.pgd_steps, check=False,
                generator=torch.Generator().manual_seed(seed + 4))
    return {"clean": x, "patch": x_patch, "pixel": x_pgd, "y": y}


def prepare(cfg: StudyConfig, seed: int, stages: Stages) -> tuple[dict, dict]:
    """The seed's ``(summary, ctx)`` (see :mod:`qrobust.studies.qadtr.cells` for what ``ctx`` holds)."""
    data = load_data(cfg, stages.device)
    trainer = _Trainer(cfg, seed, stages, data)
    models = stages.timed("train_models", trainer.models)
    defended = stages.timed("train_defenses", lambda: trainer.defenses(models["32"]))
    patches = float_patches(cfg, seed, stages, models["32"], data)
    inputs = analysis_inputs(cfg, seed, models["32"], patches, data)
    ctx = {"seed": seed, "device": stages.device, "models": models, "defended": defended, "float_patches": patches,
           "inputs": inputs, "data": {k: data[k] for k in ("attack_x", "attack_y", "test_x", "test_y")}}
    if not all((stages.root / f).is_file() for f in ("gradient_maps.png", "feature_maps.png")):
        stages.timed("figures", lambda: seed_figures(cfg, ctx, stages.root))
    return {}, ctx
