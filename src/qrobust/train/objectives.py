"""Training objectives: what differs between methods. The one loop (``qrobust.train.loop.fit``) calls
``objective(model, x, y) -> (loss, metrics)`` each step; an objective with internal state (patches,
bit-width schedules) exposes ``state_dict``/``load_state_dict`` so a resumed run restores it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.registry import OBJECTIVES


class Objective:
    """Base class: a per-step loss. Subclasses implement ``__call__``."""

    name = "objective"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state

    def config(self) -> dict:
        return {"name": self.name}


@OBJECTIVES.register("ce")
class CrossEntropy(Objective):
    """Plain cross-entropy (float training and plain QAT): ``L = CE(y, f(x))``, optional label smoothing."""

    name = "ce"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        correct = (logits.detach().argmax(1) == y).sum()
        return loss, {"correct": correct}

    def config(self) -> dict:
        return {"name": self.name, "label_smoothing": self.label_smoothing}


@OBJECTIVES.register("soft-ce")
class SoftTargetCrossEntropy(Objective):
    """Cross-entropy against probability targets: ``L = mean_i -sum_k t_ik log softmax(f(x_i))_k``.

    Differs from ``KL(t || softmax(f(x)))`` by the targets' entropy only (same gradient). Used to fit an
    extraction clone on a victim's answers (KnockoffNets, the noise floor); ``correct`` counts argmax
    agreement with the targets."""

    name = "soft-ce"

    def __call__(self, model, x, y):
        logits = model(x)
        loss = -(y * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
        correct = (logits.detach().argmax(1) == y.argmax(1)).sum()
        return loss, {"correct": correct}
