"""The study's units of work, each one cell of the grid: a model's evaluation under every attack and
budget (with the adversarial information plane and the MI detector for SQ models), the adaptive attack
on the SQ+MI model's detector, and one ablation variant's row. Each takes the study config, the seed's
context (``spec.prepare``) and its own parameters, and returns the record the old per-seed code stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from qrobust.attacks.evasion import make_evasion_attack
from qrobust.defenses.detection import MIDetector, auroc, information_plane
from qrobust.metrics import predict_logits, tie_rate
from qrobust.quant.sq_model import has_quantizers
from qrobust.quant.stochastic import (
    StochasticQuantizer,
    correct_per_draw,
    diversity_stats,
    ensemble_stats,
    stochastic_quantizers,
)
from qrobust.studies.sq.attacks import ABLATION_ATTACKS, ATTACKS, Deployed, Target, run_attack
from qrobust.studies.sq.config import StudyConfig, budget

_DETECTOR_KEYS = ("auroc", "auroc_successful", "detection_rate", "adv_mi")


def detector_auroc(clean: Tensor, adv: Tensor, direction: str) -> float:
    """AUROC of the MI detector (``direction`` = which side it flags): 1 = perfect, 0.5 = chance."""
    return auroc(clean, adv) if direction == "above" else auroc(-clean, -adv)


def _per_sq(model, value: Callable[[StochasticQuantizer], Any]) -> dict[str, Any]:
    """``value(sq)`` for every SQ of ``model``, by module name (``"input"`` for a bare SQ)."""
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(sq)] or "input": value(sq) for sq in stochastic_quantizers(model)}


def sq_gap_ratios(model) -> dict[str, list[float]]:
    """Per SQ (by module name): its learned bin gaps over the configured uniform gap, ``g_k / g_0`` -- the
    quantizer's local gain relative to a uniform one (the quantity the spacing regulariser keeps near 1)."""
    return _per_sq(model, lambda sq: (sq.gaps() / sq.config.nominal_gap).tolist())


def sq_shifts(model) -> dict[str, float]:
    """Per SQ (by module name): its learned grid offset over the configured range, ``shift / (high -
    low)`` (the spacing regulariser's second term keeps it near 0; negative = bins moved down)."""
    return _per_sq(model, lambda sq: (sq.shift / (sq.config.high - sq.config.low)).item())


def sq_first_boundaries(model) -> dict[str, float]:
    """Per SQ (by module name): how far above the low end of its range the first rounding boundary lies,
    ``(b_0 + b_1) / 2 - low`` (for the input SQ in pixel units: the smallest l_inf change that can move a
    black pixel to the next bin when the SQ rounds; a sampling SQ moves it with a probability that grows
    as the change nears the boundary)."""
    def boundary(sq: StochasticQuantizer) -> float:
        b = sq.bin_centres()
        return ((b[0] + b[1]) / 2 - sq.config.low).item()

    return _per_sq(model, boundary)


def sq_grid(model) -> dict[str, dict]:
    """The record keys of every SQ's learned grid: ``sq_gaps``, ``sq_shift`` and ``sq_first_boundary``."""
    return {"sq_gaps": sq_gap_ratios(model), "sq_shift": sq_shifts(model),
            "sq_first_boundary": sq_first_boundaries(model)}


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
    val_mi = ensemble_stats(model.raw, ctx["val_x"], None, n, a.batch_size).mi
    return MIDetector(fpr=a.detector_fpr, n_draws=n, direction=a.detector_direction).fit_scores(val_mi), val_mi


def counts(correct: Tensor) -> tuple[float, float]:
    """``(accuracy_expected, accuracy_strict)`` of per-evaluation correctness ``[E, B]``: the mean over the
    ``E`` evaluations of the deployed model (and the images), and the share of images correct on all of
    them. One rule for every model: a deterministic model's evaluations agree, so both are its accuracy."""
    return correct.float().mean().item(), correct.all(0).float().mean().item()


def _record_counts(out: dict, key: str, correct: Tensor) -> None:
    expected, strict = counts(correct)
    out["accuracy_expected"][key], out["accuracy_strict"][key] = expected, strict


def evaluate_model(cfg: StudyConfig, ctx: dict, name: str) -> dict:
    """Clean and robust accuracy per attack and eps, counted one way for every model (:func:`counts`:
    ``attack.draws`` evaluations of the deployed model, an image robust in an evaluation when it is
    correct clean and attacked in it); the worst case per image over the attacks (robust only if it
    survives every attack); for SQ models the diversity of the draws, the learned bin gaps, the AIP rows
    and the detector's metrics."""
    a = cfg.attack
    t = target(cfg, ctx, name)
    model, x, y = t.model, t.x, t.y
    draws = a.draws  # the same number of evaluations for deterministic and randomised models
    clean = correct_per_draw(model.net, x, y, draws, a.batch_size)  # [E, B]
    clean_ok = clean.all(0)
    out: dict[str, Any] = {"clean_acc_all_draws": clean_ok.float().mean().item(),
                           "tie_rate": _tie_rate(model, x, a.batch_size), "robust": {}, "adv_acc": {},
                           "accuracy_expected": {"clean": clean.float().mean().item(), "attacks": {}, "worst": {}},
                           "accuracy_strict": {"clean": clean_ok.float().mean().item(), "attacks": {}, "worst": {}}}
    has_twin = has_quantizers(model.raw if model.randomised else model.net)
    attacks = [k for k in ATTACKS if a.runs(k) and (k != "eot-pgd" or model.randomised)
               and (k != "bpda" or has_twin)]
    cache: dict[str, dict[float, Tensor]] = {k: {} for k in attacks}
    survived = {spec: clean.clone() for spec in a.eps}  # per evaluation and image: survived every attack so far
    if model.randomised:
        n_draws = model.net.n_draws
        ens_ok, _, clean_mi = ensemble_stats(model.raw, x, y, n_draws, a.batch_size)
        det, val_mi = _detector(cfg, ctx, model)
        out["clean_acc"] = ens_ok.float().mean().item()
        out["diversity"] = diversity_stats(model.raw, x, n_draws, a.batch_size)
        out |= sq_grid(model.raw)
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
            robust = clean & correct_per_draw(model.net, x_adv, y, draws, a.batch_size)
            survived[spec] &= robust
            expected, strict = counts(robust)
            out["robust"].setdefault(attack, {})[spec] = strict
            out["accuracy_expected"]["attacks"].setdefault(attack, {})[spec] = expected
            out["accuracy_strict"]["attacks"].setdefault(attack, {})[spec] = strict
            if model.randomised:
                ok, _, mi = ensemble_stats(model.raw, x_adv, y, n_draws, a.batch_size)
                out["adv_acc"].setdefault(attack, {})[spec] = ok.float().mean().item()
                d = out["detector"]
                d["auroc"].setdefault(attack, {})[spec] = detector_auroc(clean_mi, mi, a.detector_direction)
                # successful attacks on clean-correct images vs the clean-correct images themselves
                hit = ens_ok & ~ok
                d["auroc_successful"].setdefault(attack, {})[spec] = (
                    detector_auroc(clean_mi[ens_ok], mi[hit], a.detector_direction) if hit.any() and ens_ok.any()
                    else float("nan"))
                d["detection_rate"].setdefault(attack, {})[spec] = det.flag(mi).float().mean().item()
                d["adv_mi"].setdefault(attack, {})[spec] = mi.mean().item()
            else:
                out["adv_acc"].setdefault(attack, {})[spec] = strict
    for spec in a.eps:
        _record_counts({"accuracy_expected": out["accuracy_expected"]["worst"],
                        "accuracy_strict": out["accuracy_strict"]["worst"]}, spec, survived[spec])
    copies = []
    if not model.randomised:  # EOT over draws of a deterministic model is PGD itself
        copies.append(("eot-pgd", "pgd"))
    if not has_twin:  # a model without quantizers is its own float twin: BPDA is PGD
        copies.append(("bpda", "pgd"))
    for copy_to, source in copies:
        for key in ("robust", "adv_acc"):
            out[key][copy_to] = dict(out[key][source])
        for key in ("accuracy_expected", "accuracy_strict"):
            out[key]["attacks"][copy_to] = dict(out[key]["attacks"][source])
        if model.randomised:
            for key in _DETECTOR_KEYS:
                out["detector"][key][copy_to] = dict(out["detector"][key][source])
    if model.randomised:
        out["aip"] = {
            attack: information_plane(model.raw, x, y, lambda m, xs, ys, e, lookup=cache[attack]: lookup[e],
                                      [0.0] + sorted(cache[attack]), n_draws=n_draws, batch_size=a.batch_size)
            for attack in ("fgsm", "pgd", "eot-pgd")
        }
    for off in [k for k in ATTACKS if not a.runs(k)]:  # switched off (Square: or an L2 budget): n/a
        out["robust"][off] = {spec: float("nan") for spec in a.eps}
        out["adv_acc"][off] = {spec: float("nan") for spec in a.eps}
        for key in ("accuracy_expected", "accuracy_strict"):
            out[key]["attacks"][off] = {spec: float("nan") for spec in a.eps}
        if model.randomised:
            for key in _DETECTOR_KEYS:
                out["detector"][key][off] = {spec: float("nan") for spec in a.eps}
    return out


def adaptive(cfg: StudyConfig, ctx: dict) -> dict:
    """Adaptive EOT-PGD on the sq-mi model and its detector, vs the non-adaptive EOT-PGD, at one eps."""
    a = cfg.attack
    model = ctx["models"]["sq-mi"]
    spec, eps = cfg.adaptive_eps()
    x, y, n = ctx["test_x"], ctx["test_y"], model.net.n_draws
    det = _detector(cfg, ctx, model)[0]
    clean_ok, _, clean_mi = ensemble_stats(model.raw, x, y, n, a.batch_size)
    gen = torch.Generator(device=x.device).manual_seed(ctx["seed"] * 1000 + 29)
    sign = 1.0 if a.detector_direction == "above" else -1.0
    out = {"eps": spec, "lambda": a.adaptive_lambda, "threshold": det.threshold}
    for label, lam in (("eot-pgd", 0.0), ("adaptive", a.adaptive_lambda)):
        attack = make_evasion_attack("mi-adaptive-pgd", n_draws=n, steps=a.steps, eot=a.eot, lam=lam, sign=sign)
        x_adv = torch.cat([attack(model.raw, x[s : s + a.batch_size], y[s : s + a.batch_size], eps=eps, generator=gen)
                           for s in range(0, len(y), a.batch_size)])
        ok, _, mi = ensemble_stats(model.raw, x_adv, y, n, a.batch_size)
        flagged = det.flag(mi)
        robust = (correct_per_draw(model.net, x, y, a.draws, a.batch_size)
                  & correct_per_draw(model.net, x_adv, y, a.draws, a.batch_size))
        expected, strict = counts(robust)
        hit = clean_ok & ~ok
        out[label] = {
            "robust_acc": strict,
            "accuracy_expected": expected,
            "accuracy_strict": strict,
            "auroc_successful": (detector_auroc(clean_mi[clean_ok], mi[hit], a.detector_direction)
                                 if hit.any() and clean_ok.any() else float("nan")),
            "adv_acc": ok.float().mean().item(),
            "detection_rate": flagged.float().mean().item(),
            "auroc": detector_auroc(clean_mi, mi, a.detector_direction),
            "mean_mi": mi.mean().item(),
            # the attacker's goal: misclassified and not flagged (among clean-correct inputs)
            "undetected_success": ((~ok) & (~flagged) & clean_ok).float().mean().item(),
        }
    return out


def ablation_row(cfg: StudyConfig, ctx: dict, name: str) -> dict:
    """Clean accuracy, the draws' diversity (:func:`diversity_stats`), every SQ's learned grid
    (:func:`sq_grid`: what the spacing term acts on) and robust accuracy (PGD, EOT-PGD and the checks
    APGD-CE / BPDA / Square; strict per attack, both counts for the clean images and the per-image worst
    case) of SQ+MI variant ``name`` at the ablation's eps."""
    a = cfg.attack
    eps = cfg.ablation_eps()[1]
    t = target(cfg, ctx, name)
    model, x, y = t.model, t.x, t.y
    ok, _, mi = ensemble_stats(model.raw, x, y, model.net.n_draws, a.batch_size)
    clean = correct_per_draw(model.net, x, y, a.draws, a.batch_size)
    row = {"clean_acc": ok.float().mean().item(), "clean_mi": mi.mean().item(),
           "diversity": diversity_stats(model.raw, x, model.net.n_draws, a.batch_size), **sq_grid(model.raw)}
    survived = clean.clone()
    for attack in [k for k in ABLATION_ATTACKS if a.runs(k)]:
        x_adv = run_attack(attack, t, eps)
        robust = clean & correct_per_draw(model.net, x_adv, y, a.draws, a.batch_size)
        survived &= robust
        row[attack] = counts(robust)[1]
    row["accuracy_expected"], row["accuracy_strict"] = ({"clean": c, "worst": w}
                                                        for c, w in zip(counts(clean), counts(survived), strict=True))
    return row
