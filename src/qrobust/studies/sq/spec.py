"""The SQ study as a specification of the study engine (:mod:`qrobust.experiment`).

Per seed, ``prepare`` loads the data and trains (or loads) the models, each a resumable run folder
``seed-<s>/models/<name>``: ``fp32``, ``fp32-ft`` (the float model fine-tuned for the SQ models' extra
epochs: the matched control), ``fp32-inq`` (the same fine-tuning behind a fixed uniform K-level rounding of
the pixels: the input-quantization control), ``qat<b>``, ``sq`` (beta = 0), ``sq-mi`` and the ablation variants,
the SQ ranges being a cached stage (``calibration.json``). The grid (``cells.json``):

* ``eval/<model>``: one model under every attack and budget, with the AIP and the MI detector for SQ
  models (one cell: the AIP needs the model's examples of several attacks);
* ``adaptive``: the adaptive attack on the SQ+MI model's detector (``attack.adaptive``);
* ``ablation/<variant>``: one SQ+MI variant's row of the ablation table (``sq-mi`` and every variant,
  when the config asks for ablations).

Every cell seeds the global RNG (the SQ noise) with ``cell_seed(seed, key)`` and restores it after,
so its record depends on nothing but the config, the seed and the trained models.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust import data as datasets
from qrobust.config import TrainSection
from qrobust.errors import ConfigError
from qrobust.experiment import QAT_EDGES, Cell, StudySpec, act_range_tag, aggregate_seeds, cell_seed
from qrobust.metrics import as_float_images
from qrobust.models import model_for_data
from qrobust.quant import QuantConfig, quantize
from qrobust.quant.sq_model import build_sq_model, calibrate_ranges, input_rounded
from qrobust.quant.stochastic import EnsembleSQ, correct_per_draw, ensemble_stats, rounded_copy
from qrobust.studies.sq.attacks import ABLATION_ATTACKS, ATTACKS, Deployed
from qrobust.studies.sq.config import INPUT_ROUNDED, ROUNDED, StudyConfig, model_names
from qrobust.studies.sq.evaluate import ablation_row, adaptive, evaluate_model
from qrobust.studies.sq.report import write_report
from qrobust.train.objectives import CrossEntropy
from qrobust.train.sq_objective import MIEnsembleLoss, SQEnsembleObjective
from qrobust.utils import eval_mode


class _Data:
    """Training images (uint8, for the loader), validation and test images (float, on the device)."""

    def __init__(self, cfg: StudyConfig, device: torch.device):
        d = cfg.data
        ds = datasets.load_dataset(d.name, data_dir=d.dir or None, download=d.download)
        self.info = ds.info
        n = len(ds.train_y)
        n_val = min(d.val_subset, n - 1)
        n_train = min(d.train_subset or n - n_val, n - n_val)
        if n_val < 1 or n_train < 1:
            raise ConfigError(f"{d.name} has {n} training images: lower data.train_subset / data.val_subset")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
        self.train_x, self.train_y = ds.train_x[perm[:n_train]], ds.train_y[perm[:n_train]]
        val = perm[n_train : n_train + n_val]
        self.val_x, self.val_y = as_float_images(ds.train_x[val]).to(device), ds.train_y[val].to(device)
        m = len(ds.test_y)
        test = torch.randperm(m, generator=torch.Generator().manual_seed(54321))[: min(d.test_subset or m, m)]
        self.test_x, self.test_y = as_float_images(ds.test_x[test]).to(device), ds.test_y[test].to(device)


def _train_section(cfg: StudyConfig, epochs: int, lr: float, warmup: float) -> TrainSection:
    return TrainSection(epochs=epochs, batch_size=cfg.fp.batch_size, lr=lr, warmup_epochs=warmup, device=cfg.device)


class _Trainer:
    """Trains (or loads) one seed's models through ``stages.fit`` on the seed's data."""

    def __init__(self, cfg: StudyConfig, seed: int, stages: Any, data: _Data):
        self.cfg, self.seed, self.stages, self.data = cfg, seed, stages, data

    def loader(self, train: TrainSection) -> Callable[[], datasets.BatchLoader]:
        def make() -> datasets.BatchLoader:
            torch.manual_seed(self.seed)  # SQ noise and MI draws during training
            return datasets.BatchLoader(self.data.train_x, self.data.train_y, train.batch_size, shuffle=True,
                                        augment=self.cfg.data.augment, info=self.data.info,
                                        device=self.stages.device, drop_last=True, seed=self.seed)

        return make

    def fit(self, name: str, model: nn.Module, objective: Any, train: TrainSection, describe: dict,
            evaluate_fn: Callable[[nn.Module], dict]) -> tuple[nn.Module, dict]:
        """``stages.fit`` on the seed's training images (a loaded model gets the memory format training
        leaves, so a resumed study computes what a fresh one does: tested)."""
        return self.stages.fit(name, model, objective, train, describe, self.loader(train), evaluate_fn)

    def fit_float_control(self, name: str, model: nn.Module, describe: dict) -> tuple[nn.Module, dict]:
        """A float control: ``model`` fine-tuned with CE for the SQ models' extra epochs at their LR, from the
        same seed, so that it differs from them only by what it leaves out."""
        torch.manual_seed(self.seed)
        return self.fit(name, model, CrossEntropy(), _train_section(self.cfg, self.cfg.sq.epochs, self.cfg.sq.lr, 0.0),
                        describe, self.eval_det)

    def eval_det(self, model: nn.Module) -> dict:
        with eval_mode(model):
            ok = correct_per_draw(model, self.data.test_x, self.data.test_y, 1, 512).all(0)
        return {"test_acc": ok.float().mean().item()}

    def eval_sq(self, n_draws: int) -> Callable[[nn.Module], dict]:
        def evaluate_fn(model: nn.Module) -> dict:
            with eval_mode(model):
                correct, _, mi = ensemble_stats(model, self.data.test_x, self.data.test_y, n_draws, 256)
            return {"test_acc": correct.float().mean().item(), "test_mi": mi.mean().item()}

        return evaluate_fn

    def train_all(self) -> tuple[dict, dict[str, Deployed]]:
        """Every model: ``(summary, models)``; the summary holds each run's results less ``complete``."""
        cfg, seed = self.cfg, self.seed
        torch.manual_seed(seed)
        fp = model_for_data(cfg.model.arch, self.data.info)
        fp, fp_res = self.fit("fp32", fp, CrossEntropy(), _train_section(cfg, cfg.fp.epochs, cfg.fp.lr, 0.5), {},
                              self.eval_det)
        models = {"fp32": Deployed(fp)}
        # the matched float control: the float model fine-tuned for the SQ models' extra epochs at their LR
        ft, ft_res = self.fit_float_control("fp32-ft", copy.deepcopy(fp), {"from": "fp32"})
        models["fp32-ft"] = Deployed(ft)
        # the input-quantization control: the same fine-tuning behind a fixed (not learned, not sampled)
        # uniform K-level rounding of the pixels -- what the SQ models' input grid does without SQ training
        inq, inq_res = self.fit_float_control(INPUT_ROUNDED, input_rounded(fp, cfg.sq.num_bins), {
            "from": "fp32", "input_levels": cfg.sq.num_bins, "grid": "uniform [0, 1], fixed"})
        models[INPUT_ROUNDED] = Deployed(inq)
        bits = cfg.qat_bits
        torch.manual_seed(seed)
        q = quantize(fp, QuantConfig(weight_bits=bits, act_bits=bits, act_range=cfg.qat.act_range))
        q, q_res = self.fit(f"qat{bits}", q, CrossEntropy(), _train_section(cfg, cfg.qat.epochs, cfg.qat.lr, 0.0),
                            {"bits": bits, **act_range_tag(cfg.qat.act_range), **QAT_EDGES}, self.eval_det)
        models[f"qat{bits}"] = Deployed(q)
        ranges = self.stages.json("calibration", lambda: calibrate_ranges(fp, self.data.val_x, list(cfg.sq.after),
                                                                           cfg.sq.percentile))
        summary = {"fp32": fp_res, "fp32-ft": ft_res, INPUT_ROUNDED: inq_res, f"qat{bits}": q_res}
        for name, settings in sq_variants(cfg):
            torch.manual_seed(seed)
            model = build_sq_model(fp, ranges, settings, cfg.sq.at_input)
            objective = SQEnsembleObjective(MIEnsembleLoss(settings["beta"], settings["spacing_weight"],
                                                           settings["n_draws"], settings["ce_on"], settings["mi_on"]))
            describe = {k: settings[k] for k in ("num_bins", "alpha", "tau", "learnable")} | {
                "at_input": cfg.sq.at_input, "after": list(cfg.sq.after), "ranges": ranges}
            model, res = self.fit(name, model, objective, _train_section(cfg, cfg.sq.epochs, cfg.sq.lr, 0.0), describe,
                                  self.eval_sq(settings["n_draws"]))
            models[name] = Deployed(EnsembleSQ(model, settings["n_draws"]).eval(), model)
            summary[name] = res
        # the deterministic control of the randomness: the SQ+MI network, nearest-bin rounding, one forward
        models[ROUNDED] = Deployed(rounded_copy(models["sq-mi"].raw).eval())
        return {name: {k: v for k, v in res.items() if k != "complete"} for name, res in summary.items()}, models


def sq_variants(cfg: StudyConfig) -> list[tuple[str, dict]]:
    """The SQ models' names and settings: ``sq`` (beta = 0), ``sq-mi`` and the ablation variants."""
    return [("sq", cfg.sq_settings(beta=0.0)), ("sq-mi", cfg.sq_settings())] + cfg.ablation_variants()


def ablation_names(cfg: StudyConfig) -> list[str]:
    """The rows of the ablation table (none when the config asks for no ablation)."""
    variants = [name for name, _ in cfg.ablation_variants()]
    return ["sq-mi", *variants] if variants else []


# What each kind of cell runs: (cfg, ctx, **cell.params less "kind") -> record.
CELL_KINDS: dict[str, Callable[..., dict]] = {
    "eval": evaluate_model,
    "adaptive": adaptive,
    "ablation": ablation_row,
}


class SQSpec(StudySpec):
    name = "sq"
    config_cls = StudyConfig

    def describe(self, cfg: StudyConfig) -> dict:
        return {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data)}

    def prepare(self, cfg: StudyConfig, seed: int, stages: Any) -> tuple[dict, dict]:
        data = _Data(cfg, stages.device)
        summary, models = _Trainer(cfg, seed, stages, data).train_all()
        ctx = {"seed": seed, "models": models, "test_x": data.test_x, "test_y": data.test_y,
               "val_x": data.val_x, "val_y": data.val_y}
        return {"models": summary}, ctx

    def cells(self, cfg: StudyConfig, seed: int) -> list[Cell]:
        out = [Cell(f"eval/{name}", {"kind": "eval", "name": name}) for name in model_names(cfg)]
        if cfg.attack.adaptive:
            out.append(Cell("adaptive", {"kind": "adaptive"}))
        out += [Cell(f"ablation/{name}", {"kind": "ablation", "name": name}) for name in ablation_names(cfg)]
        return out

    def run_cell(self, cfg: StudyConfig, ctx: dict, cell: Cell) -> dict:
        params = dict(cell.params)
        run = CELL_KINDS[params.pop("kind")]
        x = ctx["test_x"]
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(cell_seed(ctx["seed"], cell.key))
            return run(cfg, ctx, **params)

    def cell_complete(self, cfg: StudyConfig, cell: Cell, record: dict) -> bool:
        """A record written before an attack joined the study lacks it and is recomputed."""
        kind = cell.params["kind"]
        if kind == "eval":
            return set(ATTACKS) <= set(record.get("robust", {}))
        if kind == "ablation":
            return {k for k in ABLATION_ATTACKS if cfg.attack.runs(k)} <= set(record)
        return True

    def seed_result(self, cfg: StudyConfig, seed: int, summary: dict, records: dict[str, dict]) -> dict:
        result = {"seed": seed, "models": summary["models"],
                  "evaluation": {name: records[f"eval/{name}"] for name in model_names(cfg)}}
        if cfg.attack.adaptive:
            result["adaptive"] = records["adaptive"]
        if ablation_names(cfg):
            result["ablation"] = {"eps": cfg.ablation_eps()[0],
                                  "rows": {name: records[f"ablation/{name}"] for name in ablation_names(cfg)}}
        return result

    def aggregate(self, cfg: StudyConfig, per_seed: list[dict]) -> dict:
        keys = ["models", "evaluation"] + [k for k in ("adaptive", "ablation") if k in per_seed[0]]
        agg = {k: aggregate_seeds([r[k] for r in per_seed]) for k in keys}
        return {"eps": cfg.attack.eps, "eps_values": cfg.eps_values(), **agg, "adaptive_done": "adaptive" in agg}

    def report(self, cfg: StudyConfig, results: dict, root: Path) -> str:
        return write_report(cfg, results, root)


SPEC = SQSpec()
