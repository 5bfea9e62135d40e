"""Information-theoretic ensemble training of a network with stochastic quantizers (SQ).

Farkya, Raghavan, Ziskind, arXiv:2312.00105 (2023): the ``N`` SQ draws of one network form an
ensemble of quantized networks; training asks each member to be accurate and the members to be
*diverse*, so that an attack that fools one draw does not fool the others. For a batch ``(x, y)``::

    logits_n = f_n(x),  n = 1..N          (one batched pass, :func:`ensemble_forward`)
    CE       = mean_n CE(logits_n, y)                   ce_on="draws" (default)
             | CE(log mean_n softmax(logits_n), y)      ce_on="mean"
    I(x)     = H(T) - H(T|X) = H(mean_n p_n(x)) - mean_n H(p_n(x))   (:func:`ensemble_entropies`)
    L        = CE - beta * mean_x I(x) + spacing_weight * sum_SQ R_spacing          mi_on="output"
    L        = CE + beta * I(X; T)     + spacing_weight * sum_SQ R_spacing          mi_on="last-sq" | "every-sq"

Two readings of the MI term (``mi_on``; docs/CHOICES.md says why each follows from the paper's text):

* ``"output"``: ``T`` is a member's class output and ``X`` the draw; ``I`` is the members' disagreement
  on one image (BALD mutual information). ``beta > 0`` *rewards* diversity, ``beta < 0`` penalises it,
  ``beta = 0`` is plain ensemble training. ``I <= log min(N, C)``, so the loss stays bounded below.
* ``"last-sq"`` / ``"every-sq"``: ``T`` is the quantized representation (the values of the last SQ,
  before the classifier, or of every SQ) and ``X`` the input image, its law given the image estimated
  across the ``N`` draws (:func:`~qrobust.quant.stochastic.representation_entropies`, nats per value).
  ``I(X; T) = H(T) - H(T|X)`` enters as an information bottleneck: ``beta > 0`` asks for a
  representation that keeps little about the image beyond what the CE needs, i.e. a high ``H(T|X)``
  (the draws quantize the image differently: "different quantized DNNs learn different representations
  of the input image"). ``0 <= I <= log K``.

Choices (the paper's text was not retrievable here, only the abstract and a summary that says the
objective combines classification, an MI term built from ``H(T)`` and ``H(T|X)`` with ``H(T|X)`` the
ensemble's "diversity", and a bin-spacing regulariser):

* the MI is computed per image across the ``N`` draws, as the paper stresses (both readings above; the
  representation reading's ``H(T)`` is the batch marginal of those per-image laws);
* CE on each draw by default: every quantized member must classify on its own, which is what keeps the
  reward for disagreement from buying diversity with accuracy; ``ce_on="mean"`` trains the averaged
  prediction only (members may specialise);
* ``R_spacing`` is :meth:`StochasticQuantizer.spacing_regulariser` (log-gap penalty; see there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant.stochastic import (
    MI_READINGS,
    check_num_draws,
    disagreement_rate,
    ensemble_entropies,
    ensemble_forward,
    ensemble_log_probs,
    mi_sqs,
    representation_entropies,
    spacing_penalty,
    sq_bin_probs,
)
from qrobust.registry import OBJECTIVES
from qrobust.train.objectives import Objective

__all__ = ["MIEnsembleLoss", "SQEnsembleObjective"]

_CE_ON = ("draws", "mean")
_METRICS = ("loss", "ce", "mi", "h_t", "h_t_given_x", "spacing", "accuracy", "disagreement")


@OBJECTIVES.register("mi-ensemble")
class MIEnsembleLoss(Objective):
    """Step objective ``loss(model, x, y) -> (loss, metrics)`` for SQ ensemble training (module doc).

    ``metrics`` holds plain floats: ``loss``, ``ce``, ``mi``, ``h_t``, ``h_t_given_x`` (batch means, nats,
    of the reading ``mi_on``), ``spacing`` (the summed regulariser), ``accuracy`` (of the averaged
    prediction) and ``disagreement`` (share of draws whose top-1 differs from the ensemble's).
    """

    name = "mi-ensemble"

    def __init__(
        self, beta: float = 0.1, spacing_weight: float = 0.01, n_draws: int = 8, ce_on: str = "draws",
        mi_on: str = "output",
    ):
        if not math.isfinite(beta):
            raise ConfigError(f"beta must be a finite number, got {beta!r}")
        if not (math.isfinite(spacing_weight) and spacing_weight >= 0):
            raise ConfigError(f"spacing_weight must be a finite number >= 0, got {spacing_weight!r}")
        check_num_draws(n_draws)
        if beta != 0 and n_draws < 2:
            raise ConfigError(
                f"the MI term needs at least 2 draws to measure disagreement, got n_draws={n_draws}; "
                "use n_draws >= 2 (e.g. 8) or beta = 0"
            )
        if ce_on not in _CE_ON:
            raise ConfigError(f"ce_on must be one of {', '.join(_CE_ON)}, got {ce_on!r}")
        if mi_on not in MI_READINGS:
            raise ConfigError(f"mi_on must be one of {', '.join(MI_READINGS)}, got {mi_on!r}")
        self.mi_on = mi_on
        self.beta = float(beta)
        self.spacing_weight = float(spacing_weight)
        self.n_draws = n_draws
        self.ce_on = ce_on

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        sqs = mi_sqs(model, self.mi_on)
        with sq_bin_probs(sqs, self.n_draws) as probs:
            logits = ensemble_forward(model, x, self.n_draws)  # [N, B, C]
        n, b, c = logits.shape
        log_mean = ensemble_log_probs(logits)
        if self.ce_on == "draws":
            ce = F.cross_entropy(logits.reshape(n * b, c), y.repeat(n))
        else:
            ce = F.nll_loss(log_mean, y)
        if self.mi_on == "output":
            h_t, h_t_given_x, mi = ensemble_entropies(logits)
            mi_mean = mi.mean()
            loss = ce - self.beta * mi_mean
        else:
            h_t, h_t_given_x, mi = representation_entropies(probs)
            mi_mean = mi.mean()
            loss = ce + self.beta * mi_mean
        spacing = spacing_penalty(model) if self.spacing_weight > 0 else logits.new_zeros(())
        loss = loss + self.spacing_weight * spacing
        with torch.no_grad():  # one device->host transfer for all metrics
            values = torch.stack(
                [
                    loss,
                    ce,
                    mi_mean,
                    h_t.mean(),
                    h_t_given_x.mean(),
                    spacing.to(loss.dtype),
                    (log_mean.argmax(-1) == y).to(loss.dtype).mean(),
                    disagreement_rate(logits).mean().to(loss.dtype),
                ]
            ).tolist()
        metrics = dict(zip(_METRICS, values, strict=True))
        return loss, metrics

    def __repr__(self) -> str:
        return (
            f"MIEnsembleLoss(beta={self.beta}, spacing_weight={self.spacing_weight}, "
            f"n_draws={self.n_draws}, ce_on={self.ce_on!r}, mi_on={self.mi_on!r})"
        )


class SQEnsembleObjective(Objective):
    """:class:`MIEnsembleLoss` as an :class:`Objective` of the one loop (``qrobust.train.loop.fit``):
    the same loss and metrics plus ``correct`` (images whose averaged prediction is right), which the
    loop sums into ``train_acc``, and a :meth:`config` with the loss's settings (what a run folder stores).
    """

    name = "mi-ensemble"

    def __init__(self, loss: MIEnsembleLoss):
        self.loss = loss

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss, metrics = self.loss(model, x, y)
        return loss, {**metrics, "correct": metrics["accuracy"] * len(y)}

    def config(self) -> dict:
        m = self.loss
        return {"name": self.name, "beta": m.beta, "spacing_weight": m.spacing_weight, "n_draws": m.n_draws,
                "ce_on": m.ce_on, "mi_on": m.mi_on}
