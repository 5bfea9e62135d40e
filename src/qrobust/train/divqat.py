"""DivQAT: quantization-aware training that pushes the quantized model's probabilities away from the
float model's, so that a clone trained on them learns a worse copy.

Paper: "DivQAT: Enhancing Robustness of Quantized Convolutional Neural Networks against Model
Extraction Attacks", arXiv:2512.23948. The QAT loss (their Eq. for L_DivQAT) is

    L = CE(y, f_q(x)) - alpha * KL(f_q(x) || f_fp(x))
    KL(p_q || p_fp) = sum_k p_q,k (log p_q,k - log p_fp,k)        (direction: quantized first)

with ``f_q`` the fake-quantized student being trained, ``f_fp`` the trained float model, frozen
(eval mode, no gradient, its own copy). Gradients reach ``f_q`` only: CE keeps the labels right
while the KL term rewards probabilities that differ from the float model's.

Dynamics worth knowing: ``KL(p_q || p_fp)`` has its minimum (0, zero gradient) where the student's
outputs equal the teacher's, but in train mode that is not where DivQAT starts: the student's
BatchNorm uses batch statistics (the teacher, in eval mode, its running ones) and its quantizers add
noise, so the two already differ on the first batch and the KL term has a gradient from the first
step (issue 12 measured ``|grad KL| / |grad CE| ~ 0.09`` there). Its pull is nevertheless weak:
on Fashion-MNIST the validation KL barely moves up to alpha ~0.5, and past a threshold (alpha ~0.6)
the student runs away from the teacher and collapses within an epoch or two. A larger alpha gives no
effect, then collapse, not a smooth trade-off; the study therefore searches an *operating point* (an
accuracy cost, as the paper's) rather than trusting an alpha. A confident teacher (near one-hot
outputs) leaves little room to diverge without changing labels. ``kl_cap`` (beyond the paper) bounds
what running away can win.

Divergence guard (our choice; the paper does not discuss it). ``-alpha * KL`` is unbounded below as
far as ``log p_fp`` is: the student can move mass onto classes the teacher gives ~0 probability and
win ``-log p_fp`` without limit. We floor the teacher's probabilities at ``teacher_floor`` (1e-6, the
floor DFME uses for victim log-probabilities) before the log, so ``0 <= KL <= -log(teacher_floor)``
(13.8 nats) and the loss is bounded below by ``-alpha * 13.8``: it never becomes -inf/NaN. A too large
alpha then shows as an *accuracy collapse* rather than a NaN, which the objective watches for itself
(collapse guard, also our choice): the teacher's logits are computed at every step anyway, so
:class:`DivQATLoss` compares the student's training accuracy with the teacher's *on the same images*
over windows of ``guard_window`` (512) training images and raises
:class:`~qrobust.errors.TrainingDiverged` as soon as the student is more than ``max_acc_drop`` (0.3)
below, whoever drives the training (``fit()``, a study, a hand-written loop); a run folder keeps its
last good checkpoint. The DivQAT study uses the same check (:func:`check_divqat_accuracy`) with its
own threshold (``divqat.max_acc_drop``) twice: in training, and on test accuracy vs plain QAT after it.
NaN/inf still stops the loop with its own message (``qrobust.train.loop``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.errors import ConfigError, TrainingDiverged
from qrobust.metrics import as_float_images
from qrobust.registry import OBJECTIVES
from qrobust.train.objectives import Objective
from qrobust.utils import eval_mode, module_device

DEFAULT_TEACHER_FLOOR = 1e-6
DEFAULT_MAX_ACC_DROP = 0.3  # training accuracy below the teacher's by more than this = collapse
DEFAULT_GUARD_WINDOW = 512  # training images per comparison: a few batches, so one bad batch is no alarm


def kl_q_fp(logits_q: Tensor, logits_fp: Tensor, teacher_floor: float | None = None) -> Tensor:
    """Per-sample ``KL(p_q || p_fp) = sum_k p_q,k (log p_q,k - log p_fp,k)`` from logits.

    ``teacher_floor`` (None = exact) clamps ``p_fp`` from below before the log (the DivQAT guard).

    >>> lq, lf = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    >>> p = torch.softmax(lq, 1)[0]
    >>> expected = float((p * (p.log() - math.log(0.5))).sum())
    >>> abs(kl_q_fp(lq, lf).item() - expected) < 1e-6
    True
    """
    log_q = F.log_softmax(logits_q.float(), dim=1)
    log_fp = F.log_softmax(logits_fp.float(), dim=1)
    if teacher_floor is not None:
        log_fp = log_fp.clamp_min(math.log(teacher_floor))
    return (log_q.exp() * (log_q - log_fp)).sum(dim=1)


@OBJECTIVES.register("divqat")
class DivQATLoss(Objective):
    """``L = CE(y, f_q(x)) - alpha * KL(f_q(x) || f_fp(x))`` (DivQAT, arXiv:2512.23948).

    Args:
        teacher: the trained float model ``f_fp``. A frozen copy is kept (eval mode,
            ``requires_grad=False``), so the caller's model is never touched or trained.
        alpha: weight of the divergence term, > 0 (the paper sweeps 0.01 .. 0.1).
        teacher_floor: floor on the teacher's probabilities inside the KL (bounds the loss; see the
            module docstring); in (0, 1/K).
        max_acc_drop: the collapse guard. Over each window of ``guard_window`` training images the
            student's training accuracy is compared with the frozen teacher's on the same images (free:
            the teacher's logits are needed for the KL anyway); a student more than ``max_acc_drop``
            below raises :class:`~qrobust.errors.TrainingDiverged` from that step, which names alpha
            and both accuracies. Measured on the synthetic set (convnet teacher at 100%, 2 epochs of
            8-bit DivQAT): alpha <= 0.5 keeps 100%, alpha 1 ends at 75% test accuracy (no alarm at
            0.3), alpha 3 at 1% (alarm in the second window), alpha 1000 at chance from its second step
            (alarm in the first window); issue 10 saw alpha >= 0.6 reach chance through ``fit()``.
            In [0, 1]; ``None`` switches the guard off. It raises rather than warns: a collapsed victim
            makes every later number meaningless, and a warning scrolls by in a long run.
        guard_window: training images per guard comparison (>= 1).
        kl_cap: **beyond the paper** (our variant, "DivQAT-hinge"; None = the paper's loss). The
            divergence is rewarded per image only up to ``kl_cap`` nats:
            ``L = CE - alpha * mean_i min(KL_i, kl_cap)``, a hinge. Past the cap an image's KL earns
            nothing and has zero gradient, so the student cannot keep winning by running away from the
            teacher (the paper's term grows without bound up to the floor's 13.8 nats, which is what
            collapses it); CE then holds the labels. The training KL logged stays the uncapped one.

    Per step returns ``(loss, {"correct", "kl", "ce"})``; :meth:`pop_epoch_stats` gives the mean
    training KL and CE since its last call (the loop records ``correct`` only). The guard settings are
    not part of :meth:`config` (they never change what is trained, so a run folder stays the same run).
    """

    name = "divqat"

    def __init__(
        self,
        teacher: nn.Module,
        alpha: float,
        *,
        teacher_floor: float = DEFAULT_TEACHER_FLOOR,
        max_acc_drop: float | None = DEFAULT_MAX_ACC_DROP,
        guard_window: int = DEFAULT_GUARD_WINDOW,
        kl_cap: float | None = None,
    ):
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ConfigError(
                f"DivQAT alpha must be a number > 0 (the paper uses 0.01 .. 0.1), got {alpha!r}; "
                "for plain QAT use the 'ce' objective instead of alpha=0"
            )
        if (
            isinstance(teacher_floor, bool)
            or not isinstance(teacher_floor, (int, float))
            or not 0 < teacher_floor < 0.1
        ):
            raise ConfigError(f"teacher_floor must be in (0, 0.1), e.g. 1e-6; got {teacher_floor!r}")
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"teacher must be the float nn.Module, got {type(teacher).__name__}")
        if max_acc_drop is not None and (
            isinstance(max_acc_drop, bool) or not isinstance(max_acc_drop, (int, float)) or not 0 <= max_acc_drop <= 1
        ):
            raise ConfigError(f"max_acc_drop must be in [0, 1] (or None: no collapse guard), got {max_acc_drop!r}")
        if isinstance(guard_window, bool) or not isinstance(guard_window, int) or guard_window < 1:
            raise ConfigError(f"guard_window must be an integer >= 1 (training images), got {guard_window!r}")
        if kl_cap is not None and (
            isinstance(kl_cap, bool) or not isinstance(kl_cap, (int, float)) or not math.isfinite(kl_cap) or kl_cap <= 0
        ):
            raise ConfigError(f"kl_cap must be a number of nats > 0 (or None: the paper's loss), got {kl_cap!r}")
        self.kl_cap = None if kl_cap is None else float(kl_cap)
        self.max_acc_drop = None if max_acc_drop is None else float(max_acc_drop)
        self.guard_window = guard_window
        self._guard = [0, 0, 0]  # student correct, teacher correct, images: in the current window
        self.alpha = float(alpha)
        self.teacher_floor = float(teacher_floor)
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self._teacher_ids = {id(p) for p in self.teacher.parameters()}
        self._kl_sum = 0.0
        self._ce_sum = 0.0
        self._seen = 0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        if any(id(p) in self._teacher_ids for p in model.parameters()):
            raise ConfigError("the DivQAT student shares parameters with its teacher; train a quantized copy")
        device = x.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        if self.teacher.training:  # someone called .train() on it: keep BatchNorm statistics frozen
            self.teacher.eval()
        with torch.no_grad():
            logits_fp = self.teacher(x)
        logits_q = model(x)
        ce = F.cross_entropy(logits_q, y)
        per_image = kl_q_fp(logits_q, logits_fp.detach(), self.teacher_floor)
        kl = per_image.mean()
        rewarded = kl if self.kl_cap is None else per_image.clamp(max=self.kl_cap).mean()
        loss = ce - self.alpha * rewarded
        n = len(y)
        self._kl_sum += float(kl.detach()) * n
        self._ce_sum += float(ce.detach()) * n
        self._seen += n
        correct = (logits_q.detach().argmax(1) == y).sum()
        if self.max_acc_drop is not None:
            self._check_collapse(int(correct), int((logits_fp.argmax(1) == y).sum()), n)
        return loss, {"correct": correct, "kl": kl.detach(), "ce": ce.detach()}

    def _check_collapse(self, student_correct: int, teacher_correct: int, n: int) -> None:
        """Count one step into the guard window; at its end compare student and teacher accuracy."""
        guard = self._guard
        guard[0] += student_correct
        guard[1] += teacher_correct
        guard[2] += n
        if guard[2] < self.guard_window:
            return
        student, teacher, seen = guard[0] / guard[2], guard[1] / guard[2], guard[2]
        self._guard = [0, 0, 0]
        check_divqat_accuracy(
            student, teacher, alpha=self.alpha, max_drop=self.max_acc_drop,
            measured=f"training accuracy (last {seen} training images)",
            reference="the float teacher on the same images",
            setting="max_acc_drop of DivQATLoss; divqat.max_acc_drop in the study",
        )

    def pop_epoch_stats(self) -> dict:
        """Mean training ``kl`` and ``ce`` over the steps since the last call; resets the sums."""
        seen = max(1, self._seen)
        out = {"train_kl": self._kl_sum / seen, "train_ce": self._ce_sum / seen}
        self._kl_sum = self._ce_sum = 0.0
        self._seen = 0
        return out

    def config(self) -> dict:
        out = {"name": self.name, "alpha": self.alpha, "teacher_floor": self.teacher_floor}
        return out if self.kl_cap is None else out | {"kl_cap": self.kl_cap}


def mean_kl_to_float(
    model_q: nn.Module,
    model_fp: nn.Module,
    x: Tensor,
    batch_size: int = 512,
    teacher_floor: float | None = None,
) -> float:
    """Mean over ``x`` of the exact ``KL(f_q(x) || f_fp(x))`` (eval mode, no gradient): the mechanism.

    ``x`` are float images in [0, 1] (or uint8, divided by 255). Each model runs on its own device
    (the batch is copied to it); neither model is moved, and every train/eval flag is restored.
    """
    device_q, device_fp = module_device(model_q), module_device(model_fp)
    total, n = 0.0, 0
    with eval_mode(model_q, model_fp), torch.no_grad():
        for chunk in x.split(batch_size):
            chunk = as_float_images(chunk)
            logits_fp = model_fp(chunk.to(device_fp)).to(device_q)
            kl = kl_q_fp(model_q(chunk.to(device_q)), logits_fp, teacher_floor)
            total += float(kl.sum())
            n += len(chunk)
    return total / max(1, n)


def check_divqat_accuracy(
    acc: float,
    reference_acc: float,
    *,
    alpha: float,
    max_drop: float,
    where: str = "",
    measured: str = "test accuracy",
    reference: str = "plain QAT",
    setting: str = "divqat.max_acc_drop",
) -> None:
    """Raise :class:`TrainingDiverged` when DivQAT lost more than ``max_drop`` accuracy vs a reference.

    The one collapse check: :class:`DivQATLoss` calls it during training (student vs teacher on the same
    training images), the DivQAT study after training (test accuracy vs plain QAT, the defaults of
    ``measured`` / ``reference``). The bounded loss never goes NaN, so a too large alpha shows as a
    collapse of accuracy (the student sacrifices the labels for divergence). ``where`` names the run
    folder that was kept; ``setting`` the knob that allows a larger drop.
    """
    if not acc >= reference_acc - max_drop:  # also catches NaN
        kept = f" The trained model is kept in {where}." if where else ""
        raise TrainingDiverged(
            f"DivQAT with alpha={alpha:g} collapsed: {measured} {100 * acc:.1f}% vs {100 * reference_acc:.1f}% "
            f"for {reference} (allowed drop {100 * max_drop:.0f} points).{kept} Lower alpha (the paper uses "
            f"0.01 .. 0.1) or, if this drop is acceptable, raise the allowed drop ({setting})."
        )


__all__ = [
    "DEFAULT_GUARD_WINDOW",
    "DEFAULT_MAX_ACC_DROP",
    "DEFAULT_TEACHER_FLOOR",
    "DivQATLoss",
    "check_divqat_accuracy",
    "kl_q_fp",
    "mean_kl_to_float",
]
