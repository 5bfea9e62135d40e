"""Uniform fake quantization for quantization-aware training (QAT) at 2..8 bits.

Weights: per-output-channel *symmetric* narrow-range quantization (Jacob et al. 2018, Krishnamoorthi
2018), for ``b`` bits with ``q_max = 2**(b-1) - 1``::

    s_c = max|W_c| / q_max,    W_q = s_c * clamp(round(W / s_c), -q_max, q_max)

Activations: per-tensor *asymmetric* quantization with a range ``[lo, hi]`` tracked as an exponential
moving average of batch min/max (torch's ``MovingAverageMinMaxObserver``, constant 0.01), widened to
contain 0 so that zero is exact, with ``n = 2**b - 1`` levels (``2**(b-1) - 1`` with ``reduce_range``,
which the x86 int8 kernels need to avoid int16 overflow)::

    s = (hi - lo) / n,   z = clamp(round(-lo / s), 0, n),   x_q = s * (clamp(round(x / s) + z, 0, n) - z)

Gradients pass straight through (STE, Bengio et al. 2013); for activations the straight-through
gradient is zero outside the clipping range (torch's ``fake_quantize_*`` ops, used here).

QAT is a module swap: :func:`quantize` replaces ``nn.Conv2d`` / ``nn.Linear`` by
:class:`QuantConv2d` / :class:`QuantLinear` (same parameters, fake-quantized weights in ``forward``) and
each :class:`QuantPoint` marker of a model by an :class:`ActQuant`. The bit width of the *body* can be
changed at run time with :func:`set_bit_width`, as dynamic bit-width training needs.

**Edges.** As deployed low-bit networks do, the input quantizer and the logits stay at
``QuantConfig.edge_bits`` (default 8) whatever the body's width: a 2-bit body whose logits were 2-bit
would give 4 distinct logit values, and half of its predictions would be ties broken by ``argmax``'s
lowest index. The logit quantizer uses the full 8-bit range (256 levels, also on the ``server``
backend: it feeds no kernel, so ``reduce_range`` does not apply); ``float_logits=True`` leaves the logits
unquantized, as a QDQ ONNX graph may. :func:`calibrate` sets activation ranges from data without
touching anything else (BatchNorm statistics, weights).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.config import check_act_range
from qrobust.errors import ConfigError
from qrobust.utils import eval_mode

MIN_BITS, MAX_BITS = 2, 8
_EPS = 1e-8


@dataclass
class QuantConfig:
    """What to quantize and how.

    ``backend`` names the deployment target of an 8-bit model: ``server`` (x86, fbgemm kernels; 8-bit
    activations use a 7-bit range, ``reduce_range``) or ``mobile`` (ARM, qnnpack; full 8-bit range).
    ``weight_bits`` is the body's width; ``act_bits`` (default: the same) its activations' width, the
    meaning of the CLI's ``quant.bits=b``. ``first_last_bits`` keeps the *weights* of the first conv and
    the classifier at that width when the body goes lower (common practice since DoReFa/PACT: those two
    layers are small and the most sensitive); ``None`` quantizes them at the body's width too.
    ``edge_bits`` is the width of the input quantizer and of the logits (the first and last quant point,
    by module order) at every body width; ``0`` makes them follow the body, the behaviour before
    2026-11-30, kept only to reproduce old numbers (it ties half of a 2-bit model's predictions).
    ``float_logits`` leaves the logits unquantized (ONNX QDQ export can deploy that; torch's int8
    modules cannot, so :func:`~qrobust.quant.deploy.export_int8` refuses such a model).
    """

    weight_bits: int = 8
    act_bits: int | None = None  # None = weight_bits
    backend: str = "server"
    first_last_bits: int | None = 8
    ema_momentum: float = 0.01
    act_range: str = "ema"  # ema: EMA min/max (frozen in eval) | learned: LSQ+-style learned [lo, hi]
    edge_bits: int = 8  # input quantizer and logits; 0 = follow the body (old behaviour)
    float_logits: bool = False

    def __post_init__(self):
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is None:
            self.act_bits = self.weight_bits
        check_bits(self.act_bits, "act_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.edge_bits != 0:
            check_bits(self.edge_bits, "edge_bits (0 = follow the body)")
        if not isinstance(self.float_logits, bool):
            raise ConfigError(f"float_logits must be true or false, got {self.float_logits!r}")
        if self.backend not in ("server", "mobile"):
            raise ConfigError(f"quantization backend '{self.backend}' is unknown; use 'server' (x86) or 'mobile' (ARM)")
        if not 0.0 < self.ema_momentum <= 1.0:
            raise ConfigError(f"ema_momentum must be in (0, 1], got {self.ema_momentum}")
        check_act_range(self.act_range)

    @property
    def reduce_range(self) -> bool:
        return self.backend == "server"

    def edge_width(self, body_bits: int) -> int:
        """The input quantizer's and the logits' width when the body's activations are ``body_bits``."""
        return self.edge_bits or body_bits

    def to_dict(self) -> dict:
        return asdict(self)


def check_bits(bits, what: str = "bit width") -> int:
    """Validate a bit width: an int in [2, 8]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}; "
            "use 32 (or no quantization) for a float model"
        )
    return bits


def weight_qparams(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Per-output-channel symmetric scale ``s_c = max|W_c| / q_max`` and ``q_max`` for ``bits``."""
    q_max = 2 ** (bits - 1) - 1
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    return (amax / q_max).clamp_min(_EPS), q_max


def weight_int_repr(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes ``clamp(round(W / s_c), -q_max, q_max)`` and scales; used by int8 export.

    Uses the same arithmetic as torch's fake-quant kernel (multiply by the float32 inverse scale, round
    half to even) so the exported integers are exactly those the QAT twin used.
    """
    scale, q_max = weight_qparams(weight, bits)
    inv = (1.0 / scale).view(-1, *([1] * (weight.dim() - 1)))
    codes = torch.clamp(torch.round(weight.detach() * inv), -q_max, q_max)
    return codes.to(torch.int8), scale


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel symmetric fake quantization with a straight-through gradient."""
    scale, q_max = weight_qparams(weight, bits)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -q_max, q_max)


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero point for the range ``[lo, hi]`` widened to contain 0."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = ((hi - lo) / levels).clamp_min(_EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels).to(torch.int32)
    return scale.reshape(1).float(), zero_point.reshape(1)


class _FakeQuantSTE(torch.autograd.Function):
    """Per-tensor affine fake quantization with the straight-through gradient (zero where clipped)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, levels):
        q = x * (1.0 / scale)
        q.round_().add_(zero_point)
        ctx.save_for_backward((q >= 0) & (q <= levels))
        return q.clamp_(0, levels).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """``(clamp(round(x / s) + z, 0, L) - z) * s``, bit-identical to ``torch.fake_quantize_per_tensor_affine``
    (same ``x * (1 / s)`` and round-half-even) with the same straight-through gradient, but as in-place
    elementwise passes: ~2.8x faster on CPU for channels-last activations, where torch's kernel is slow.
    Other dtypes (bf16 under autocast) use torch's kernel."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, levels)
    z = zero_point.to(torch.float32)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuantSTE.apply(x, scale, z, levels)
    q = x * (1.0 / scale)
    return q.round_().add_(z).clamp_(0, levels).sub_(z).mul_(scale)


class QuantPoint(nn.Identity):
    """Marks where a model's activations are quantized; an identity in a float model.

    :func:`quantize` replaces each marker by an :class:`ActQuant`; int8 export reads the range there.
    """


class ActQuant(nn.Module):
    """Per-tensor asymmetric activation fake quantizer over a range ``[lo, hi]`` (widened to contain 0).

    ``learned=False``: the range is an EMA of the batches' min/max in training, frozen in eval mode.
    ``learned=True``: the range starts at the first training batch's min/max and is then a pair of
    parameters learned with the network (LSQ+, Bhalgat et al. 2020; LSQ, Esser et al. 2020): the output
    is ``(clamp(round(x / s) + z, 0, L) - z) * s`` with ``s = (hi - lo) / L`` and ``z = -lo / s``, and
    the gradients w.r.t. ``s`` and ``z`` are LSQ's, scaled by ``1 / sqrt(numel * L)``. The clipping
    range is then chosen for the task loss instead of covering every outlier, which is what makes 2-bit
    activations usable. Since the parameters are the range (not the step), a run-time bit-width switch
    keeps the range and only changes the number of levels ``L``.

    ``role`` is ``"input"``, ``"body"`` or ``"logits"``: :func:`set_bit_width` switches body quantizers
    only (unless the model's ``edge_bits`` is 0).
    """

    ROLES = ("input", "body", "logits")

    def __init__(self, bits: int = 8, momentum: float = 0.01, reduce_range: bool = False, learned: bool = False,
                 role: str = "body"):
        super().__init__()
        if role not in self.ROLES:
            raise ConfigError(f"ActQuant role '{role}' is unknown; use one of {', '.join(self.ROLES)}")
        self.bits = check_bits(bits)
        self.momentum = momentum
        self.reduce_range = reduce_range
        self.learned = bool(learned)
        self.role = role
        self.enabled = True
        self.calibrating = False  # set by calibrate(): observe running min/max in any mode
        if self.learned:
            self.lo = nn.Parameter(torch.zeros(()))
            self.hi = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("lo", torch.zeros(()))
            self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def levels(self) -> int:
        bits = self.bits - 1 if (self.reduce_range and self.bits == MAX_BITS) else self.bits
        return 2**bits - 1

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return act_qparams(self.lo.detach(), self.hi.detach(), self.levels)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Move the range towards this batch's min/max by ``momentum`` (EMA; the first batch sets it)."""
        lo, hi = torch.aminmax(x.detach().float())
        if self._first_range(lo, hi):
            return
        self.lo.lerp_(lo, self.momentum)
        self.hi.lerp_(hi, self.momentum)

    @torch.no_grad()
    def observe_min_max(self, x: torch.Tensor) -> None:
        """Widen the range to the running min/max of everything seen (what :func:`calibrate` uses)."""
        lo, hi = torch.aminmax(x.detach().float())
        if self._first_range(lo, hi):
            return
        self.lo.copy_(torch.minimum(self.lo, lo))
        self.hi.copy_(torch.maximum(self.hi, hi))

    def _first_range(self, lo: torch.Tensor, hi: torch.Tensor) -> bool:
        """Set the range to ``[lo, hi]`` if none was observed yet; True when it did."""
        if bool(self.initialized):
            return False
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        self.initialized.fill_(True)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self.observe_min_max(x)
        elif self.training and not (self.learned and bool(self.initialized)):
            self.observe(x)  # EMA ranges: every training batch; learned ranges: the first one only
        elif not bool(self.initialized):
            raise RuntimeError(
                "activation quantizer has no range yet: call qrobust.quant.calibrate(model, images) "
                "(or train at least one step) before evaluating"
            )
        if self.learned and torch.is_grad_enabled() and self.hi.requires_grad:
            return self._learned_forward(x)
        scale, zero_point = self.qparams()
        return fake_quantize_activation(x, scale, zero_point, self.levels)

    def _learned_forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.levels
        lo, hi = self.lo.clamp(max=0.0), self.hi.clamp(min=0.0)
        scale = ((hi - lo) / levels).clamp_min(_EPS).reshape(1).float()
        zero_point = (-lo / scale).reshape(1).float()
        grad_factor = 1.0 / math.sqrt(x.numel() * levels)
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, 0, levels, grad_factor)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, reduce_range={self.reduce_range}, role={self.role}"


class _WeightQuantMixin:
    """Per-channel fake-quantized weights for a float layer class (``float_class``), same parameters."""

    bits: int
    enabled: bool
    float_class: type[nn.Module]

    @classmethod
    def from_float(cls, layer: nn.Module, bits: int):
        """The quantized view of ``layer``: the same Parameter objects (an optimizer built on the model
        keeps working), with ``bits``-bit weights."""
        new = copy.copy(layer)
        new.__class__ = cls
        new.bits, new.enabled = check_bits(bits), True
        return new

    def to_float(self) -> nn.Module:
        """The float layer again (same parameters), without the quantizer's attributes."""
        new = copy.copy(self)
        new.__class__ = self.float_class
        del new.bits, new.enabled
        return new

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize_weight(self.weight, self.bits) if self.enabled else self.weight

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}"


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses per-channel fake-quantized weights (same parameters)."""

    float_class = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """``nn.Linear`` whose forward uses per-channel fake-quantized weights (same parameters)."""

    float_class = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, config: QuantConfig | None = None, *, inplace: bool = False) -> nn.Module:
    """Return the QAT twin of ``model``: conv/linear layers and quant points swapped for fake quantizers.

    The twin is a deep copy (unless ``inplace``), so the float model stays usable as the DivQAT teacher.
    """
    config = config or QuantConfig()
    if is_quantized(model):
        raise ConfigError("model is already quantized; use set_bit_width() to change its bit width")
    qmodel = model if inplace else copy.deepcopy(model)
    layers = _weight_layers(qmodel)
    edge = {layers[0][0], layers[-1][0]} if layers else set()
    for name, layer in layers:
        bits = config.weight_bits
        if name in edge and config.first_last_bits is not None:
            bits = max(bits, config.first_last_bits)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        _replace(qmodel, name, cls.from_float(layer, bits))
    points = [name for name, module in qmodel.named_modules() if isinstance(module, QuantPoint)]
    roles = {name: "body" for name in points}
    if len(points) >= 2:  # by module order: the first marker quantizes the input, the last the logits
        roles[points[0]], roles[points[-1]] = "input", "logits"
    for name in points:
        role = roles[name]
        if role == "logits" and config.float_logits:
            continue  # the marker stays an identity: float logits
        bits = config.act_bits if role == "body" else config.edge_width(config.act_bits)
        # Logits feed no int8 kernel, so they get the full 8-bit range on every backend (not in the old mode).
        reduce_range = config.reduce_range and not (role == "logits" and config.edge_bits)
        _replace(qmodel, name, ActQuant(bits, config.ema_momentum, reduce_range,
                                        learned=config.act_range == "learned", role=role))
    qmodel.quant_config = config
    qmodel.quant_edge_layers = sorted(edge)
    return qmodel


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantConv2d, QuantLinear, ActQuant)) for m in model.modules())


def set_bit_width(model: nn.Module, bits: int, act_bits: int | None = None) -> nn.Module:
    """Switch a QAT model's body to ``bits``-bit weights (and ``act_bits``, default ``bits``) in place.

    The first/last layers' weights stay at ``config.first_last_bits`` when that is set; the input and
    logit quantizers stay at ``config.edge_bits`` (they follow the body only when it is 0). Any other
    module with an ``on_bit_width(bits)`` method (e.g. DWQ's BatchNorm-per-bit-width) is told the new
    width. Returns the model.
    """
    check_bits(bits, "weight bit width")
    act_bits = check_bits(bits if act_bits is None else act_bits, "activation bit width")
    if not is_quantized(model):
        raise ConfigError("set_bit_width needs a quantized model: call qrobust.quant.quantize(model) first")
    config: QuantConfig = getattr(model, "quant_config", QuantConfig())
    edge = set(getattr(model, "quant_edge_layers", ()))
    # Hooks first: a hook that refuses the width (e.g. no BatchNorm for it) leaves the layers untouched.
    for module in model.modules():
        if hasattr(module, "on_bit_width"):
            module.on_bit_width(bits)
    for name, module in model.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            keep = name in edge and config.first_last_bits is not None
            module.bits = max(bits, config.first_last_bits) if keep else bits
        elif isinstance(module, ActQuant):
            module.bits = act_bits if module.role == "body" else config.edge_width(act_bits)
    return model


def get_bit_width(model: nn.Module) -> int | None:
    """The body's weight bit width of a QAT model (None for a float model)."""
    edge = set(getattr(model, "quant_edge_layers", ()))
    for name, module in model.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)) and name not in edge:
            return module.bits
    for module in model.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            return module.bits
    return None


def set_quantization_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn all fake quantizers on or off (off = the float network with the same weights)."""
    for module in model.modules():
        if isinstance(module, (QuantConv2d, QuantLinear, ActQuant)):
            module.enabled = enabled
    return model


def activation_quantizers(model: nn.Module, role: str | None = None) -> list[ActQuant]:
    """The model's :class:`ActQuant` modules (of one ``role`` if given), in module order."""
    return [m for m in model.modules() if isinstance(m, ActQuant) and (role is None or m.role == role)]


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor, batch_size: int = 256, *, reset: bool = True) -> nn.Module:
    """Set a quantized model's activation ranges to the min/max its quantizers see on images ``x``.

    Post-training calibration with a min/max observer (Jacob et al. 2018; torch's ``MinMaxObserver``):
    the model runs in eval mode, so BatchNorm uses and keeps its running statistics; nothing but the
    ranges of the :class:`ActQuant` modules changes (with ``reset=False`` the ranges only widen). ``x``
    are images in [0, 1] (float) or uint8. The model's train/eval mode is restored. Returns the model.
    """
    from qrobust.metrics import as_float_images  # metrics imports nothing from quant: no cycle

    acts = activation_quantizers(model)
    if not acts:
        raise ConfigError("calibrate needs a quantized model: call qrobust.quant.quantize(model) first")
    if len(x) == 0:
        raise ConfigError("calibrate needs at least one image")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for act in acts:
            if reset:
                act.initialized.fill_(False)
            act.calibrating = True
        with eval_mode(model):
            for start in range(0, len(x), batch_size):
                model(as_float_images(x[start:start + batch_size].to(device)))
    finally:
        for act in acts:
            act.calibrating = False
    return model
