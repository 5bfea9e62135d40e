"""The study's units of work, each one cell of the grid: a model's evaluation under every attack and
budget (with the adversarial information plane and the MI detector for SQ models), the adaptive attack
on the SQ+MI model's detector, and one ablation variant's row. Each takes the study config, the seed's
context (``spec.prepare``) and its own parameters, and returns the record the old per-seed code stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qrobust.attacks.adaptive import mi_adaptive_pgd
from qrobust.defenses.detection import MIDetector, auroc, information_plane
from qrobust.metrics import predict_logits, tie_rate
from qrobust.quant.sq_model import has_quantizers
from qrobust.quant.stochastic import correct_on_all_draws, ensemble_stats
from qrobust.studies.sq.attacks import ABLATION_ATTACKS, ATTACKS, Deployed, Target, run_attack
from qrobust.studies.sq.config import StudyConfig, budget

_DETECTOR_KEYS = ("auroc", "detection_rate", "adv_mi")


def detector_auroc(clean: Tensor, adv: Tensor, direction: str) -> float:
    """AUROC of the MI detector (``direction`` = which side it flags): 1 = perfect, 0.5 = chance."""
    return auroc(clean, adv) if direction == "above" else auroc(-clean, -adv)


def target(cfg: StudyConfig, ctx: dict, name: str) -> Target:
    """Model ``name`` of the seed's context as the attacks' target."""
    return Target(ctx["models"][name], cfg.attack, ctx["test_x"], ctx["test_y"], ctx["seed"],
                  ctx["models"]["fp32"].net)


def _tie_rate(model: Deployed, x: Tensor, batch_size: int) -> float:
    """Tie rate of the deployed output (an SQ model: its ensemble's mean probabilities, one evaluation);
    the global RNG is left as it was, so the attacks that follow draw the same SQ noise."""
    with torch.random.fork_rng(devices=[]):
        return tie_rate(predict_logits(model.net, x, batch_size))


def _detector(cfg: StudyConfig, ctx: dict, model: Deployed) -> tuple[MIDetector, Tensor]:
    """The MI detector of an SQ model, its threshold set on the clean validation images, and their MI."""
    a, n = cfg.attack, model.net.n_draws
    val_mi = ensemble_stats(model.raw, ctx["val_x"], ctx["val_y"], n, a.batch_size)[1]
    return MIDetector(fpr=a.detector_fpr, n_draws=n, direction=a.detector_direction).fit_scores(val_mi), val_mi


def evaluate_model(cfg: StudyConfig, ctx: dict, name: str) -> dict:
    """Clean and robust accuracy per attack and eps; for SQ models the AIP rows and detector metrics."""
    a = cfg.attack
    t = target(cfg, ctx, name)
    model, x, y = t.model, t.x, t.y
    draws = a.draws if model.randomised else 1
    clean_ok = correct_on_all_draws(model.net, x, y, draws, a.batch_size)
    out: dict[str, Any] = {"clean_acc_all_draws": clean_ok.float().mean().item(),
                           "tie_rate": _tie_rate(model, x, a.batch_size), "robust": {}, "adv_acc": {}}
    has_twin = has_quantizers(model.raw if model.randomised else model.net)
    attacks = [k for k in ATTACKS if a.runs(k) and (k != "eot-pgd" or model.randomised)
               and (k != "bpda" or has_twin)]
    cache: dict[str, dict[float, Tensor]] = {k: {} for k in attacks}
    if model.randomised:
        n_draws = model.net.n_draws
        ens_ok, clean_mi = ensemble_stats(model.raw, x, y, n_draws, a.batch_size)
        det, val_mi = _detector(cfg, ctx, model)
        out["clean_acc"] = ens_ok.float().mean().item()
        out["detector"] = {
            "threshold": det.threshold, "direction": det.direction,
            "fpr_val": det.flag(val_mi).float().mean().item(), "fpr_test": det.flag(clean_mi).float().mean().item(),
            "clean_mi": clean_mi.mean().item(), **{k: {} for k in _DETECTOR_KEYS},
        }
    else:
        out["clean_acc"] = out["clean_acc_all_draws"]
    for attack in attacks:
        for spec in a.eps:
            eps = budget(spec, a.norm, "attack.eps")
            x_adv = cache[attack][eps] = run_attack(attack, t, eps)
            robust = clean_ok & correct_on_all_draws(model.net, x_adv, y, draws, a.batch_size)
            out["robust"].setdefault(attack, {})[spec] = robust.float().mean().item()
            if model.randomised:
                ok, mi = ensemble_stats(model.raw, x_adv, y, n_draws, a.batch_size)
                out["adv_acc"].setdefault(attack, {})[spec] = ok.float().mean().item()
                d = out["detector"]
                d["auroc"].setdefault(attack, {})[spec] = detector_auroc(clean_mi, mi, a.detector_direction)
                d["detection_rate"].setdefault(attack, {})[spec] = det.flag(mi).float().mean().item()
                d["adv_mi"].setdefault(attack, {})[spec] = mi.mean().item()
            else:
                out["adv_acc"].setdefault(attack, {})[spec] = robust.float().mean().item()
    if not model.randomised:  # EOT over draws of a deterministic model is PGD itself
        out["robust"]["eot-pgd"] = dict(out["robust"]["pgd"])
        out["adv_acc"]["eot-pgd"] = dict(out["adv_acc"]["pgd"])
    else:
        out["aip"] = {
            attack: information_plane(model.raw, x, y, lambda m, xs, ys, e, lookup=cache[attack]: lookup[e],
                                      [0.0] + sorted(cache[attack]), n_draws=n_draws, batch_size=a.batch_size)
            for attack in ("fgsm", "pgd", "eot-pgd")
        }
    for off in [k for k in ATTACKS if not a.runs(k)]:  # switched off (Square: or an L2 budget): n/a
        out["robust"][off] = {spec: float("nan") for spec in a.eps}
        out["adv_acc"][off] = {spec: float("nan") for spec in a.eps}
        if model.randomised:
            for key in _DETECTOR_KEYS:
                out["detector"][key][off] = {spec: float("nan") for spec in a.eps}
    if not has_twin:  # a model without quantizers is its own float twin: BPDA is PGD
        for key in ("robust", "adv_acc"):
            out[key]["bpda"] = dict(out[key]["pgd"])
        if model.randomised:
            for key in _DETECTOR_KEYS:
                out["detector"][key]["bpda"] = dict(out["detector"][key]["pgd"])
    return out


def adaptive(cfg: StudyConfig, ctx: dict) -> dict:
    """Adaptive EOT-PGD on the sq-mi model and its detector, vs the non-adaptive EOT-PGD, at one eps."""
    a = cfg.attack
    model = ctx["models"]["sq-mi"]
    spec, eps = cfg.adaptive_eps()
    x, y, n = ctx["test_x"], ctx["test_y"], model.net.n_draws
    det = _detector(cfg, ctx, model)[0]
    clean_ok, clean_mi = ensemble_stats(model.raw, x, y, n, a.batch_size)
    gen = torch.Generator(device=x.device).manual_seed(ctx["seed"] * 1000 + 29)
    sign = 1.0 if a.detector_direction == "above" else -1.0
    out = {"eps": spec, "lambda": a.adaptive_lambda, "threshold": det.threshold}
    for label, lam in (("eot-pgd", 0.0), ("adaptive", a.adaptive_lambda)):
        x_adv = torch.cat([
            mi_adaptive_pgd(model.raw, x[s : s + a.batch_size], y[s : s + a.batch_size], eps, n_draws=n,
                            steps=a.steps, eot=a.eot, lam=lam, sign=sign, generator=gen)
            for s in range(0, len(y), a.batch_size)
        ])
        ok, mi = ensemble_stats(model.raw, x_adv, y, n, a.batch_size)
        flagged = det.flag(mi)
        robust = (correct_on_all_draws(model.net, x, y, a.draws, a.batch_size)
                  & correct_on_all_draws(model.net, x_adv, y, a.draws, a.batch_size))
        out[label] = {
            "robust_acc": robust.float().mean().item(),
            "adv_acc": ok.float().mean().item(),
            "detection_rate": flagged.float().mean().item(),
            "auroc": detector_auroc(clean_mi, mi, a.detector_direction),
            "mean_mi": mi.mean().item(),
            # the attacker's goal: misclassified and not flagged (among clean-correct inputs)
            "undetected_success": ((~ok) & (~flagged) & clean_ok).float().mean().item(),
        }
    return out


def ablation_row(cfg: StudyConfig, ctx: dict, name: str) -> dict:
    """Clean accuracy, MI and robust accuracy (PGD, EOT-PGD and the checks APGD-CE / BPDA / Square) of
    SQ+MI variant ``name`` at the ablation's eps."""
    a = cfg.attack
    eps = cfg.ablation_eps()[1]
    t = target(cfg, ctx, name)
    model, x, y = t.model, t.x, t.y
    ok, mi = ensemble_stats(model.raw, x, y, model.net.n_draws, a.batch_size)
    clean = correct_on_all_draws(model.net, x, y, a.draws, a.batch_size)
    row = {"clean_acc": ok.float().mean().item(), "clean_mi": mi.mean().item()}
    for attack in [k for k in ABLATION_ATTACKS if a.runs(k)]:
        x_adv = run_attack(attack, t, eps)
        row[attack] = (clean & correct_on_all_draws(model.net, x_adv, y, a.draws, a.batch_size)).float().mean().item()
    return row
