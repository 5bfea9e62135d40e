"""Defense-aware extraction (Kerckhoffs's principle): the attacker knows the output defense.

A plain clone is fitted to the defended answers ``y~ = O(D(softmax(f(x))))``, so it learns the
*perturbed* function. The defense-aware attacker knows the answer function ``A = O o D`` (defense and
output format, the victim's public :meth:`~qrobust.attacks.extraction.victim.Victim.answer_from_probs`)
and passes candidate clean probabilities through it before the loss::

    L(q; y~) = -sum_k y~_k log max(A(q)_k, 1e-6)                                  (defense-aware CE)

It minimises ``L`` per answer, over the probabilities ``q = softmax(z)`` with ``z`` initialised at the
answer itself (``z_0 = log max(y~, 1e-6)``: of the probability vectors the defense maps onto ``y~``, the
one nearest the answer), by ``inversion_steps`` Adam steps, and fits the clone to the recovered
``q^ = softmax(z*)`` with the plain soft-target CE: the clone fits the clean model under the
perturbation. This is the adaptive attack the DivQAT paper leaves open (issue 12, section 3).

Why not minimise ``L(softmax(c_theta(x)); y~)`` over the clone's weights directly (the same loss with
the clone inside)? Measured on the tests' glyph task (6 classes, 800 transfer queries, 3 seeds), it lost
agreement with the undefended victim (RS beta 0.6: 0.92 -> 0.83; DCP beta 0.6: 0.97 -> 0.26): from a
random start the clone reaches *other* preimages of the answers. Reverse sigmoid with gamma < 1 is not
monotone (a tiny probability is mapped above a moderate one) and DCP's gate is a near-step (nu = 1000)
with huge gradients at the threshold. Inverting each answer from the answer itself, then fitting the
clone, raised agreement instead (RS beta 0.6: 0.91 -> 0.97, beta 1.0: 0.77 -> 0.88; DCP beta 0.9:
0.86 -> 0.96; docs/divqat.md).

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
* no defense: the plain fit (nothing to see through);
* any other callable: used as given (whoever wrote it knows whether torch can differentiate it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from qrobust.attacks.extraction.victim import Victim
from qrobust.defenses.output import Defense

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


def recover_probabilities(
    answers: Tensor, answer: Callable[[Tensor], Tensor], steps: int = 300, lr: float = 0.05
) -> Tensor:
    """The clean probabilities ``q^ = softmax(z*)`` behind defended ``answers``: ``z*`` minimises
    :func:`defense_aware_cross_entropy` row by row, from ``z_0 = log max(answers, 1e-6)``, by ``steps``
    Adam steps of size ``lr`` (Adam's per-coordinate steps keep the rows independent of each other)."""
    with torch.enable_grad():
        z = answers.detach().float().clamp_min(PROB_FLOOR).log().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            loss = defense_aware_cross_entropy(z, answers.detach().float(), answer)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return F.softmax(z.detach(), dim=1).to(answers.dtype)


__all__ = ["defense_aware_answer", "defense_aware_cross_entropy", "recover_probabilities"]
