"""Defense-aware extraction (Kerckhoffs's principle): the attacker knows the output defense.

A plain clone is fitted to the defended answers ``y~ = O(D(softmax(f(x))))``, so it learns the
*perturbed* function. The defense-aware attacker passes its clone's probabilities through the same
answer function (defense ``D`` and output format ``O``, the victim's public
:meth:`~qrobust.attacks.extraction.victim.Victim.answer_from_probs`) before the loss::

    min_theta  1/n sum_i  -sum_k y~_ik log max(O(D(softmax(c_theta(x_i))))_k, 1e-6)

so that ``softmax(c_theta)`` is fitted to the clean model seen through the perturbation (a clone whose
clean probabilities equal the victim's clean ones gives exactly the victim's answers). This is the
adaptive attack the DivQAT paper leaves open (issue 12, section 3).

Where the gradient exists (checked with torch's autograd on each function, see tests):

* ``rs`` (reverse sigmoid): ``normalize(max(p - beta (sigmoid(gamma logit(p)) - 1/2), 0))`` is smooth in
  ``p`` except where a class is clamped to 0 (gradient 0 there) and outside the logit clamp
  ``[1e-6, 1 - 1e-6]``;
* ``dcp``: reverse sigmoid times a sigmoid gate of ``max_k p_k``: smooth except at ties of the max (the
  gate is a near-step with nu = 1000, so its gradient is large only within ~0.01 of the threshold);
* ``topk`` (defense or output format): the k largest probabilities renormalised: the mask is constant
  between reorderings, so the function is piecewise smooth;
* ``round``, ``label`` (defenses) and ``output="top1"``: piecewise constant, the gradient is 0 almost
  everywhere, so no loss through them can teach the clone anything: the attack falls back to the
  plain loss and says so in ``info["defense_aware"]`` (a hard-label answer carries only the argmax,
  which the plain hard-label fit already uses; rounding moves each probability by at most half a grid
  step);
* no defense: the plain loss (nothing to see through);
* any other callable: used as given (whoever wrote it knows whether torch can differentiate it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from qrobust.attacks.extraction.victim import Victim
from qrobust.defenses.output import Defense
from qrobust.train.objectives import Objective

PROB_FLOOR = 1e-6  # defended clone probabilities are clamped here before the log (defenses output exact 0)
PIECEWISE_CONSTANT = ("round", "label")  # output defenses whose gradient is 0 almost everywhere


def defense_aware_answer(victim: Victim) -> tuple[Callable[[Tensor], Tensor] | None, str]:
    """The victim's answer function to put between the clone and the loss, or None; and why (for the record)."""
    defense = victim.defense
    name = defense.name if isinstance(defense, Defense) else None
    if victim.output == "top1":
        return None, "not applied: top-1 answers are piecewise constant in the probabilities (zero gradient)"
    if name in PIECEWISE_CONSTANT:
        return None, f"not applied: the '{name}' defense is piecewise constant (zero gradient almost everywhere)"
    if (defense is None or name == "none") and victim.output == "probs":
        return None, "not needed: the victim has no defense (the plain loss)"
    return victim.answer_from_probs, f"applied: {defense!r}" + (f", output {victim.output}" if victim.output != "probs" else "")


def defense_aware_cross_entropy(logits: Tensor, targets: Tensor, answer: Callable[[Tensor], Tensor]) -> Tensor:
    """``mean_i -sum_k t_ik log max(answer(softmax(z_i))_k, 1e-6)``: soft-target CE through the defense."""
    defended = answer(F.softmax(logits.float(), dim=1))
    return -(targets * defended.clamp_min(PROB_FLOOR).log()).sum(dim=1).mean()


class DefenseAwareCrossEntropy(Objective):
    """The training-loop objective of :func:`defense_aware_cross_entropy`; ``correct`` counts argmax
    agreement of the clone's clean prediction with the answers."""

    name = "defense-aware-ce"

    def __init__(self, answer: Callable[[Tensor], Tensor]):
        self.answer = answer

    def __call__(self, model, x, y):
        logits = model(x)
        loss = defense_aware_cross_entropy(logits, y, self.answer)
        correct = (logits.detach().argmax(1) == y.argmax(1)).sum()
        return loss, {"correct": correct}


__all__ = ["DefenseAwareCrossEntropy", "defense_aware_answer", "defense_aware_cross_entropy"]
