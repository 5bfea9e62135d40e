"""Stochastic Quantizer (SQ) and the ensemble of quantized networks it defines.

Farkya, Raghavan, Ziskind, "Improving the Robustness of Quantized DNNs to White-Box Attacks using
Stochastic Quantization and Information-Theoretic Ensemble Training", arXiv:2312.00105 (2023).
Threat model: white-box; the attacker may backpropagate through the SQ (it is differentiable), so
attacks must average over draws (EOT) to be fair.

**The quantizer.** Each value ``v`` is quantized to one of ``K`` ordered bin centres
``b_0 < ... < b_{K-1}`` drawn from a categorical distribution whose logits fall with the squared
distance to the bins, in units of the mean bin gap ``D = (b_{K-1} - b_0) / (K - 1)``::

    l_k(v) = -alpha * (v - b_k)**2 / D**2
    k*     = argmax_k (l_k + g_k),       g_k ~ Gumbel(0, 1)   (Gumbel-max: k* ~ Categorical(softmax(l)))
    s      = softmax((l + g) / tau)                            (Gumbel-softmax relaxation, Jang et al. 2017)
    SQ(v)  = b_{k*}  in the forward pass; d SQ / d(v, b) = d (sum_k s_k b_k) / d(v, b)  (straight-through)

so the output is *exactly* a bin value and the gradient is the relaxed sample's. ``alpha`` sets the
noise: a value on a bin centre moves to a neighbour with probability ~``exp(-alpha)`` (alpha = 4:
~2% per neighbour), a value half-way between two bins goes either way with probability 1/2; large
alpha tends to nearest-bin rounding. ``tau`` only shapes the gradient: the hard sample's distribution
is ``softmax(l)`` whatever ``tau`` is (Gumbel-max trick); low ``tau`` gives a gradient closer to the hard
sample but noisier. The paper's text was not retrievable here (only the abstract and a summary); the
exact logit form is our choice and ``alpha``/``tau`` are settings.

**Bins.** Uniform over ``[low, high]`` at initialisation. With ``learnable=True`` the bins are
``b_0 = low + shift`` and ``b_k = b_{k-1} + softplus(r_k)``, so they stay ordered and distinct whatever
the optimiser does; :meth:`StochasticQuantizer.spacing_regulariser` keeps them near the configured grid.

**Inference.** The SQ stays random in ``eval()`` mode: the defense *is* the randomness (the network
with its SQs is an ensemble of quantized networks, one member per draw). ``deterministic=True`` (or the
:func:`deterministic_sq` context) gives nearest-bin rounding, e.g. for a single-member baseline.

**Ensembles.** :func:`ensemble_forward` runs ``N`` draws as one batched forward pass (the input repeated
``N`` times), :func:`ensemble_predict` averages the draws' probabilities, :class:`EnsembleSQ` wraps a
model so that ``forward`` returns the log of that average (a logits-like output for losses and attacks),
:func:`ensemble_entropies` gives ``H(T)``, ``H(T|X)`` and their difference, the mutual information;
:func:`ensemble_stats` and :func:`correct_per_draw` evaluate a model per input.

**Memory.** The SQ materialises ``[..., K]`` tensors per quantized element (logits, noise, relaxed
sample; autograd keeps about three of them): roughly ``3 * K * 4`` bytes per element on top of the
activation itself, times ``N`` under :func:`ensemble_forward`. Keep ``K`` small (2..16); e.g. an SQ on a
3x32x32 input with ``K=8``, ``N=16`` and batch 128 holds ~0.6 GB of such tensors during training.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError

__all__ = [
    "SQConfig",
    "StochasticQuantizer",
    "stochastic_quantizers",
    "spacing_penalty",
    "deterministic_sq",
    "rounded_copy",
    "insert_stochastic_quantizers",
    "check_num_draws",
    "ensemble_forward",
    "ensemble_log_probs",
    "ensemble_predict",
    "ensemble_entropies",
    "EnsembleStats",
    "ensemble_stats",
    "correct_per_draw",
    "MI_READINGS",
    "mi_sqs",
    "sq_bin_probs",
    "representation_entropies",
    "disagreement_rate",
    "diversity_stats",
    "EnsembleSQ",
]


@dataclass
class SQConfig:
    """Settings of one :class:`StochasticQuantizer` (see the module docstring for the formulas).

    ``num_bins`` (K): bins per value, >= 2; memory grows linearly with it.
    ``low``, ``high``: the range the bins cover at initialisation (the inputs' range: [0, 1] for images).
    ``alpha``: sharpness of the bin distribution in units of the bin gap; larger = less noise, less
    diversity (4 is the value the paper summary mentions for LeNet-5/MNIST).
    ``tau``: Gumbel-softmax temperature of the straight-through gradient (> 0).
    ``learnable``: learn the bins' offset and gaps.
    ``deterministic``: nearest-bin rounding instead of sampling (also in training).
    """

    num_bins: int = 4
    low: float = 0.0
    high: float = 1.0
    alpha: float = 4.0
    tau: float = 1.0
    learnable: bool = True
    deterministic: bool = False

    def __post_init__(self):
        k = self.num_bins
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ConfigError(
                f"the stochastic quantizer needs num_bins >= 2 (an integer), got {k!r}; "
                "use 2..16 (memory grows with num_bins)"
            )
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise ConfigError(
                f"the stochastic quantizer's range needs finite low < high, got low={self.low}, "
                f"high={self.high}; set them to the range of the values it quantizes ([0, 1] for images)"
            )
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(
                f"the Gumbel-softmax temperature tau must be a finite number > 0, got {self.tau!r}; "
                "use e.g. 1.0 (lower = gradient closer to the hard sample, but noisier)"
            )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(
                f"alpha must be a finite number > 0, got {self.alpha!r}; "
                "larger alpha = less quantization noise (e.g. 4)"
            )

    @property
    def nominal_gap(self) -> float:
        return (self.high - self.low) / (self.num_bins - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for small and large y


class StochasticQuantizer(nn.Module):
    """Differentiable random quantizer to ``K`` bins (Gumbel-softmax, straight-through; see module doc).

    Applies elementwise to a tensor of any shape; the bins are shared by all elements.
    """

    def __init__(self, config: SQConfig | None = None, **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise ConfigError("give either an SQConfig or keyword settings to StochasticQuantizer, not both")
        # A copy: the `deterministic` flag lives in the config and must not be shared between SQs.
        self.config = replace(config) if config is not None else SQConfig(**kwargs)
        cfg = self.config
        raw = torch.full((cfg.num_bins - 1,), _inverse_softplus(cfg.nominal_gap))
        shift = torch.zeros(())
        if cfg.learnable:
            self.raw_gaps = nn.Parameter(raw)
            self.shift = nn.Parameter(shift)
        else:
            self.register_buffer("raw_gaps", raw)
            self.register_buffer("shift", shift)

    @property
    def deterministic(self) -> bool:
        return self.config.deterministic

    @deterministic.setter
    def deterministic(self, value: bool) -> None:
        self.config.deterministic = bool(value)

    def gaps(self) -> torch.Tensor:
        """Positive gaps ``b_k - b_{k-1}``, shape ``[K-1]``."""
        return F.softplus(self.raw_gaps)

    def bin_centres(self) -> torch.Tensor:
        """Ordered bin centres ``b_0 < ... < b_{K-1}``, shape ``[K]``."""
        start = (self.config.low + self.shift).reshape(1)
        return torch.cat([start, start + torch.cumsum(self.gaps(), 0)])

    def logits(self, v: torch.Tensor, centres: torch.Tensor | None = None) -> torch.Tensor:
        """``l_k(v) = -alpha (v - b_k)^2 / D^2``, shape ``[*v.shape, K]``."""
        b = self.bin_centres() if centres is None else centres
        b = b.to(v.dtype)
        gap = (b[-1] - b[0]) / (b.numel() - 1)
        return -self.config.alpha * (v.unsqueeze(-1) - b).square() / gap.square()

    def probs(self, v: torch.Tensor) -> torch.Tensor:
        """Probability of each bin, ``softmax(l(v))``, shape ``[*v.shape, K]`` (the sampling law)."""
        return torch.softmax(self.logits(v), dim=-1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        b = self.bin_centres().to(v.dtype)
        if not (torch.is_grad_enabled() and (v.requires_grad or b.requires_grad)):
            with torch.no_grad():  # no gradient wanted: only the hard sample is needed
                return self._nearest(v, b) if self.config.deterministic else self._sample_inverse_cdf(v, b)
        return self._gumbel_straight_through(v, b)

    # The three paths below loop over the K bins with elementwise ops on tensors shaped like ``v``: on
    # CPUs that is several times faster than ``[..., K]`` tensors (a last dim of K ~ 4 vectorises
    # badly), and it never materialises them.

    def _distances(self, v: torch.Tensor, b: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``alpha (v - b_k)^2 / D^2`` per bin (so ``l_k = -d_k``) and their elementwise minimum."""
        gap = (b[-1] - b[0]) / (b.numel() - 1)
        scale = self.config.alpha / gap.square()
        d = [(v - b[k]).square() * scale for k in range(b.numel())]
        low = d[0]
        for dk in d[1:]:
            low = torch.minimum(low, dk)
        return d, low

    def _nearest(self, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Nearest-bin rounding (the mode of the law), ties to the lower bin as ``argmax`` does."""
        d, low = self._distances(v, b)
        out = torch.full_like(v, float(b[-1]))
        for k in range(b.numel() - 2, -1, -1):
            out = torch.where(d[k] <= low, b[k], out)
        return out

    def _sample_inverse_cdf(self, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """One exact draw of ``k ~ softmax_k(l_k(v))`` per value by inverse CDF (one uniform per value)."""
        d, low = self._distances(v, b)
        weights = [(low - dk).exp_() for dk in d]  # unnormalised probabilities, the largest is 1
        total = weights[0].clone()
        for w in weights[1:]:
            total.add_(w)
        threshold = torch.rand_like(v).mul_(total)
        out = torch.full_like(v, float(b[0]))
        cdf = weights[0]
        for k in range(1, b.numel()):
            out = torch.where(cdf < threshold, b[k], out)  # k = number of cumulative sums below u
            if k < b.numel() - 1:
                cdf = cdf.add_(weights[k])
        return out

    def _gumbel_straight_through(self, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Hard Gumbel-max sample in value, relaxed Gumbel-softmax gradient (straight-through).

        The value is exactly ``b[k*]``, ``k* = argmax_k (l_k + g_k)``; the gradient w.r.t. ``v`` (and the
        bins, through the logits) is that of ``sum_k s_k b_k`` with ``s = softmax((l + g) / tau)`` and the
        same ``g``. ``relaxed - relaxed.detach()`` is exactly 0. With ``deterministic`` ``g = 0``.
        """
        d, _ = self._distances(v, b)
        if self.config.deterministic:
            perturbed = [-dk for dk in d]
        else:  # Gumbel(0, 1) noise as -log(Exp(1)), as torch's gumbel_softmax: never infinite; [K, *v.shape]
            log_exp = torch.empty((b.numel(), *v.shape), dtype=v.dtype, device=v.device).exponential_().log_()
            perturbed = [-dk - log_exp[k] for k, dk in enumerate(d)]
        top = perturbed[0].detach()
        hard = b[0].expand_as(v)
        for k in range(1, b.numel()):
            better = perturbed[k].detach() > top  # strict: ties keep the lower bin, as argmax
            top = torch.where(better, perturbed[k].detach(), top)
            hard = torch.where(better, b[k], hard)  # the selected bin centre keeps its gradient
        inv_tau = 1.0 / self.config.tau
        num = den = None
        for k, pk in enumerate(perturbed):
            w = ((pk - top) * inv_tau).exp()
            num = w * b[k].detach() if num is None else num + w * b[k].detach()
            den = w if den is None else den + w
        relaxed = num / den
        return hard + (relaxed - relaxed.detach())

    def spacing_regulariser(self) -> torch.Tensor:
        """Bin-spacing penalty ``R = mean_k log(g_k / g_0)^2 + (shift / (high - low))^2``.

        ``g_k`` are the learned gaps, ``g_0 = (high - low) / (K - 1)`` the configured one. ``g_k / g_0``
        is the quantizer's local gain relative to a uniform quantizer of the configured range (a
        Lipschitz-like factor): above 1 it amplifies the quantization noise the next layer sees, below 1
        bins merge and features collapse (the paper's failure sign ``b_1 - b_0 -> 0``); the log penalises
        both and grows without bound on collapse. The shift term keeps the grid on the data's range (a
        grid moved off it sends every value to an edge bin). Zero at initialisation and for fixed bins.
        The paper's exact regulariser was not retrievable (its summary calls it a Lipschitz-style
        bin-spacing term); this form is our choice.
        """
        if not self.config.learnable:
            return self.raw_gaps.new_zeros(())
        log_ratio = torch.log(self.gaps() / self.config.nominal_gap)
        span = self.config.high - self.config.low
        return log_ratio.square().mean() + (self.shift / span).square()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_bins={c.num_bins}, range=({c.low}, {c.high}), alpha={c.alpha}, tau={c.tau}, "
            f"learnable={c.learnable}, deterministic={c.deterministic}"
        )


def stochastic_quantizers(model: nn.Module) -> Iterator[StochasticQuantizer]:
    """All :class:`StochasticQuantizer` modules of ``model``."""
    return (m for m in model.modules() if isinstance(m, StochasticQuantizer))


def spacing_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of :meth:`StochasticQuantizer.spacing_regulariser` over the model's SQs (0 if none)."""
    total = None
    for sq in stochastic_quantizers(model):
        r = sq.spacing_regulariser()
        total = r if total is None else total + r
    if total is None:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


@contextmanager
def deterministic_sq(model: nn.Module, deterministic: bool = True):
    """Temporarily set every SQ of ``model`` to nearest-bin rounding (or back to sampling)."""
    sqs = list(stochastic_quantizers(model))
    before = [sq.deterministic for sq in sqs]
    try:
        for sq in sqs:
            sq.deterministic = deterministic
        yield model
    finally:
        for sq, d in zip(sqs, before, strict=True):
            sq.deterministic = d


def rounded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose SQs round to the nearest bin: the same weights and learned grid without
    the sampling noise (the deterministic control of an SQ network). ``model`` is left as it was."""
    out = copy.deepcopy(model)
    for sq in stochastic_quantizers(out):
        sq.deterministic = True
    return out


def insert_stochastic_quantizers(
    model: nn.Module, after: list[str] | tuple[str, ...] = (), at_input: bool = False, **sq_kwargs
) -> nn.Module:
    """Place SQs after the named submodules and/or at the input; returns the model to use.

    Each module named in ``after`` (names as in ``model.named_modules()``, e.g. ``"features.2"``) is
    swapped *in place* for ``nn.Sequential(module, StochasticQuantizer(**sq_kwargs))``, so its
    parameters' state-dict keys gain a ``.0`` (``features.2.0.weight``). With ``at_input`` the result is a
    new ``nn.Sequential(OrderedDict(sq_input=SQ, net=model))``: use the returned object. Every SQ gets its
    own bins, built from the same settings (``num_bins``, ``low``, ``high``, ``alpha``, ``tau``, ...);
    give ``low``/``high`` that cover the activations (e.g. after a ReLU6, [0, 6]).
    """
    names = list(after)
    SQConfig(**sq_kwargs)  # validate once, before changing anything
    modules = dict(model.named_modules())
    if len(set(names)) != len(names):
        raise ConfigError(f"insert_stochastic_quantizers: a module is named twice in after={names}")
    for name in names:
        if name == "" or name not in modules:
            valid = [n for n in modules if n][:12]
            raise ConfigError(
                f"cannot place a stochastic quantizer after '{name}': the model has no such submodule; "
                f"valid names include: {', '.join(valid)}"
            )
    # Parents are looked up among the original modules, so nested names ("1" and "1.2") both work.
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, nn.Sequential(modules[name], StochasticQuantizer(**sq_kwargs)))
    if at_input:
        return nn.Sequential(OrderedDict(sq_input=StochasticQuantizer(**sq_kwargs), net=model))
    return model


def check_num_draws(n_draws) -> int:
    """Validate an ensemble size: an integer >= 1."""
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ConfigError(
            f"the number of ensemble draws must be an integer >= 1, got {n_draws!r}; "
            "use e.g. 16 (the paper's ensemble size) or 4..8 for quick runs"
        )
    return n_draws


def _starts_with_sq(model: nn.Module) -> bool:
    """True if the first module ``model`` runs is an SQ (nested ``nn.Sequential`` heads followed)."""
    while isinstance(model, nn.Sequential) and len(model) > 0:
        model = model[0]
    return isinstance(model, StochasticQuantizer)


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.repeat(n, *([1] * (x.dim() - 1)))


def ensemble_forward(
    model: nn.Module, x: torch.Tensor, n_draws: int, *, share_prefix: bool = True, max_rows: int | str | None = "auto"
) -> torch.Tensor:
    """Outputs of ``n_draws`` SQ draws, shape ``[N, B, ...]``, from ONE batched forward pass.

    Every SQ's input is repeated ``N`` times (``[N*B, ...]``) where the first SQ meets it: the
    deterministic layers *before* the first SQ run once on the ``B`` inputs (their output is the same for
    every draw), everything from the first SQ on runs on the repeated batch, and each copy gets its own
    SQ noise, so the draws are independent. When the model starts with an SQ (or ``share_prefix=False``)
    the input itself is repeated, as one plain ``model(x.repeat(N, ...))`` call. Peak memory is up to
    ``N`` times a single pass. BatchNorm in training mode sees the repeated batch (or, before the first
    SQ, the original one), whose statistics are the same. A branch that bypasses every SQ (a skip
    connection around the first SQ) stays at ``B`` rows; merging it with the repeated rows fails
    loudly for ``B > 1`` (and broadcasts correctly for ``B == 1``); pass ``share_prefix=False`` there.
    A model without SQs gives ``N`` copies of its single output.

    ``max_rows`` bounds the rows of one pass for a model in eval mode: a batch with ``N * B > max_rows``
    runs as sub-batches of ``max_rows // N`` images, each one batched pass over all ``N`` draws (the same
    law: draws are independent per element and an eval-mode network treats rows independently). On a
    CPU one pass over ``N * B`` rows spills the caches: a 16-draw ensemble of the convnet (SQ after its
    first block) at batch 256 took 26-37x a single batch-256 forward in one pass, 15x in passes of 256
    to 1024 rows and 9-10x in passes of 128 rows (2 threads, this project's CPU). ``"auto"`` = 128 rows
    on a CPU, no limit on a GPU; ``None`` = no limit. A model in train mode is never split (BatchNorm).
    """
    n = check_num_draws(n_draws)
    batch = x.shape[0]
    if max_rows == "auto":
        max_rows = 128 if x.device.type == "cpu" else None
    if max_rows is not None and not model.training and batch > 1 and n * batch > max_rows:
        size = max(1, int(max_rows) // n)
        parts = [ensemble_forward(model, chunk, n, share_prefix=share_prefix, max_rows=None) for chunk in x.split(size)]
        return torch.cat(parts, dim=1)
    sqs = list(stochastic_quantizers(model))
    if n == 1 or not share_prefix or _starts_with_sq(model):
        out = model(_repeat(x, n))
        return out.reshape(n, batch, *out.shape[1:])

    def repeat_once(module, args):
        # The first SQ reached (and any SQ on a branch not yet repeated) repeats its input; SQs
        # downstream of a repeat see N*B rows and leave them as they are.
        if args and isinstance(args[0], torch.Tensor) and args[0].shape[:1] == (batch,):
            return (_repeat(args[0], n), *args[1:])
        return None

    handles = [sq.register_forward_pre_hook(repeat_once) for sq in sqs]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    if out.shape[0] == batch:  # no SQ on the path (n >= 2 here): all draws are the same
        out = _repeat(out, n)
    return out.reshape(n, batch, *out.shape[1:])


def ensemble_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log mean_n softmax(logits_n)`` over the draws (dim 0) of ``[N, B, C]`` logits, stably."""
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


@torch.no_grad()
def ensemble_predict(model: nn.Module, x: torch.Tensor, n_draws: int) -> torch.Tensor:
    """Averaged probabilities ``mean_n softmax(f_n(x))`` of ``n_draws`` draws, shape ``[B, C]``."""
    return ensemble_log_probs(ensemble_forward(model, x, n_draws)).exp()


def ensemble_entropies(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``H(T)``, ``H(T|X)`` and ``I = H(T) - H(T|X)`` (nats) from ``[N, B, C]`` draw logits.

    For one image ``x``, the draw (ensemble member) ``X`` is uniform over the ``N`` draws and ``T`` is the
    predicted class: ``H(T) = H(mean_n p_n)`` is the entropy of the ensemble's averaged prediction,
    ``H(T|X) = mean_n H(p_n)`` the members' mean entropy, and ``I`` their mutual information
    (BALD form, Houlsby et al. 2011): ``I >= 0`` (entropy is concave), ``I = 0`` when all draws agree,
    large when confident members *disagree* -- the "diversity" of the ensemble on that image. It needs
    one image only, no batch statistics. Each of shape ``[B]``; differentiable.
    """
    if logits.dim() != 3:
        raise ConfigError(f"expected draw logits of shape [N, B, C], got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=-1)
    h_draws = -(log_p.exp() * log_p).sum(-1)  # [N, B]
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])
    h_mean = -(log_mean.exp() * log_mean).sum(-1)  # [B]
    h_cond = h_draws.mean(0)
    return h_mean, h_cond, h_mean - h_cond


class EnsembleStats(NamedTuple):
    """Per-input statistics of one ``N``-draw ensemble evaluation (:func:`ensemble_stats`), each ``[B]``.

    ``correct``: the ensemble's prediction (argmax of ``log mean_n softmax(f_n(x))``, what
    :class:`EnsembleSQ` outputs) is the label; ``all_draws_correct``: every one of the ``N`` draws
    classifies the input correctly (both None without labels); ``mi``: the draws' mutual information
    ``I(x) = H(T) - H(T|X)`` (nats, clamped at 0 against round-off; :func:`ensemble_entropies`).
    """

    correct: torch.Tensor | None
    all_draws_correct: torch.Tensor | None
    mi: torch.Tensor


@torch.no_grad()
def ensemble_stats(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, n_draws: int, batch_size: int | None = None
) -> EnsembleStats:
    """:class:`EnsembleStats` of one ``n_draws``-draw ensemble of ``model`` per input, in batches of
    ``batch_size`` inputs (None: one batch); ``y`` may be None (MI only). Runs in the model's current
    mode; draws from the global RNG."""
    check_num_draws(n_draws)
    step = len(x) if batch_size is None else batch_size
    if step < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    correct, all_correct, mi = [], [], []
    for s in range(0, len(x), step):
        logits = ensemble_forward(model, x[s : s + step], n_draws)  # [N, b, C]
        mi.append(ensemble_entropies(logits)[2].clamp_min(0.0))
        if y is not None:
            correct.append(ensemble_log_probs(logits).argmax(1) == y[s : s + step])
            all_correct.append((logits.argmax(-1) == y[s : s + step]).all(0))
    if y is None:
        return EnsembleStats(None, None, torch.cat(mi))
    return EnsembleStats(torch.cat(correct), torch.cat(all_correct), torch.cat(mi))


@torch.no_grad()
def correct_per_draw(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int, batch_size: int | None = None
) -> torch.Tensor:
    """Whether each of ``draws`` independent forward passes of ``model`` classifies each input correctly:
    bool ``[draws, B]``, in batches of ``batch_size`` inputs (None: one batch), all draws of a batch
    before the next batch. The one correctness-over-evaluations function: ``.all(0)`` is the strict
    count (correct on every evaluation; a randomised model gets no credit for lucky draws, the rule of
    :func:`qrobust.attacks.whitebox.robust_accuracy`), ``.float().mean(0)`` the expected one. Runs in the
    model's current mode, on the inputs as given."""
    check_num_draws(draws)
    step = len(y) if batch_size is None else batch_size
    out = []
    for s in range(0, len(y), step):
        xb, yb = x[s : s + step], y[s : s + step]
        out.append(torch.stack([model(xb).argmax(1) == yb for _ in range(draws)]))
    return torch.cat(out, dim=1)


# Which T the MI term of the ensemble objective is about (docs/CHOICES.md, "Which MI"): "output" = the
# class output of each draw, X = the draw (:func:`ensemble_entropies`); "last-sq" = the quantized
# representation at the last SQ (the one before the classifier in the paper's pipeline), X = the input;
# "every-sq" = the quantized values of every SQ (:func:`representation_entropies`).
MI_READINGS = ("output", "last-sq", "every-sq")


def mi_sqs(model: nn.Module, mi_on: str) -> list[StochasticQuantizer]:
    """The SQs whose quantized values are ``T`` in reading ``mi_on`` (:data:`MI_READINGS`): the last SQ
    in module order (the deepest: before the classifier) for ``"last-sq"``, all for ``"every-sq"``, none
    for ``"output"``. A ConfigError when a representation reading meets a model without SQs."""
    if mi_on not in MI_READINGS:
        raise ConfigError(f"the MI reading must be one of {', '.join(MI_READINGS)}, got {mi_on!r}")
    if mi_on == "output":
        return []
    sqs = list(stochastic_quantizers(model))
    if not sqs:
        raise ConfigError(f"MI reading {mi_on!r} needs a model with stochastic quantizers; this one has none")
    return sqs[-1:] if mi_on == "last-sq" else sqs


@contextmanager
def sq_bin_probs(sqs: list[StochasticQuantizer], n_draws: int):
    """Collect, while active, each SQ's sampling law per draw: a list that gets, per forward of an SQ in
    ``sqs`` on ``N * B`` rows (as :func:`ensemble_forward` runs them), its bin probabilities
    ``softmax(l(v))`` shaped ``[N, B, E, K]`` (``E`` values per input; differentiable). The law given the
    draw's input ``v`` is known exactly, so averaging it over the draws estimates the law of ``T`` given the
    image without sampling noise (Rao-Blackwellised)."""
    collected: list[torch.Tensor] = []

    def keep(module, args, _out):
        v = args[0]
        collected.append(module.probs(v).reshape(n_draws, v.shape[0] // n_draws, -1, module.config.num_bins))

    handles = [sq.register_forward_hook(keep) for sq in sqs]
    try:
        yield collected
    finally:
        for h in handles:
            h.remove()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def representation_entropies(probs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``H(T)``, ``H(T|X)`` and the pointwise MI per image (``[B]`` each, nats per quantized value) with
    ``T`` the quantized values of the SQs whose per-draw laws ``probs`` holds (:func:`sq_bin_probs`) and
    ``X`` the input image, estimated on the batch.

    Per value ``j`` of image ``x``: ``p_j(k|x) = mean_n p_j^(n)(k)`` over the ``N`` draws (earlier SQs'
    noise makes each draw's input differ); the batch marginal ``p_j(k) = mean_x p_j(k|x)``. With values
    treated as independent (a mean-field factorisation: the joint law of thousands of values is out of
    reach), ``H(T|X) = mean_j H(p_j(.|x))`` (the draws' diversity on ``x``), ``H(T) = mean_j H(p_j)``
    (the same for every image) and ``i(x) = mean_j KL(p_j(.|x) || p_j)``, whose batch mean is exactly
    ``H(T) - mean_x H(T|X=x)``. Averages over values (not sums) keep ``beta`` independent of the layer's
    size. Differentiable."""
    if not probs:
        raise ConfigError("representation_entropies needs the laws of at least one SQ (sq_bin_probs)")
    cond = torch.cat([p.mean(0) for p in probs], dim=1)  # [B, E_total, K]
    marginal = cond.mean(0, keepdim=True)  # [1, E_total, K]
    h_cond = _entropy(cond).mean(1)
    h_t = _entropy(marginal).mean(1).expand_as(h_cond)
    kl = (cond * (cond.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(-1).mean(1)
    return h_t, h_cond, kl


def disagreement_rate(logits: torch.Tensor) -> torch.Tensor:
    """Per image (``[B]``), the share of the ``N`` draws (``[N, B, C]`` logits) whose top-1 class differs
    from the ensemble's (the argmax of the averaged probabilities): 0 when all draws agree."""
    ensemble = ensemble_log_probs(logits).argmax(-1)
    return (logits.argmax(-1) != ensemble).float().mean(0)


@torch.no_grad()
def diversity_stats(model: nn.Module, x: torch.Tensor, n_draws: int, batch_size: int = 64) -> dict[str, float]:
    """The diversity of ``n_draws`` SQ draws on images ``x`` in both readings (means over the images):
    ``h_t``, ``h_t_given_x``, ``mi`` with ``T`` the quantized representation at the last SQ and ``X`` the
    image (:func:`representation_entropies`, ``H(T)`` over all of ``x``), ``output_mi`` (the class-output
    reading, :func:`ensemble_entropies`) and ``disagreement`` (:func:`disagreement_rate`). Runs in the
    model's current mode, draws from the global RNG."""
    check_num_draws(n_draws)
    sqs = mi_sqs(model, "last-sq")
    cond_sum, count, h_cond, out_mi, disagree = None, 0, [], [], []
    for s in range(0, len(x), batch_size):
        with sq_bin_probs(sqs, n_draws) as probs:
            logits = ensemble_forward(model, x[s : s + batch_size], n_draws, max_rows=None)
        cond = probs[0].mean(0)  # [b, E, K]
        cond_sum = cond.sum(0) if cond_sum is None else cond_sum + cond.sum(0)
        count += cond.shape[0]
        h_cond.append(_entropy(cond).mean(1))
        out_mi.append(ensemble_entropies(logits)[2].clamp_min(0.0))
        disagree.append(disagreement_rate(logits))
    h_t = _entropy(cond_sum / count).mean().item()
    h_t_given_x = torch.cat(h_cond).mean().item()
    return {"h_t": h_t, "h_t_given_x": h_t_given_x, "mi": h_t - h_t_given_x,
            "output_mi": torch.cat(out_mi).mean().item(), "disagreement": torch.cat(disagree).mean().item()}


class EnsembleSQ(nn.Module):
    """A model with SQs seen as its ``n_draws``-member ensemble: ``forward(x) = log mean_n softmax(f_n(x))``.

    The output is a log-probability (usable as logits by ``cross_entropy`` and attacks, since softmax of
    it gives back the averaged probabilities). Attacking this module backpropagates through all
    ``n_draws`` draws at once, i.e. EOT over the ensemble in one pass.
    """

    def __init__(self, model: nn.Module, n_draws: int = 16):
        super().__init__()
        self.model = model
        self.n_draws = check_num_draws(n_draws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(ensemble_forward(self.model, x, self.n_draws))

    def extra_repr(self) -> str:
        return f"n_draws={self.n_draws}"
