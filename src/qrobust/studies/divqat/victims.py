"""One seed's victims and defenses: the trained-model stages (float, plain QAT per backend, DivQAT per
alpha, each its own resumable run folder ``models/<name>``), DivQAT's operating point, and the
calibrated output defenses."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

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
from qrobust.runs import atomic_torch_save, safe_load
from qrobust.studies.divqat.config import (
    StudyConfig,
    alpha_tag,
    operating_point_name,
    sweep_alphas,
    victim_names,
)
from qrobust.studies.divqat.data import SeedData, build_model
from qrobust.train.divqat import DivQATLoss, check_divqat_accuracy, mean_kl_to_float
from qrobust.train.objectives import CrossEntropy, Objective


def train_section(cfg: StudyConfig, epochs: int, lr: float, warmup: float) -> TrainSection:
    return TrainSection(epochs=epochs, batch_size=cfg.fp.batch_size, lr=lr, warmup_epochs=warmup, device=cfg.device)


def fit_victim(stages: Stages, cfg: StudyConfig, data: SeedData, name: str, model: nn.Module, objective: Objective,
               train: TrainSection, describe: dict, teacher: nn.Module | None = None,
               snapshots: bool = False) -> nn.Module:
    """Train ``model`` in its own run folder, or load it when that run is complete (in the memory format
    training leaves: ``Stages.fit``); eval mode. With a ``teacher``, every epoch also records validation
    accuracy and mean ``KL(f_q || f_fp)`` on the validation images; with ``snapshots`` each epoch's weights
    and those two numbers are kept as ``epoch-<e>.pt`` in the run folder (the operating-point search)."""
    device = stages.device
    folder = stages.root / "models" / name
    checkpoint = folder / "checkpoint.pt"
    epoch = [safe_load(checkpoint)["epoch"] if snapshots and checkpoint.is_file() else 0]  # epochs done

    def evaluate(m: nn.Module) -> dict:
        row = {"test_acc": accuracy(m, data.test_x, data.test_y, 512, device)}
        if isinstance(objective, DivQATLoss):
            row |= objective.pop_epoch_stats()
        if teacher is not None:
            row["test_kl_to_fp"] = mean_kl_to_float(m, teacher, data.test_x)
            row["val_acc"] = accuracy(m, data.val_x, data.val_y, 512, device)
            row["val_kl_to_fp"] = mean_kl_to_float(m, teacher, data.val_x)
        if snapshots:
            epoch[0] += 1
            atomic_torch_save({"epoch": epoch[0], "model": m.state_dict(), "val_acc": row["val_acc"],
                               "val_kl_to_fp": row["val_kl_to_fp"]}, folder / f"epoch-{epoch[0]}.pt")
        return row

    return stages.fit(name, model, objective, train, describe,
                      lambda: data.loader(cfg, train.batch_size, stages.seed, device), evaluate,
                      extra_state={"stage": name})[0]


def epoch_snapshots(stages: Stages, name: str, epochs: int) -> list[dict]:
    """The ``epoch-<e>.pt`` records of DivQAT run ``name`` (epochs 1..``epochs``), loaded safely."""
    return [safe_load(stages.root / "models" / name / f"epoch-{e}.pt") for e in range(1, epochs + 1)]


def operating_point_checkpoint(seed_root: Path, cfg: StudyConfig, point: dict, hinge: bool = False) -> Path:
    """The epoch snapshot an operating point names (``models/divqat-[hinge-]<alpha>-<backend>/epoch-<e>.pt``
    in a seed's folder)."""
    name = f"divqat-{'hinge-' if hinge else ''}{alpha_tag(point['alpha'])}-{cfg.divqat.backend}"
    return Path(seed_root) / "models" / name / f"epoch-{point['epoch']}.pt"


def select_operating_point(candidates: list[dict], acc_qat: float, kl_qat: float, max_acc_cost: float) -> dict:
    """DivQAT's operating point: of ``candidates`` (dicts with ``alpha``, ``epoch``, ``acc`` and ``kl`` on
    validation images), the one with the largest ``kl`` whose ``acc`` is within ``max_acc_cost`` points of
    plain QAT's ``acc_qat`` (the paper's operating point is such an accuracy cost, 3.66 points).

    Returns ``{alpha, epoch, kl, kl_qat, acc, acc_qat, within_cost}``. When no candidate is within the
    cost, the most accurate one is returned with ``within_cost`` False (the report says so). Ties in
    ``kl`` go to the smaller alpha, then the earlier epoch."""
    if not candidates:
        raise ValueError("select_operating_point needs at least one candidate")
    floor = acc_qat - max_acc_cost / 100
    admissible = [c for c in candidates if math.isfinite(c["kl"]) and c["acc"] >= floor - 1e-12]
    if admissible:
        best = max(admissible, key=lambda c: (c["kl"], -c["alpha"], -c["epoch"]))
    else:
        best = max(candidates, key=lambda c: (c["acc"], -c["alpha"], -c["epoch"]))
    return {"alpha": best["alpha"], "epoch": best["epoch"], "kl": best["kl"], "kl_qat": kl_qat, "acc": best["acc"],
            "acc_qat": acc_qat, "within_cost": bool(admissible)}


def train_victims(cfg: StudyConfig, stages: Stages, data: SeedData) -> tuple[dict[str, nn.Module], dict, dict]:
    """Every victim (trained or loaded), ``victims.json`` (kind, backend, alpha, test accuracy, tie rate
    and mean ``KL(f_q || f_fp)`` on the test images) and, with ``divqat.search_alphas``, the operating
    point: ``{"divqat_operating_point": select_operating_point(...), "divqat_sweep": [{alpha, epoch,
    acc, kl}, ...]}`` (validation images; also ``divqat_sweep.json``), and with ``divqat.hinge_cap > 0``
    the same for the beyond-paper hinge variant (``divqat_hinge_...``, victim ``divqat-hinge-op-...``),
    else ``{}``. A paper-alpha DivQAT
    victim that lost more than ``divqat.max_acc_drop`` vs plain QAT of its backend stops the study (its
    folder is kept)."""
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
    search = bool(d.search_alphas)
    variants = [("", None)] + ([("hinge-", d.hinge_cap)] if search and d.hinge_cap > 0 else [])
    extra: dict = {}
    for tag, cap in variants:
        sweep: list[dict] = []
        for alpha in sweep_alphas(cfg):
            torch.manual_seed(seed)
            q = quantize(fp, QuantConfig(cfg.qat.bits, cfg.qat.bits, backend=d.backend))
            name = f"divqat-{tag}{alpha_tag(alpha)}-{d.backend}"
            paper = alpha in d.alphas and cap is None
            # paper alphas: the same collapse check and threshold in training (vs the teacher) and after it
            # (vs QAT); search alphas (and the variant) are meant to find the collapse: no guard
            objective = DivQATLoss(fp, alpha, teacher_floor=d.teacher_floor,
                                   max_acc_drop=d.max_acc_drop if paper else None, kl_cap=cap)
            model = fit_victim(stages, cfg, data, name, q, objective, div_train,
                               {"backend": d.backend, **QAT_EDGES}, teacher=fp, snapshots=search)
            if paper:
                models[name] = model
                info[name] = {"kind": "divqat", "backend": d.backend, "alpha": alpha}
            if search:
                sweep += [{"alpha": alpha, "epoch": r["epoch"], "acc": r["val_acc"], "kl": r["val_kl_to_fp"]}
                          for r in epoch_snapshots(stages, name, d.epochs)]
        if not search:
            continue
        qat = models[f"qat-{d.backend}"]
        point = select_operating_point(
            sweep, accuracy(qat, data.val_x, data.val_y, 512, device), mean_kl_to_float(qat, fp, data.val_x),
            d.max_acc_cost)
        name = operating_point_name(cfg, hinge=cap is not None)
        q = quantize(fp, QuantConfig(cfg.qat.bits, cfg.qat.bits, backend=d.backend))
        q.load_state_dict(safe_load(operating_point_checkpoint(stages.root, cfg, point, hinge=cap is not None))["model"])
        models[name] = q.to(device).eval()
        info[name] = {"kind": f"divqat-{tag}op", "backend": d.backend, "alpha": point["alpha"],
                      "epoch": point["epoch"], **({"kl_cap": cap} if cap is not None else {})}
        key = "divqat_hinge" if cap is not None else "divqat"
        extra |= {f"{key}_operating_point": point, f"{key}_sweep": sweep}
    for name, meta in info.items():
        clean = accuracy_and_tie_rate(models[name], data.test_x, data.test_y, 512, device)
        meta["test_acc"], meta["tie_rate"] = clean["acc"], clean["tie_rate"]
        if name != "fp32":
            meta["kl_to_fp"] = mean_kl_to_float(models[name], fp, data.test_x)
    for name, meta in info.items():
        if meta["kind"] == "divqat":  # (the operating point is within its own cost, or says it is not)
            check_divqat_accuracy(meta["test_acc"], info[f"qat-{meta['backend']}"]["test_acc"],
                                  alpha=meta["alpha"], max_drop=d.max_acc_drop,
                                  where=str(stages.root / "models" / name))
    stages.write_json("victims.json", info)
    if extra:
        stages.write_json("divqat_sweep.json", extra)
    return models, info, extra


def output_defense(name: str, params: dict):
    """The defense applied to every answer of a victim (``None`` for ``"none"``)."""
    return None if name == "none" else make_defense(name, **params)


def calibrate_defenses(cfg: StudyConfig, models: dict[str, nn.Module], data: SeedData, device: torch.device) -> dict:
    """Each defense calibrated per attacked victim to its strongest parameter with mean l1 <=
    ``defense.l1_budget`` on the validation probabilities; l1, defender accuracy, ECE (15 bins) and NLL of
    the answers served on the test images (what a user who needs calibrated probabilities pays).
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
                                  "defender_acc": victim.accuracy(data.test_x, data.test_y),
                                  **victim.calibration(data.test_x, data.test_y, bins=15)}
            message = defense_accuracy_warning(f"{defense} on victim {name}", out[name]["none"]["defender_acc"],
                                               out[name][defense]["defender_acc"])
            if message:  # also listed in results.md (report.defense_warnings)
                warnings.warn(message, DefenseAccuracyWarning, stacklevel=2)
    return out
