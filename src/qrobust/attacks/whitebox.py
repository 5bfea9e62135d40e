"""White-box L-inf / L2 evasion attacks: FGSM, PGD, APGD-CE (each with EOT) and BPDA; robust accuracy; checks.

Threat model: the attacker knows the architecture and the weights and back-propagates through the model
(for quantized models, through the fake-quantized float twin with straight-through gradients). The
attacker changes a test input ``x`` in [0, 1] (NCHW, normalisation inside the model) by ``delta`` with
``||delta||_p <= eps`` (p = inf or 2) and the result stays in [0, 1]. For randomised models (stochastic
quantizers, noise injection) the attacker knows the distribution, not the draws, so it follows the
expected loss gradient (Expectation over Transformation, EOT, Athalye et al. 2018, "Obfuscated
Gradients Give a False Sense of Security"):

    g(x) = 1/n * sum_{i=1..n} grad_x L(f(x; omega_i), y),   omega_i the model's i-th random draw.

Every attack here follows the evasion protocol (:mod:`qrobust.attacks.evasion`: ``attack(model, x, y,
eps=..., norm=..., generator=..., **settings) -> x_adv``, registered by name in ``EVASION``) with
``eot=n`` as a setting of the gradient attacks.
With ``eot_batched=True`` (default) the n draws are one forward pass on the batch repeated n times,
which is right when the model samples its randomness per element (stochastic quantizers, noise
injection); a model that draws one random choice per forward pass (e.g. a random bit width for the
whole batch, as in Double-Win Quant) needs ``eot_batched=False`` (n separate passes).
``eps`` is a float, a fraction such as ``"8/255"`` or a budget name such as ``"linf:8/255"`` /
``"l2:0.5"`` (see :func:`parse_eps`). Attacks maximise the per-sample cross-entropy; with
``targeted=True`` ``y`` holds the target classes and they maximise ``-CE(f(x), y)``. They leave the
model's train/eval mode and ``requires_grad`` flags as they are, never accumulate into ``.grad`` of
parameters (``torch.autograd.grad`` w.r.t. the input only), and return ``x_adv`` detached, in [0, 1],
with ``||x_adv - x|| <= eps`` up to float rounding (~1e-7).

Robust accuracy (:func:`robust_accuracy`) counts an input as robust only if the model classifies both
``x`` and ``x_adv`` correctly on *every* one of ``draws`` independent forward passes, so a randomised
model gets no credit for lucky single draws. :func:`check_attack_setup` warns, like AutoAttack's
``checks.py``, about set-ups that make a gradient attack unreliable.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.evasion import register_evasion
from qrobust.checks import check_int
from qrobust.errors import ConfigError
from qrobust.quant.sq_model import float_twin
from qrobust.quant.stochastic import correct_per_draw
from qrobust.registry import EVASION

__all__ = [
    "NORMS",
    "GradientMaskingWarning",
    "parse_eps",
    "input_gradient",
    "fgsm",
    "pgd",
    "apgd_ce",
    "apgd_checkpoints",
    "bpda",
    "budget_value",
    "check_attack_inputs",
    "check_attack_setup",
    "robust_accuracy",
]

NORMS = ("linf", "l2")
_NORM_ALIASES = {"linf": "linf", "l_inf": "linf", "inf": "linf", "l2": "l2"}

Attack = Callable[..., Tensor]


class GradientMaskingWarning(UserWarning):
    """The attack set-up can make a gradient attack fail silently (robust accuracy overestimated)."""


# --------------------------------------------------------------------------------------------------
# Budgets and argument checks
# --------------------------------------------------------------------------------------------------


def parse_eps(spec: float | int | str) -> tuple[str | None, float]:
    """Parse a perturbation budget into ``(norm or None, eps)``.

    Accepts a number (``0.03``), a fraction (``"8/255"``) or a budget name (``"linf:8/255"``,
    ``"l2:0.5"``). The norm is ``None`` unless the budget names it.

    >>> parse_eps("linf:8/255") == ("linf", 8 / 255)
    True
    >>> parse_eps(0.5)
    (None, 0.5)
    """
    norm = None
    value: object = spec
    if isinstance(spec, str) and ":" in spec:
        name, value = spec.split(":", 1)
        norm = _check_norm(name.strip())
    eps = _parse_number(value, spec)
    if not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"eps must be a finite number >= 0, got {spec!r}; e.g. eps='linf:8/255'")
    return norm, eps


def _parse_number(value: object, spec: object) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(
        f"cannot read eps {spec!r}; write a number (0.03), a fraction ('8/255') "
        "or a budget name ('linf:8/255', 'l2:0.5')"
    )


def _check_norm(norm: str) -> str:
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in _NORM_ALIASES:
        raise ConfigError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    return _NORM_ALIASES[key]


def budget_value(eps: float | int | str, norm: str) -> float:
    """The number of budget ``eps`` for an attack in ``norm``; a :class:`ConfigError` when ``eps`` names
    another norm (``"l2:0.5"`` for an L-inf attack) or is no budget (see :func:`parse_eps`)."""
    named, value = parse_eps(eps)
    if named is not None and named != norm:
        raise ConfigError(
            f"budget {eps!r} is an {named} budget but the attack uses norm={norm!r}; "
            f"pass norm={named!r} or a budget named '{norm}:...'"
        )
    return value


def check_attack_inputs(x: Tensor, y: Tensor) -> None:
    """A :class:`ConfigError` unless ``x`` is a non-empty float batch in [0, 1] and ``y`` one integer label
    per input (the input rule of every evasion attack)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
        raise ConfigError("x must be a non-empty floating-point batch tensor (N, ...), e.g. NCHW images")
    if not isinstance(y, Tensor) or y.shape != x.shape[:1] or y.is_floating_point():
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(
            f"y must be an integer tensor of shape ({x.shape[0]},) (one label per input), got {shape}"
        )
    if x.min() < 0 or x.max() > 1:
        raise ConfigError("x must lie in [0, 1]; put normalisation (mean/std) inside the model's forward")


def _check_labels(logits: Tensor, y: Tensor) -> None:
    if logits.ndim != 2:
        raise ConfigError(f"the model must return logits of shape (N, classes), got {tuple(logits.shape)}")
    if y.min() < 0 or y.max() >= logits.shape[1]:
        raise ConfigError(
            f"labels must lie in [0, {logits.shape[1] - 1}] for a model with {logits.shape[1]} outputs"
        )


def _step_size(step_size: float | None, eps: float, steps: int) -> float:
    if step_size is None:
        return 2.5 * eps / steps  # Madry et al. 2018: 2.5 * eps / steps reaches the boundary from anywhere
    if not isinstance(step_size, numbers.Real) or not math.isfinite(step_size) or step_size <= 0:
        raise ConfigError(
            f"step_size must be a number > 0 (or None for 2.5 * eps / steps), got {step_size!r}"
        )
    return float(step_size)


def _setup(x: Tensor, y: Tensor, eps: float | int | str, norm: str, eot: int) -> tuple[str, float]:
    norm = _check_norm(norm)
    eps = budget_value(eps, norm)
    check_int("eot", eot, 1)
    check_attack_inputs(x, y)
    return norm, eps


# --------------------------------------------------------------------------------------------------
# Geometry: directions, projections, random starts
# --------------------------------------------------------------------------------------------------


def _per_sample(mask_or_value: Tensor, like: Tensor) -> Tensor:
    """Reshape an (N,) tensor so it broadcasts against ``like`` (N, ...)."""
    return mask_or_value.view(-1, *([1] * (like.ndim - 1)))


def _l2(v: Tensor) -> Tensor:
    return _per_sample(v.flatten(1).norm(dim=1), v)


def _direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / (_l2(grad) + 1e-12)


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto the eps-ball around x, then into [0, 1] (clamping never increases ||delta||)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _noise(shape: torch.Size, like: Tensor, generator: torch.Generator | None, normal: bool) -> Tensor:
    device = generator.device if generator is not None else like.device
    sample = torch.randn if normal else torch.rand
    return sample(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A point drawn uniformly from the eps-ball around x (then clamped to [0, 1])."""
    if norm == "linf":
        delta = eps * (2 * _noise(x.shape, x, generator, normal=False) - 1)
    else:  # uniform direction, radius eps * u^(1/d) so that the point is uniform in the ball
        direction = _direction(_noise(x.shape, x, generator, normal=True), "l2")
        radius = eps * _noise(x.shape[:1], x, generator, normal=False) ** (1.0 / x[0].numel())
        delta = direction * _per_sample(radius, x)
    return _project(x + delta, x, eps, norm)


# --------------------------------------------------------------------------------------------------
# Loss and EOT gradient
# --------------------------------------------------------------------------------------------------


def _loss(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """Per-sample loss the attack maximises: CE(f(x), y), or -CE(f(x), target) when targeted."""
    loss = F.cross_entropy(logits, y, reduction="none")
    return -loss if targeted else loss


def _grad_wrt(loss: Tensor, x: Tensor) -> Tensor:
    # A model that detaches its input (int8 kernels, .item(), numpy) yields no graph: report a zero
    # gradient so check_attack_setup flags it, instead of crashing.
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


LossFn = Callable[[Tensor, Tensor], Tensor]


def _eot_grad(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eot: int,
    batched: bool,
    targeted: bool,
    check_labels: bool = False,
    loss_fn: LossFn | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """EOT gradient: the mean over ``eot`` draws of the per-sample loss gradient w.r.t. ``x``.

    Returns ``(grad, loss, logits)`` with loss and logits averaged over the draws (both None for a
    custom ``loss_fn``, whose model outputs need not be logits). ``batched`` runs all draws in one
    forward pass on ``x`` repeated ``eot`` times, which is exact when the model draws its randomness
    independently per sample (per-element noise); the loop is for models whose randomness is shared
    across a batch. ``loss_fn(outputs, labels) -> per-input loss`` replaces the cross-entropy.
    """
    x = x.detach().requires_grad_(True)
    n = x.shape[0]
    custom = loss_fn is not None

    def loss_of(out: Tensor, labels: Tensor) -> Tensor:
        if custom:
            return loss_fn(out, labels)
        if check_labels:
            _check_labels(out, labels)
        return _loss(out, labels, targeted)

    with torch.enable_grad():
        if batched:
            xr = x if eot == 1 else x.repeat(eot, *([1] * (x.ndim - 1)))
            logits = model(xr)
            loss = loss_of(logits, y.repeat(eot))
            grad = _grad_wrt(loss, x)
            if custom:
                return grad.detach() / eot, None, None
            loss, logits = loss.view(eot, n).mean(0), logits.view(eot, n, -1).mean(0)
        else:
            grad, loss, logits = torch.zeros_like(x), 0.0, 0.0
            for _ in range(eot):
                out = model(x)
                draw = loss_of(out, y)
                grad = grad + _grad_wrt(draw, x)
                if not custom:
                    loss, logits = loss + draw.detach(), logits + out.detach()
            if custom:
                return grad.detach() / eot, None, None
            loss, logits = loss / eot, logits / eot
    return grad.detach() / eot, loss.detach(), logits.detach()


def input_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eot: int = 1,
    eot_batched: bool = True,
    targeted: bool = False,
    loss: LossFn | None = None,
) -> Tensor:
    """EOT input gradient (Athalye et al. 2018): ``1/eot * sum_i grad_x L(f(x; omega_i), y)``.

    ``L`` is the per-sample cross-entropy (``-CE`` towards ``y`` when ``targeted``), or
    ``loss(model_outputs, y) -> per-input loss`` when given (e.g. an attack on a defense's score; the
    model may then return any tensor with one leading entry per input, or per draw and input); the
    gradient of sample j depends only on sample j. With ``eot_batched=True`` the ``eot`` draws are one
    forward pass on ``x.repeat(eot, 1, 1, 1)`` (right for per-sample randomness, e.g. stochastic
    quantizers) and ``loss`` gets the repeated labels; with ``False`` they are ``eot`` separate passes.
    The one input-gradient helper of the attacks.
    """
    check_int("eot", eot, 1)
    check_attack_inputs(x, y)
    return _eot_grad(model, x, y, eot, eot_batched, targeted, check_labels=True, loss_fn=loss)[0]


def _fooled(logits: Tensor, y: Tensor, targeted: bool) -> Tensor:
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


# --------------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------------


@register_evasion("fgsm")
def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    *,
    norm: str = "linf",
    targeted: bool = False,
    eot: int = 1,
    eot_batched: bool = True,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> Tensor:
    """FGSM (Goodfellow et al. 2015, "Explaining and Harnessing Adversarial Examples") and FGM (L2).

    White-box, one gradient step of size eps: ``x_adv = clip_[0,1](x + eps * sign(g))`` for L-inf and
    ``x_adv = clip_[0,1](x + eps * g / ||g||_2)`` for L2 (FGM, Miyato et al. 2017), with ``g`` the EOT
    gradient of the cross-entropy (of ``-CE`` towards ``y`` when ``targeted``). ``check`` runs
    :func:`check_attack_setup` first; turn it off inside training loops. FGSM draws nothing:
    ``generator`` is accepted for the evasion protocol (:mod:`qrobust.attacks.evasion`) and unused.
    """
    norm, eps = _setup(x, y, eps, norm, eot)
    if check:
        check_attack_setup(model, x, y, eot)
    x = x.detach()
    grad = _eot_grad(model, x, y, eot, eot_batched, targeted, check_labels=True)[0]
    return _project(x + eps * _direction(grad, norm), x, eps, norm).detach()


@register_evasion("pgd")
def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    *,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    targeted: bool = False,
    eot: int = 1,
    eot_batched: bool = True,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> Tensor:
    """PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks").

    White-box, ``steps`` projected steepest-ascent steps inside the eps-ball, from a uniform random
    point of the ball (``random_start``, drawn with ``generator``; the model's own randomness uses the
    global RNG):

        x_{t+1} = Proj_{B_eps(x) ∩ [0,1]^d}(x_t + a * sign(g_t))          (L-inf)
        x_{t+1} = Proj_{B_eps(x) ∩ [0,1]^d}(x_t + a * g_t / ||g_t||_2)    (L2)

    with ``g_t`` the EOT gradient over ``eot`` draws (EOT-PGD for randomised models) and step size
    ``a = 2.5 * eps / steps`` by default. Returns the last iterate, as in Madry et al.
    """
    norm, eps = _setup(x, y, eps, norm, eot)
    steps = check_int("steps", steps, 1)
    alpha = _step_size(step_size, eps, steps)
    if check:
        check_attack_setup(model, x, y, eot)
    x = x.detach()
    x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
    for t in range(steps):
        grad = _eot_grad(model, x_adv, y, eot, eot_batched, targeted, check_labels=t == 0)[0]
        x_adv = _project(x_adv + alpha * _direction(grad, norm), x, eps, norm)
    return x_adv.detach()


@register_evasion("bpda")
def bpda(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    *,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    targeted: bool = False,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> Tensor:
    """BPDA (Athalye et al. 2018, "Obfuscated Gradients Give a False Sense of Security", Sec. 4.1) with
    the identity as the backward approximation of every quantizer: :func:`pgd` on the model's *float
    twin* (:func:`qrobust.quant.sq_model.float_twin`: the same weights with every fake quantizer off and
    every stochastic quantizer replaced by the identity, no randomness), the examples then evaluated on
    the model itself. Pass the network with its quantizers (for a stochastic-quantizer ensemble the
    network, not its :class:`~qrobust.quant.stochastic.EnsembleSQ` wrapper); a model without quantizers
    is its own twin and BPDA is PGD. If BPDA beats PGD on a quantized model, PGD's gradients were masked.
    ``model`` is left as it is (the twin is a copy).
    """
    return pgd(float_twin(model), x, y, eps, norm=norm, steps=steps, step_size=step_size,
               random_start=random_start, targeted=targeted, generator=generator, check=check)


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations after which APGD may halve its step size (Croce & Hein 2020, Sec. 3.2).

    ``w_j = ceil(p_j * steps)`` with ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
    0.06)``, rounded down per interval as in the reference code:

    >>> apgd_checkpoints(100)
    [22, 41, 57, 70, 80, 87, 93, 99]
    """
    interval, smallest, shrink = (max(int(share * steps), 1) for share in (0.22, 0.06, 0.03))
    points, at = [], interval
    while at <= steps:
        points.append(at)
        interval = max(interval - shrink, smallest)
        at += interval
    return points


def _apgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str,
    steps: int,
    rho: float,
    targeted: bool,
    eot: tuple[int, bool],
    start: Tensor,
    fooled_draws: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """One APGD run from ``start``; returns (x_out, fooled, best loss), x_out a fooling point if found."""

    def grad_at(z: Tensor, first: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        return _eot_grad(model, z, y, eot[0], eot[1], targeted, check_labels=first)

    def fooled_at(z: Tensor, logits: Tensor) -> Tensor:
        now = _fooled(logits, y, targeted)
        with torch.no_grad():  # a randomised model: fooled only if fooled on every one of fooled_draws draws
            for _ in range(fooled_draws - 1):
                idx = now.nonzero().squeeze(1)  # only the points still fooled need another draw
                if idx.numel() == 0:
                    break
                now[idx] = _fooled(model(z[idx]), y[idx], targeted)
        return now

    def pick(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
        return torch.where(_per_sample(mask, new), new, old)

    checkpoints = set(apgd_checkpoints(steps))
    x_cur = start
    grad, loss, logits = grad_at(x_cur, first=True)
    fooled = fooled_at(x_cur, logits)
    x_fool, x_best, grad_best, loss_best = x_cur, x_cur, grad, loss
    step = torch.full_like(loss, 2.0 * eps)  # eta^(0) = 2 eps, per sample
    x_prev, history, last = x_cur, [loss], 0
    loss_best_at_last, reduced_at_last = loss_best, torch.ones_like(fooled)
    for t in range(steps):
        a = 0.75 if t > 0 else 1.0  # momentum: weight of the new step (1 - a on the previous update)
        z = _project(x_cur + _per_sample(step, x) * _direction(grad, norm), x, eps, norm)
        x_prev, x_cur = x_cur, _project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, eps, norm)
        grad, loss, logits = grad_at(x_cur)
        now = fooled_at(x_cur, logits)
        x_fool, fooled = pick(now, x_cur, x_fool), fooled | now
        better = loss > loss_best
        x_best, grad_best, loss_best = (
            pick(better, x_cur, x_best),
            pick(better, grad, grad_best),
            torch.maximum(loss, loss_best),
        )
        history.append(loss)
        if t + 1 in checkpoints:
            window = torch.stack(history)  # losses of the iterates w_{j-1} .. w_j
            increases = (window[1:] > window[:-1]).sum(0)
            reduce = (increases <= rho * (t + 1 - last)) | (
                ~reduced_at_last & (loss_best_at_last >= loss_best)
            )
            step = torch.where(reduce, step / 2, step)
            x_cur, grad = pick(reduce, x_best, x_cur), pick(reduce, grad_best, grad)
            reduced_at_last, loss_best_at_last, last = reduce, loss_best, t + 1
            history = history[-1:]
    return pick(fooled, x_fool, x_best), fooled, loss_best


@register_evasion("apgd-ce")
def apgd_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    *,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    targeted: bool = False,
    eot: int = 1,
    eot_batched: bool = True,
    generator: torch.Generator | None = None,
    x_init: Tensor | None = None,
    fooled_draws: int = 1,
    check: bool = True,
) -> Tensor:
    """APGD-CE (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks"), with EOT for randomised models as AutoAttack's ``version='rand'``.

    White-box, step-size-free PGD on the cross-entropy (``-CE`` towards ``y`` when ``targeted``) from a
    random start, with momentum 0.75:

        z_{k+1} = P(x_k + eta_k * d(g_k)),  d = sign (L-inf) or g / ||g||_2 (L2),  g_k the EOT gradient
        x_{k+1} = P(x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1}))      (x_1 = z_1)

    ``P`` projects onto the eps-ball and [0, 1]; ``eta_0 = 2 eps``. At each checkpoint
    (:func:`apgd_checkpoints`) a sample's step size halves and it restarts from its best point so far if
    (1) its loss rose in at most ``rho`` of the steps since the last checkpoint, or (2) its step size was
    not halved at the last checkpoint and its best loss has not improved since. Returns, per sample, a
    point the model misclassifies (classifies as the target when ``targeted``; for ``eot > 1`` judged on
    the logits averaged over draws) if one was met, else the highest-loss point; ``restarts`` re-runs
    the samples not yet fooled and keeps the higher loss. The first run starts from ``x_init`` (projected
    onto the ball) if given, e.g. a PGD result, else every run from a uniform random point of the ball.

    Versus fra31/auto-attack's ``APGDAttack``: the random start is uniform in the ball (theirs lies on its
    surface) and the first checkpoint counts loss increases from the starting point, as the paper says
    (theirs compares the first step with 0). From the same start on a small tanh MLP (10-100 steps, 200
    inputs) the best losses matched theirs to 1e-6 for L-inf; for L2 all but up to ~20 inputs matched,
    the rest differed by < 2e-2 in loss (not traced; likely rounding in the norms).

    ``fooled_draws``: on a randomised model one lucky draw would mark a point "fooled" and freeze it
    there; with ``fooled_draws = n`` a point counts as fooling only if the gradient pass's output and
    ``n - 1`` further forward passes all misclassify it (each pass only on the points the previous ones
    left fooled; 1 = the reference behaviour).
    """
    norm, eps = _setup(x, y, eps, norm, eot)
    steps = check_int("steps", steps, 1)
    restarts = check_int("restarts", restarts, 1)
    fooled_draws = check_int("fooled_draws", fooled_draws, 1)
    if not isinstance(rho, numbers.Real) or not 0 < rho < 1:
        raise ConfigError(f"rho must be in (0, 1) (the paper uses 0.75), got {rho!r}")
    if x_init is not None and (not isinstance(x_init, Tensor) or x_init.shape != x.shape):
        raise ConfigError(
            f"x_init must be a tensor shaped like x {tuple(x.shape)}, or None for a random start"
        )
    if check:
        check_attack_setup(model, x, y, eot)
    x = x.detach()
    x_adv, loss_adv = x.clone(), torch.full(y.shape, -math.inf, dtype=x.dtype, device=x.device)
    todo = torch.ones_like(y, dtype=torch.bool)
    for run in range(restarts):
        idx = todo.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        if run == 0 and x_init is not None:
            start = _project(x_init[idx].detach(), x[idx], eps, norm)
        else:
            start = _random_start(x[idx], eps, norm, generator)
        out, fooled, loss = _apgd_run(
            model, x[idx], y[idx], eps, norm, steps, rho, targeted, (eot, eot_batched), start, fooled_draws
        )
        keep = fooled | (loss > loss_adv[idx])
        x_adv[idx[keep]], loss_adv[idx[keep]] = out[keep], loss[keep]
        todo[idx[fooled]] = False
    return x_adv.detach()


# --------------------------------------------------------------------------------------------------
# Sanity checks (after AutoAttack's checks.py)
# --------------------------------------------------------------------------------------------------


def _differs(a: Tensor, b: Tensor) -> bool:
    scale = a.abs().max().clamp_min(1.0)
    return bool((a - b).abs().max() > 1e-4 * scale)


def _looks_like_probabilities(out: Tensor, tol: float = 1e-5) -> bool:
    rows = out.flatten(1)
    return bool(rows.min() > -tol and rows.max() < 1 + tol and ((rows.sum(1) - 1).abs() < tol).all())


def check_attack_setup(
    model: nn.Module, x: Tensor, y: Tensor, eot: int = 1, *, zero_grad_share: float = 0.5
) -> list[str]:
    """Warn (:class:`GradientMaskingWarning`) about set-ups that make gradient attacks unreliable.

    After AutoAttack's ``checks.py`` (Croce & Hein 2020) and Athalye et al. 2018. Checks: (a) the model
    is randomised (two forward passes on ``x`` differ) but ``eot == 1``; (b) the input gradient of the
    cross-entropy is all zero or non-finite for at least ``zero_grad_share`` of the batch (masked
    gradients, e.g. hard rounding, int8 kernels, detached inputs); (c) the outputs look like
    probabilities (rows in [0, 1] summing to 1) instead of logits; (d) the model is in training mode
    with BatchNorm layers (batch statistics couple samples and the running statistics get updated).
    Returns the messages (empty when all is well). Costs two forward passes and one backward pass.
    """
    check_int("eot", eot, 1)
    check_attack_inputs(x, y)
    x = x.detach()
    with torch.no_grad():
        first, second = model(x), model(x)
    messages = []
    if eot == 1 and _differs(first, second):
        messages.append(
            "the model is randomised (two forward passes on the same input differ) but eot=1: a "
            "single-draw gradient overestimates robustness; pass eot=N (e.g. 10-20, Athalye et al. 2018) "
            "and evaluate with robust_accuracy(..., draws=N)"
        )
    grad = _eot_grad(model, x, y, 1, True, False, check_labels=True)[0].flatten(1)
    masked = (grad == 0).all(1) | ~torch.isfinite(grad).all(1)
    if masked.float().mean() >= zero_grad_share:
        messages.append(
            f"{int(masked.sum())} of {len(masked)} inputs have all-zero or non-finite input gradients: the "
            "model masks gradients (hard rounding, int8 kernels, detached inputs?); attack the fake-quantized "
            "twin with straight-through gradients, use BPDA (Athalye et al. 2018) or a gradient-free attack"
        )
    if _looks_like_probabilities(first):
        messages.append(
            "the model's outputs look like probabilities (rows in [0, 1] summing to 1), not logits: "
            "cross-entropy on them saturates; remove the final softmax for the attack"
        )
    if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        messages.append(
            "the model is in training mode with BatchNorm: attack forward passes use batch statistics and "
            "update the running statistics; call model.eval() before attacking"
        )
    for message in messages:
        warnings.warn(GradientMaskingWarning(message), stacklevel=2)
    return messages


# --------------------------------------------------------------------------------------------------
# Robust accuracy (clean accuracy: qrobust.metrics.accuracy, with the same ``draws`` rule)
# --------------------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(start, start + batch_size) for start in range(0, n, batch_size)]


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str | Attack,
    *,
    draws: int = 1,
    batch_size: int = 256,
    **attack_kwargs: object,
) -> float:
    """Robust accuracy under ``attack`` (a name in ``EVASION`` or a function), run batch-wise.

    An input counts as robust only if the model classifies ``x`` and ``attack(model, x, y, **kwargs)``
    correctly on all ``draws`` independent forward passes each (as in AutoAttack, inputs misclassified
    clean are not attacked and count as not robust, so robust accuracy <= clean accuracy). ``eps`` and
    the attack's options go in ``attack_kwargs``; the set-up checks run on the first batch only.
    """
    draws = check_int("draws", draws, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if "eps" not in attack_kwargs:
        raise ConfigError(
            "robust_accuracy needs the attack budget, e.g. robust_accuracy(..., eps='linf:8/255')"
        )
    if attack_kwargs.get("targeted"):
        raise ConfigError("robust_accuracy measures untargeted robustness; drop targeted=True")
    attack_fn = EVASION.get(attack) if isinstance(attack, str) else attack
    accepts_check = "check" in inspect.signature(attack_fn).parameters
    check_attack_inputs(x, y)
    robust = 0
    for i, b in enumerate(_batches(len(y), batch_size)):
        xb, yb = x[b], y[b]
        correct = correct_per_draw(model, xb, yb, draws).all(0)
        idx = correct.nonzero().squeeze(1)
        if idx.numel() > 0:
            kwargs = {**attack_kwargs, "check": False} if accepts_check and i > 0 else attack_kwargs
            x_adv = attack_fn(model, xb[idx], yb[idx], **kwargs)
            correct[idx] = correct_per_draw(model, x_adv, yb[idx], draws).all(0)
        robust += int(correct.sum())
    return robust / len(y)
