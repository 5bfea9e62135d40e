"""Score-based black-box L-inf attack: Square Attack (Andriushchenko et al., ECCV 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search").

Why it is here: gradient attacks on quantized and randomised models rely on straight-through or relaxed
gradients, which can point the wrong way (gradient masking). Square Attack uses only the model's
outputs, so a model that looks robust to PGD but not to Square was masking gradients, not robust.

Threat model: the attacker queries the model's scores (logits or log-probabilities) on inputs of its
choice, ``||x_adv - x||_inf <= eps``, ``x_adv`` in [0, 1]. Algorithm (L-inf, untargeted):

    margin(x) = z_y(x) - max_{k != y} z_k(x)            (z = model output; fooled when < 0)
    init      x_0 = clip(x + eps * s),  s in {-1, +1}^{C x 1 x W} vertical stripes
    step t    side h_t = round(sqrt(p_t * H * W)), a random h_t x h_t window per image, a random
              sign per channel; in the window the perturbation is set to +-eps; accept the candidate
              for an image if its margin decreases; stop an image once it is fooled.

``p_t`` follows the paper's schedule (``p_init`` halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000
and 8000 of 10000 iterations, rescaled to ``queries``). Every image in the batch gets its own window
and signs in one batched forward per step: no per-image Python loop. One query = one forward of one
image; the returned ``x_adv`` used at most ``queries`` of them (the init counts as one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrobust.attacks.whitebox import _budget, _check_inputs, _check_int
from qrobust.errors import ConfigError
from qrobust.registry import ATTACKS

__all__ = ["square_attack", "margin"]

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10000 iterations: halve p after each


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{k != y} z_k`` per row: < 0 means misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return true - other


def _p_at(p_init: float, t: int, queries: int) -> float:
    scaled = int(t / max(queries, 1) * 10000)
    return p_init / 2 ** sum(scaled > b for b in _SCHEDULE)


@torch.no_grad()
def _scores(model: nn.Module, x: Tensor, y: Tensor, draws: int) -> Tensor:
    """Margin, averaged over ``draws`` forward passes (a randomised model gives noisy scores)."""
    total = margin(model(x).float(), y)
    for _ in range(draws - 1):
        total += margin(model(x).float(), y)
    return total / draws


@ATTACKS.register("square")
def square_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    *,
    norm: str = "linf",
    queries: int = 1000,
    p_init: float = 0.05,
    draws: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Square Attack (L-inf, untargeted, margin loss); see the module docstring. ``draws`` averages the
    margin over that many forward passes per query (for randomised models; each costs a query)."""
    if norm != "linf":
        raise ConfigError(f"square_attack implements the L-inf attack only, got norm={norm!r}; use norm='linf'")
    eps = _budget(eps, "linf")
    _check_inputs(x, y)
    queries = _check_int("queries", queries, 1)
    draws = _check_int("draws", draws, 1)
    if not 0 < p_init <= 1:
        raise ConfigError(f"p_init (share of the image a square covers at first) must be in (0, 1], got {p_init}")
    x = x.detach()
    n, c, h, w = x.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def rand_sign(*shape: int) -> Tensor:
        bits = torch.randint(0, 2, shape, generator=generator, device=gen_device).to(x.device, x.dtype)
        return bits * 2 - 1

    x_adv = (x + eps * rand_sign(n, c, 1, w)).clamp(0, 1)
    best = _scores(model, x_adv, y, draws)
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    for t in range(1, queries):
        active = (best >= 0).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        side = max(1, min(h, w, round((_p_at(p_init, t, queries) * h * w) ** 0.5)))
        m = active.numel()
        top = torch.randint(0, h - side + 1, (m,), generator=generator, device=gen_device).to(x.device)
        left = torch.randint(0, w - side + 1, (m,), generator=generator, device=gen_device).to(x.device)
        window = ((rows >= top.view(m, 1, 1, 1)) & (rows < top.view(m, 1, 1, 1) + side)
                  & (cols >= left.view(m, 1, 1, 1)) & (cols < left.view(m, 1, 1, 1) + side))
        xa, x0 = x_adv[active], x[active]
        target = (x0 + eps * rand_sign(m, c, 1, 1)).clamp(0, 1)
        candidate = torch.where(window, target, xa)
        score = _scores(model, candidate, y[active], draws)
        better = score < best[active]
        x_adv[active[better]] = candidate[better]
        best[active[better]] = score[better]
    return x_adv.detach()
