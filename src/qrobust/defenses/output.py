"""Output perturbation defenses: pure functions on a probability batch ``p`` of shape [B, K].

Every function here takes probabilities (rows non-negative, summing to 1, K >= 2) and returns a
probability batch of the same shape and dtype; it never sees the model, so it can wrap any victim
(see :class:`qrobust.attacks.extraction.victim.Victim`, which applies it to every answer).

Reverse sigmoid (RS), Lee et al. 2019, "Defending Against NN Model Stealing Attacks Using Deceptive
Perturbations" (IEEE S&P Workshops)::

    r(p)  = beta * (sigmoid(gamma * logit(p)) - 1/2)             (per class)
    y~    = normalize(max(p - r(p), 0))                          (normalize: divide by the row sum)

``logit(p) = log(p / (1 - p))`` is computed on ``p`` clamped to [1e-6, 1 - 1e-6]. (The reference code
clamps the odds ``p / (1 - p)`` to at most 1 instead, which sets the logit of every p > 1/2 to 0; we
do not repeat that.) Lee et al. normalise with a scalar alpha; a large beta can push the top class
below zero, so we clamp at 0 before normalising (the row sum stays positive: every class with p < 1/2
gets y > p, and K >= 2 rows always have one with p <= 1/2).

Does RS keep the argmax? Write f(p) = p - r(p) for one class. Then
``f'(p) = 1 - beta * gamma * cosh^2(l/2) / cosh^2(gamma*l/2)`` with ``l = logit(p)``:

* gamma >= 1: the ratio is largest (= 1) at p = 1/2, so f is strictly increasing on (0, 1) iff
  ``beta * gamma < 1``; then the argmax is kept for every input (normalising does not reorder).
  With ``beta * gamma > 1`` it can flip: gamma = 1 gives ``f(p) = (1 - beta) p + beta/2``, which is
  *decreasing* for beta > 1, so the argmax becomes the argmin.
* gamma < 1: the ratio grows without bound as p -> 0 or 1, so f is not monotone for any beta > 0 and a
  flip needs only a small enough top probability, i.e. enough classes. Worst cases found numerically
  (feasible pairs top > other): for K = 10, gamma = 0.2 the argmax is safe up to beta ~ 0.28; for
  K = 100 up to beta ~ 0.04. Typical softmax outputs rarely hit the worst case, but no guarantee holds.

DCP, the confidence-gated RS that DivQAT evaluates (reference code: KacemKhaled/defending-extraction,
``method_dcp``; the gate is the one of adaptive misinformation, Kariyappa & Qureshi 2020): RS applied
only to low-confidence answers::

    gate(p) = 1 / (1 + exp(nu * (max_k p_k - tau)))              (one scalar per row, in (0, 1))
    y~      = normalize(max(p - gate(p) * r(p), 0))

Our parameterisation: ``dcp(p, beta, gamma, nu=1000, threshold=None)``; ``threshold`` (tau) defaults
to ``beta``, i.e. the same number is the RS strength and the confidence threshold, exactly as in the
reference code and docs/DESIGN ("applied where max p < beta"), so one knob is calibrated against the l1
budget. Pass ``threshold`` to decouple them. With nu = 1000 the gate is a near-step: rows with
max p > tau + 0.01 are returned (almost) untouched. Because gate * beta <= beta, DCP keeps the argmax
wherever RS with the same (beta, gamma) does (f(top) - f(other) is affine in beta).

Simple baselines: ``rounding`` (largest-remainder rounding to ``decimals`` places, so the answer stays
on the 10^-decimals grid *and* sums to 1; ``decimals=0`` is the top-1 label), ``top_k`` (keep the k
largest, renormalise), ``label_only`` (one-hot of the argmax).

``make_defense(name, **params)`` validates the parameters (:class:`ConfigError`) and returns a callable;
``calibrate_defense`` finds the strongest parameter whose mean l1 distortion on validation
probabilities stays within a budget (DivQAT uses l1 <= 0.6).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qrobust.errors import ConfigError
from qrobust.registry import DEFENSES

_LOGIT_EPS = 1e-6  # clamp before logit: keeps logit finite for exact 0/1 probabilities
_MAX_DECIMALS = 12  # float64 rounding grid stays exact well below 1e-15


# --------------------------------------------------------------------------- parameter checks


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{name} must be {span}, got {value}")
    return value


def _check_probs(p: Tensor) -> None:
    if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[1] < 2 or not p.is_floating_point():
        shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
        raise ConfigError(f"expected a float probability batch of shape [B, K] with K >= 2, got {shape}")


def _check_none() -> dict[str, Any]:
    return {}


def _check_rs(beta: Any, gamma: Any) -> dict[str, Any]:
    return {"beta": _positive("beta", beta), "gamma": _positive("gamma", gamma)}


def _check_dcp(beta: Any, gamma: Any, nu: Any = 1000.0, threshold: Any = None) -> dict[str, Any]:
    params = _check_rs(beta, gamma)
    params["nu"] = _positive("nu", nu)
    if threshold is not None:
        threshold = _positive("threshold", threshold)
        if threshold > 1:
            raise ConfigError(f"threshold is a confidence in (0, 1], got {threshold}")
    params["threshold"] = threshold
    return params


def _check_round(decimals: Any) -> dict[str, Any]:
    return {"decimals": _integer("decimals", decimals, 0, _MAX_DECIMALS)}


def _check_topk(k: Any) -> dict[str, Any]:
    return {"k": _integer("k", k, 1)}


def _register(name: str, check: Callable[..., dict[str, Any]]) -> Callable[[Callable], Callable]:
    """Register a defense function under ``name`` and attach its parameter check."""

    def add(fn: Callable) -> Callable:
        fn.check_params = check  # type: ignore[attr-defined]
        return DEFENSES.register(name)(fn)

    return add


def _normalize(y: Tensor) -> Tensor:
    return y / y.sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------- the defenses


@_register("none", _check_none)
def no_defense(p: Tensor) -> Tensor:
    """Identity: the clean probabilities."""
    _check_probs(p)
    return p


def _reverse_sigmoid_term(p: Tensor, beta: float, gamma: float) -> Tensor:
    """``r(p) = beta * (sigmoid(gamma * logit(p)) - 1/2)``, per class."""
    logit = torch.logit(p.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS))
    return beta * (torch.sigmoid(gamma * logit) - 0.5)


@_register("rs", _check_rs)
def reverse_sigmoid(p: Tensor, beta: float, gamma: float) -> Tensor:
    """Reverse sigmoid (Lee et al. 2019): ``y~ = normalize(max(p - beta*(sigmoid(gamma*logit(p)) - 1/2), 0))``.

    The argmax is guaranteed to survive for every input only when gamma >= 1 and beta * gamma < 1
    (see the module docstring); a larger beta can flip it.

    >>> p = torch.tensor([[0.7, 0.2, 0.1]])
    >>> y = reverse_sigmoid(p, beta=0.5, gamma=1.0)
    >>> round(y.sum().item(), 6), int(y.argmax())
    (1.0, 0)
    """
    _check_probs(p)
    _check_rs(beta, gamma)
    return _normalize((p - _reverse_sigmoid_term(p, beta, gamma)).clamp_min(0))


@_register("dcp", _check_dcp)
def dcp(p: Tensor, beta: float, gamma: float, nu: float = 1000.0, threshold: float | None = None) -> Tensor:
    """RS gated by confidence: ``y~ = normalize(max(p - gate(p) * r(p), 0))``.

    ``gate(p) = 1 / (1 + exp(nu * (max_k p_k - tau)))`` with ``tau = threshold`` (default ``beta``), so
    the perturbation acts on rows whose confidence is below tau and fades out above it.
    """
    _check_probs(p)
    params = _check_dcp(beta, gamma, nu, threshold)
    tau = params["threshold"] if params["threshold"] is not None else params["beta"]
    confidence = p.max(dim=1, keepdim=True).values
    gate = torch.sigmoid(nu * (tau - confidence))  # == 1 / (1 + exp(nu * (max p - tau))), overflow-free
    return _normalize((p - gate * _reverse_sigmoid_term(p, beta, gamma)).clamp_min(0))


@_register("round", _check_round)
def rounding(p: Tensor, decimals: int) -> Tensor:
    """Round to ``decimals`` places by largest remainder, so each row is on the grid and sums to 1.

    Each row gets ``10**decimals`` units: first ``floor(p * units)`` each, then the units still missing
    go to the largest remainders (ties: the larger probability first). The argmax is kept up to ties.

    >>> rounding(torch.tensor([[0.46, 0.34, 0.20]]), decimals=1)
    tensor([[0.5000, 0.3000, 0.2000]])
    """
    _check_probs(p)
    _check_round(decimals)
    units = 10**decimals
    scaled = p.double().clamp_min(0) * units
    scaled = scaled * (units / scaled.sum(dim=1, keepdim=True))  # exact row sum before flooring
    floor = scaled.floor()
    missing = (units - floor.sum(dim=1)).round().long().clamp(0, p.shape[1])
    # rank by remainder, equal remainders by value (two stable sorts), so ties favour the larger p
    by_value = torch.sort(scaled, dim=1, descending=True, stable=True).indices
    by_rest = torch.sort((scaled - floor).gather(1, by_value), dim=1, descending=True, stable=True).indices
    order = by_value.gather(1, by_rest)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(p.shape[1], device=p.device).expand_as(order))
    floor += (rank < missing[:, None]).double()
    return (floor / units).to(p.dtype)


@_register("topk", _check_topk)
def top_k(p: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest probabilities of each row, zero the rest, renormalise."""
    _check_probs(p)
    _check_topk(k)
    if k > p.shape[1]:
        raise ConfigError(f"k must be in 1..{p.shape[1]} (the number of classes), got {k}")
    values, index = p.topk(k, dim=1)
    return _normalize(torch.zeros_like(p).scatter_(1, index, values))


@_register("label", _check_none)
def label_only(p: Tensor) -> Tensor:
    """One-hot of the argmax: the class label only."""
    _check_probs(p)
    return torch.zeros_like(p).scatter_(1, p.argmax(dim=1, keepdim=True), 1.0)


# --------------------------------------------------------------------------- building and calibrating


@dataclass(frozen=True)
class Defense:
    """A validated defense: ``Defense("rs", {"beta": 0.5, "gamma": 0.2})(p) -> y~``."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, p: Tensor) -> Tensor:
        return DEFENSES.get(self.name)(p, **self.params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items() if v is not None)
        return f"{self.name}({args})"


def make_defense(name: str, **params: Any) -> Defense:
    """Build the defense registered under ``name`` (none, rs, dcp, round, topk, label).

    Unknown or missing parameters and out-of-range values raise :class:`ConfigError` now, not at the
    first query (only ``k <= K`` for top-k waits for the first batch, which tells K).
    """
    fn = DEFENSES.get(name)
    if not hasattr(fn, "check_params"):  # the registry also holds other kinds of defenses (detectors)
        outputs = sorted(n for n in DEFENSES.names() if hasattr(DEFENSES.get(n), "check_params"))
        raise ConfigError(f"'{name}' is not an output defense; choose one of: {', '.join(outputs)}")
    signature = inspect.signature(fn.check_params).parameters
    accepted = list(signature)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) or "no parameters"
        raise ConfigError(f"defense '{name}' got unknown parameter(s) {unknown}; it takes: {allowed}")
    missing = [n for n, p in signature.items() if p.default is p.empty and n not in params]
    if missing:
        raise ConfigError(f"defense '{name}' needs parameter(s) {', '.join(missing)}")
    checked = fn.check_params(**params)
    return Defense(name, checked)


def mean_l1(p_clean: Tensor, p_def: Tensor) -> float:
    """Mean over the batch of ``sum_k |p_clean - p_def|`` (the l1 transparency distance, in [0, 2])."""
    if p_clean.shape != p_def.shape:
        raise ConfigError(f"shapes differ: {tuple(p_clean.shape)} vs {tuple(p_def.shape)}")
    return (p_clean - p_def).abs().sum(dim=1).mean().item()


class DefenseAccuracyWarning(UserWarning):
    """A calibrated output defense costs the defender most of its accuracy."""


def defense_accuracy_warning(defense: Any, clean_acc: float, defended_acc: float, ratio: float = 0.5) -> str | None:
    """The warning for a defense that leaves the defender's top-1 accuracy below ``ratio`` times the undefended
    victim's (at 0% for a weak victim: its low-confidence answers let the l1 budget allow a strength that
    flips the argmax, e.g. reverse sigmoid with beta * gamma > 1); None when the accuracy holds up."""
    if not defended_acc < ratio * clean_acc:
        return None
    return (f"output defense {defense} leaves the defender {100 * defended_acc:.1f}% accurate against "
            f"{100 * clean_acc:.1f}% undefended: calibrated on this weak, low-confidence victim it flips the "
            "answers; train the victim longer, lower the l1 budget or fix the defense's strength")


# param -> (stronger when larger?, continuous?)
_STRENGTH = {"beta": (True, True), "threshold": (True, True), "decimals": (False, False), "k": (False, False)}
_DEFAULT_PARAM = {"rs": "beta", "dcp": "beta", "round": "decimals", "topk": "k"}
_DEFAULT_GRID = {
    "beta": tuple(round(0.05 * 1.25**i, 6) for i in range(22)),  # 0.05 .. ~5.4, geometric
    "threshold": tuple(round(0.05 * i, 2) for i in range(1, 21)),  # 0.05 .. 1.0
    "decimals": tuple(range(0, 7)),
}


def calibrate_defense(
    name: str,
    probs_val: Tensor,
    l1_budget: float = 0.6,
    param: str | None = None,
    grid: Sequence[float] | None = None,
    fixed: dict[str, Any] | None = None,
    tol: float = 1e-3,
    max_bisections: int = 30,
    labels: Tensor | None = None,
) -> tuple[dict[str, Any], float]:
    """Find the strongest value of ``param`` whose mean l1 on ``probs_val`` is ``<= l1_budget``.

    Returns ``(params, l1)`` with ``make_defense(name, **params)`` ready to use and the measured l1.

    Search: every grid value is measured (no monotonicity assumed there) and the strongest one within
    budget is kept ("strongest" = larger beta / threshold, fewer decimals, smaller k). For continuous
    parameters (beta, threshold) the interval between it and the next stronger grid value (which broke
    the budget) is bisected until it is narrower than ``tol`` (relative); bisection assumes the l1 is
    monotone inside that one interval, and only values measured within budget are ever returned.
    ``fixed`` holds the other parameters (e.g. ``{"gamma": 0.2}``). No grid value within budget ->
    :class:`ConfigError`. With ``labels`` (the true classes of the validation rows) a
    :class:`DefenseAccuracyWarning` is issued when the calibrated defense leaves the defender's accuracy
    below half the undefended one (:func:`defense_accuracy_warning`): the l1 budget alone does not stop a
    strength that flips the answers of a low-confidence victim.
    """
    if name not in _DEFAULT_PARAM:
        raise ConfigError(
            f"defense '{name}' has no parameter to calibrate; choose one of {sorted(_DEFAULT_PARAM)}"
        )
    param = param or _DEFAULT_PARAM[name]
    if param not in _STRENGTH:
        raise ConfigError(f"cannot calibrate '{param}'; calibratable parameters: {sorted(_STRENGTH)}")
    _check_probs(probs_val)
    l1_budget = _positive("l1_budget", l1_budget)
    fixed = dict(fixed or {})
    if param in fixed:
        raise ConfigError(f"'{param}' is both calibrated and fixed")
    larger_is_stronger, continuous = _STRENGTH[param]
    if grid is None:
        grid = range(1, probs_val.shape[1] + 1) if param == "k" else _DEFAULT_GRID[param]
    values = sorted(set(grid), reverse=not larger_is_stronger)  # weakest first
    if not values:
        raise ConfigError("grid is empty")

    def l1_at(value: float) -> float:
        return mean_l1(probs_val, make_defense(name, **fixed, **{param: value})(probs_val))

    measured = [(v, l1_at(v)) for v in values]
    feasible = [i for i, (_, l1) in enumerate(measured) if l1 <= l1_budget]
    if not feasible:
        v, l1 = measured[0]
        raise ConfigError(
            f"no {param} in the grid keeps the mean l1 of '{name}' within {l1_budget}: even {param}={v} gives {l1:.4f}"
        )
    best = feasible[-1]
    value, l1 = measured[best]
    if continuous and best + 1 < len(measured):
        lo, hi = value, measured[best + 1][0]
        for _ in range(max_bisections):
            if hi - lo <= tol * max(abs(lo), 1e-12):
                break
            mid = (lo + hi) / 2
            mid_l1 = l1_at(mid)
            if mid_l1 <= l1_budget:
                lo, value, l1 = mid, mid, mid_l1
            else:
                hi = mid
    defense = make_defense(name, **fixed, **{param: value})
    if labels is not None:
        labels = labels.to(probs_val.device)
        clean_acc = (probs_val.argmax(dim=1) == labels).float().mean().item()
        defended_acc = (defense(probs_val).argmax(dim=1) == labels).float().mean().item()
        message = defense_accuracy_warning(defense, clean_acc, defended_acc)
        if message:
            warnings.warn(message, DefenseAccuracyWarning, stacklevel=2)
    return defense.params, l1
