"""One seed's victims and defenses: the trained-model stages (float, plain QAT per backend, DivQAT per
alpha, each its own resumable run folder ``models/<name>``) and the calibrated output defenses."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qrobust.attacks.extraction.victim import Victim
from qrobust.config import TrainSection
from qrobust.defenses.output import (
    DefenseAccuracyWarning,
    calibrate_defense,
    defense_accuracy_warning,
    make_defense,
)
from qrobust.experiment import QAT_EDGES, Stages
from qrobust.metrics import accuracy, accuracy_and_tie_rate, predict_logits
from qrobust.quant import QuantConfig, quantize
from qrobust.studies.divqat.config import StudyConfig, alpha_tag, victim_names
from qrobust.studies.divqat.data import SeedData, build_model
from qrobust.train.divqat import DivQATLoss, check_divqat_accuracy, mean_kl_to_float
from qrobust.train.objectives import CrossEntropy, Objective


def train_section(cfg: StudyConfig, epochs: int, lr: float, warmup: float) -> TrainSection:
    return TrainSection(epochs=epochs, batch_size=cfg.fp.batch_size, lr=lr, warmup_epochs=warmup, device=cfg.device)


def fit_victim(stages: Stages, cfg: StudyConfig, data: SeedData, name: str, model: nn.Module, objective: Objective,
               train: TrainSection, describe: dict, teacher: nn.Module | None = None) -> nn.Module:
    """Train ``model`` in its own run folder, or load it when that run is complete (in the memory format
    training leaves: ``Stages.fit``); eval mode."""
    device = stages.device

    def evaluate(m: nn.Module) -> dict:
        row = {"test_acc": accuracy(m, data.test_x, data.test_y, 512, device)}
        if isinstance(objective, DivQATLoss):
            row |= objective.pop_epoch_stats()
        if teacher is not None:
            row["test_kl_to_fp"] = mean_kl_to_float(m, teacher, data.test_x)
        return row

    return stages.fit(name, model, objective, train, describe,
                      lambda: data.loader(cfg, train.batch_size, stages.seed, device), evaluate,
                      extra_state={"stage": name})[0]


def train_victims(cfg: StudyConfig, stages: Stages, data: SeedData) -> tuple[dict[str, nn.Module], dict]:
    """Every victim (trained or loaded) and ``victims.json``: kind, backend, alpha, test accuracy, tie rate
    and mean ``KL(f_q || f_fp)`` on the test images. A DivQAT victim that lost more than
    ``divqat.max_acc_drop`` vs plain QAT of its backend stops the study (its folder is kept)."""
    seed, device = stages.seed, stages.device
    torch.manual_seed(seed)
    fp = fit_victim(stages, cfg, data, "fp32", build_model(cfg, cfg.model.arch, data.info), CrossEntropy(),
                    train_section(cfg, cfg.fp.epochs, cfg.fp.lr, 0.5), {})
    models = {"fp32": fp}
    info = {"fp32": {"kind": "float", "backend": "", "alpha": 0.0, "kl_to_fp": 0.0}}
    qat_train = train_section(cfg, cfg.qat.epochs, cfg.qat.lr, 0.0)
    for backend in cfg.qat.backends:
        torch.manual_seed(seed)
        q = quantize(fp, QuantConfig(cfg.qat.bits, cfg.qat.bits, backend=backend))
        name = f"qat-{backend}"
        models[name] = fit_victim(stages, cfg, data, name, q, CrossEntropy(), qat_train,
                                  {"backend": backend, **QAT_EDGES}, teacher=fp)
        info[name] = {"kind": "qat", "backend": backend, "alpha": 0.0}
    d = cfg.divqat
    div_train = train_section(cfg, d.epochs, d.lr, 0.0)
    for alpha in d.alphas:
        torch.manual_seed(seed)
        q = quantize(fp, QuantConfig(cfg.qat.bits, cfg.qat.bits, backend=d.backend))
        name = f"divqat-{alpha_tag(alpha)}-{d.backend}"
        # the same collapse check and threshold in training (vs the teacher) and after it (vs QAT)
        objective = DivQATLoss(fp, alpha, teacher_floor=d.teacher_floor, max_acc_drop=d.max_acc_drop)
        models[name] = fit_victim(stages, cfg, data, name, q, objective, div_train,
                                  {"backend": d.backend, **QAT_EDGES}, teacher=fp)
        info[name] = {"kind": "divqat", "backend": d.backend, "alpha": alpha}
    for name, meta in info.items():
        clean = accuracy_and_tie_rate(models[name], data.test_x, data.test_y, 512, device)
        meta["test_acc"], meta["tie_rate"] = clean["acc"], clean["tie_rate"]
        if name != "fp32":
            meta["kl_to_fp"] = mean_kl_to_float(models[name], fp, data.test_x)
    for name, meta in info.items():
        if meta["kind"] == "divqat":
            check_divqat_accuracy(meta["test_acc"], info[f"qat-{meta['backend']}"]["test_acc"],
                                  alpha=meta["alpha"], max_drop=d.max_acc_drop,
                                  where=str(stages.root / "models" / name))
    stages.write_json("victims.json", info)
    return models, info


def output_defense(name: str, params: dict):
    """The defense applied to every answer of a victim (``None`` for ``"none"``)."""
    return None if name == "none" else make_defense(name, **params)


def calibrate_defenses(cfg: StudyConfig, models: dict[str, nn.Module], data: SeedData, device: torch.device) -> dict:
    """Each defense calibrated per attacked victim to its strongest parameter with mean l1 <=
    ``defense.l1_budget`` on the validation probabilities; l1 and defender accuracy on the test images.
    A defense that leaves the defender below half the undefended accuracy warns (and is listed in
    results.md)."""
    dc = cfg.defense
    fixed = {"rs": {"gamma": dc.rs_gamma}, "dcp": {"gamma": dc.dcp_gamma, "nu": dc.dcp_nu}}
    out: dict = {}
    for name in victim_names(cfg):
        model = models[name]
        probs_val = torch.softmax(predict_logits(model, data.val_x, 512, device), dim=1)
        out[name] = {}
        for defense in dc.names:
            if defense == "none":
                params, l1 = {}, 0.0
            else:
                params, l1 = calibrate_defense(defense, probs_val, dc.l1_budget, fixed=fixed[defense])
            victim = Victim(model, defense=output_defense(defense, params), budget=0)
            out[name][defense] = {"params": params, "l1_val": l1, "l1_test": victim.mean_l1(data.test_x),
                                  "defender_acc": victim.accuracy(data.test_x, data.test_y)}
            message = defense_accuracy_warning(f"{defense} on victim {name}", out[name]["none"]["defender_acc"],
                                               out[name][defense]["defender_acc"])
            if message:  # also listed in results.md (report.defense_warnings)
                warnings.warn(message, DefenseAccuracyWarning, stacklevel=2)
    return out
