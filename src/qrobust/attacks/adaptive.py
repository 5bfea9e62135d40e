"""Attacks adapted to a defense: EOT-PGD against a stochastic-quantizer ensemble *and* its MI detector.

Threat model (white-box, L-inf): the attacker knows the weights, the SQs' distribution (not their
draws) and the detector (:class:`~qrobust.defenses.detection.MIDetector`, which flags inputs by the
ensemble's mutual information ``I(x) = H(T) - H(T|X)``). Following Tramer et al. 2020 ("On Adaptive
Attacks to Adversarial Example Defenses"), it optimises for misclassification and for staying on the
detector's unflagged side at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.evasion import register_evasion
from qrobust.attacks.whitebox import budget_value, input_gradient
from qrobust.errors import ConfigError
from qrobust.quant.stochastic import check_num_draws, ensemble_entropies, ensemble_forward, ensemble_log_probs

__all__ = ["mi_adaptive_pgd"]


class _Draws(nn.Module):
    """``n_draws`` draws of a network with SQs as one output ``[N, B, C]`` (one batched pass)."""

    def __init__(self, model: nn.Module, n_draws: int):
        super().__init__()
        self.model, self.n_draws = model, n_draws

    def forward(self, x: Tensor) -> Tensor:
        return ensemble_forward(self.model, x, self.n_draws)


@register_evasion("mi-adaptive-pgd")
def mi_adaptive_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    *,
    norm: str = "linf",
    n_draws: int,
    steps: int = 10,
    eot: int = 1,
    lam: float = 1.0,
    sign: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adaptive L-inf EOT-PGD against the ensemble *and* the MI detector (Tramer et al. 2020's recipe).

    Ascends ``L(x) = CE(log mean_n softmax(f_n(x)), y) - lam * sign * I(x)`` averaged over ``eot``
    independent ``n_draws``-member ensembles of ``model`` (a network with SQs, not its
    :class:`~qrobust.quant.stochastic.EnsembleSQ` wrapper), with ``I = H(T) - H(T|X)`` the detector's
    score: ``sign = +1`` against a detector that flags high MI (the attacker keeps MI low), ``-1``
    against one that flags low MI; ``lam = 0`` is plain EOT-PGD on the ensemble. Random start (drawn
    with ``generator``; the SQ noise uses the global RNG), step ``2.5 eps / steps``, projection onto
    the ball and [0, 1]; the gradient is :func:`~qrobust.attacks.whitebox.input_gradient` with this
    loss. L-inf only (``norm`` must be ``"linf"``). Returns ``x_adv`` detached; the model's mode and
    parameters are untouched.
    """
    if norm != "linf":
        raise ConfigError(f"mi_adaptive_pgd implements the L-inf attack only, got norm={norm!r}; use norm='linf'")
    eps = budget_value(eps, "linf")
    check_num_draws(n_draws)
    x = x.detach()
    if eps == 0:
        return x.clone()
    draws = _Draws(model, n_draws)

    def loss(logits: Tensor, labels: Tensor) -> Tensor:  # logits [N, rows, C] -> per-row loss
        ce = F.nll_loss(ensemble_log_probs(logits), labels, reduction="none")
        return ce - lam * sign * ensemble_entropies(logits)[2]

    noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
    x_adv = (x + eps * (2 * noise.to(x.device, x.dtype) - 1)).clamp(0, 1)
    alpha = 2.5 * eps / steps
    for _ in range(steps):
        grad = input_gradient(draws, x_adv, y, eot=eot, loss=loss)
        x_adv = (x + (x_adv + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv.detach()
