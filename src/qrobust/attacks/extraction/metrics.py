"""What an extraction attack achieved: clone accuracy, clone/victim agreement, and the result record.

* clone accuracy = share of the victim's test set the clone labels correctly, ``mean[argmax c(x) == y]``;
* agreement (fidelity, Jagielski et al. 2020) = share of inputs where clone and victim give the same
  label, ``mean[argmax c(x) == argmax v(x)]``; for a :class:`Victim` the victim's label is the argmax
  of its *defended* answer, read through the defender's evaluation path (no query budget spent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qrobust.attacks.extraction.victim import Victim
from qrobust.utils import eval_mode, module_device


def predict_labels(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Argmax labels of ``model`` on ``x`` in eval mode, without gradients; every flag is restored."""
    device = module_device(model)
    with eval_mode(model), torch.no_grad():
        labels = [model(chunk.to(device)).argmax(dim=1) for chunk in x.split(batch_size)]
    return torch.cat(labels).to(x.device)


def clone_accuracy(clone: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Share of ``x`` the clone labels as ``y``."""
    return (predict_labels(clone, x, batch_size) == y.to(x.device)).float().mean().item()


def agreement(clone: nn.Module, reference: Victim | nn.Module, x: Tensor, batch_size: int = 512) -> float:
    """Share of ``x`` where the clone's label equals the reference's (a Victim or a plain model)."""
    if isinstance(reference, Victim):
        ref = reference.labels(x)
    else:
        ref = predict_labels(reference, x, batch_size)
    return (predict_labels(clone, x, batch_size) == ref).float().mean().item()


@dataclass
class ExtractionResult:
    """What an attack returns; a partial result when the budget ran out (``stopped_early=True``).

    Attributes:
        clone: the trained clone (the same module the attack was given).
        queries_used: queries this attack spent (the victim's ``used`` after minus before).
        iterations: attack iterations completed (query rounds for KnockoffNets, generator+clone rounds
            for DFME/MAZE).
        stopped_early: the victim's budget ran out before the planned iterations were done.
        history: ``(queries used so far, clone accuracy or None without eval data)`` points.
        ledger: queries this attack spent per phase.
        info: attack-specific details (planned iterations, cost per iteration, final policy, ...).
    """

    clone: nn.Module
    queries_used: int
    iterations: int
    stopped_early: bool
    history: list[tuple[int, float | None]] = field(default_factory=list)
    ledger: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float | None:
        """Clone accuracy at the last history point (None without eval data)."""
        return self.history[-1][1] if self.history else None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict (no module): numbers stay numbers."""
        return {
            "queries_used": self.queries_used,
            "iterations": self.iterations,
            "stopped_early": self.stopped_early,
            "clone_accuracy": self.final_accuracy,
            "history": [list(point) for point in self.history],
            "ledger": dict(self.ledger),
            "info": dict(self.info),
        }


def ledger_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Queries spent per phase between two ledger snapshots (phases with 0 are left out)."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}
