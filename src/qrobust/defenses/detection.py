"""Adversarial information plane (AIP) and mutual-information attack detection.

Farkya, Raghavan, Ziskind, arXiv:2312.00105 (2023), Sec. on the AIP: attack a network with stochastic
quantizers (SQ) at growing strength ``eps`` and plot, for each ``eps``, the ensemble's accuracy against
the mean per-image mutual information between its draws,

    I(x) = H(mean_n p_n(x)) - mean_n H(p_n(x))     (nats; :func:`qrobust.quant.stochastic.ensemble_entropies`)

A detector thresholds ``I(x)``: the threshold is set on clean validation data at a chosen false-positive
rate. Threat model: white-box attacks on the SQ ensemble; an adaptive attacker who also minimises
``I(x)`` (to stay under the threshold) is out of scope of the detector's guarantees. Whether attacks
raise or lower ``I`` depends on how the model was trained (a model trained to *maximise* clean
disagreement may show *less* of it on adversarial inputs), hence ``MIDetector(direction=...)``; the
default ``"above"`` flags high disagreement, the usual sign (Smith & Gal 2018).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant.stochastic import check_num_draws, ensemble_stats
from qrobust.registry import DEFENSES

__all__ = ["mutual_information", "information_plane", "MIDetector", "auroc", "plot_information_plane"]

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def mutual_information(model: nn.Module, x: torch.Tensor, n_draws: int = 16, batch_size: int | None = None):
    """Per-image mutual information ``I(x)`` (nats, shape ``[B]``) between the model's SQ draws.

    Runs in the model's current mode (call ``model.eval()`` first for BatchNorm models); 0 for a
    deterministic model. ``batch_size`` bounds memory (each chunk is repeated ``n_draws`` times).
    """
    check_num_draws(n_draws)
    return ensemble_stats(model, x, None, n_draws, batch_size).mi


def information_plane(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack_fn: AttackFn,
    eps_list: Sequence[float | str],
    n_draws: int = 16,
    batch_size: int | None = None,
) -> list[dict]:
    """Rows ``{eps, accuracy, all_draws_accuracy, mean_mi, std_mi}`` of the AIP, one per ``eps``.

    ``attack_fn(model, x, y, eps) -> x_adv`` is any attack, e.g.
    ``functools.partial(pgd, norm="linf", steps=10, eot=8)``; it gets each eps as a float (``eps_list``
    may hold floats or strings such as ``"8/255"``); ``eps == 0`` uses the clean ``x`` without calling it. ``accuracy`` is that of the averaged prediction of ``n_draws`` fresh draws;
    ``all_draws_accuracy`` counts an image only if every draw classifies it correctly (no lucky draws).
    """
    check_num_draws(n_draws)
    if len(eps_list) == 0:
        raise ConfigError("information_plane needs at least one eps (e.g. [0, 2/255, 4/255, 8/255])")
    rows = []
    for spec in eps_list:
        try:
            eps = float(Fraction(spec)) if isinstance(spec, str) else float(spec)
        except (TypeError, ValueError, ZeroDivisionError):
            eps = math.nan
        if not (math.isfinite(eps) and eps >= 0):
            raise ConfigError(
                f"attack strengths must be numbers >= 0 such as 0.03 or '8/255', got eps={spec!r}"
            )
        x_eval = x if eps == 0 else attack_fn(model, x, y, eps).detach()
        stats = ensemble_stats(model, x_eval, y, n_draws, batch_size)
        mi = stats.mi
        rows.append(
            {
                "eps": float(eps),
                "accuracy": stats.correct.float().mean().item(),
                "all_draws_accuracy": stats.all_draws_correct.float().mean().item(),
                "mean_mi": mi.mean().item(),
                "std_mi": mi.std().item() if mi.numel() > 1 else 0.0,
            }
        )
    return rows


def auroc(scores_clean: torch.Tensor, scores_adv: torch.Tensor) -> float:
    """Area under the ROC curve for "adversarial scores higher": ``P(s_adv > s_clean) + P(=)/2``.

    Rank-based (Mann-Whitney U) with average ranks for ties; 0.5 for identical score sets, 1.0 when
    every adversarial score is above every clean one.
    """
    clean = torch.as_tensor(scores_clean).detach().flatten().double().cpu()
    adv = torch.as_tensor(scores_adv).detach().flatten().double().cpu()
    if clean.numel() == 0 or adv.numel() == 0:
        raise ConfigError("auroc needs at least one clean and one adversarial score")
    if not (torch.isfinite(clean).all() and torch.isfinite(adv).all()):
        raise ConfigError("auroc got NaN/inf scores; check the model's outputs")
    both = torch.cat([clean, adv])
    _, inverse, counts = torch.unique(both, sorted=True, return_inverse=True, return_counts=True)
    # 1-based ranks: a group of c tied values occupying positions (end-c, end] gets rank end - (c-1)/2.
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    ranks = avg_rank[inverse]
    n_clean, n_adv = clean.numel(), adv.numel()
    u = ranks[n_clean:].sum() - n_adv * (n_adv + 1) / 2
    return (u / (n_adv * n_clean)).item()


@DEFENSES.register("mi-detector")
class MIDetector:
    """Flags inputs whose SQ-ensemble mutual information crosses a threshold.

    ``fit`` sets the threshold on clean validation inputs so that a share ``fpr`` of them is flagged
    (the ``1 - fpr`` quantile of their scores, rounded up to a score value so the clean false-positive
    rate is at most ``fpr`` on the fit set); or give ``threshold`` directly. ``direction="above"`` flags
    ``I(x) > threshold``, ``"below"`` flags ``I(x) < threshold`` (threshold at the ``fpr`` quantile).
    """

    def __init__(
        self,
        threshold: float | None = None,
        fpr: float = 0.05,
        n_draws: int = 16,
        direction: str = "above",
        batch_size: int | None = None,
    ):
        if not 0.0 < fpr < 1.0:
            raise ConfigError(f"the false-positive rate fpr must be in (0, 1), got {fpr!r}; e.g. 0.05")
        if direction not in ("above", "below"):
            raise ConfigError(f"direction must be 'above' or 'below', got {direction!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.fpr = float(fpr)
        self.n_draws = check_num_draws(n_draws)
        self.direction = direction
        self.batch_size = batch_size

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per-image MI, shape ``[B]``."""
        return mutual_information(model, x, self.n_draws, self.batch_size)

    def fit_scores(self, clean_scores: torch.Tensor) -> MIDetector:
        """Set the threshold from clean scores at the requested false-positive rate."""
        s = torch.as_tensor(clean_scores).detach().flatten().double().cpu()
        if s.numel() == 0:
            raise ConfigError("MIDetector.fit needs at least one clean input")
        if self.direction == "above":
            q = torch.quantile(s, 1.0 - self.fpr, interpolation="higher")
        else:
            q = torch.quantile(s, self.fpr, interpolation="lower")
        self.threshold = q.item()
        return self

    def fit(self, model: nn.Module, x_clean: torch.Tensor) -> MIDetector:
        """Score clean validation inputs and set the threshold (see class doc)."""
        return self.fit_scores(self.score(model, x_clean))

    def flag(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean flags for given scores."""
        if self.threshold is None:
            raise ConfigError("MIDetector has no threshold: call fit(model, x_clean) or pass threshold=")
        return scores > self.threshold if self.direction == "above" else scores < self.threshold

    def detect(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B]``: True where the input is flagged as adversarial."""
        return self.flag(self.score(model, x))

    def __repr__(self) -> str:
        return (
            f"MIDetector(threshold={self.threshold}, fpr={self.fpr}, n_draws={self.n_draws}, "
            f"direction={self.direction!r})"
        )


def plot_information_plane(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of the AIP: mean MI (x) against accuracy (y), points joined in eps order, labelled.

    ``rows`` as returned by :func:`information_plane` (keys ``eps``, ``accuracy``, ``mean_mi``); rows of
    several models can be plotted by calling this on each and comparing files. Uses the Agg canvas
    directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(rows) == 0:
        raise ConfigError("plot_information_plane needs at least one row")
    rows = sorted(rows, key=lambda r: r["eps"])
    mi = [r["mean_mi"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(mi, acc, "-o")
    for r in rows:
        ax.annotate(
            f"eps={r['eps']:.3g}", (r["mean_mi"], r["accuracy"]), textcoords="offset points", xytext=(4, 4)
        )
    ax.set_xlabel("mean mutual information I(x) between draws [nats]")
    ax.set_ylabel("ensemble accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "adversarial information plane")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
