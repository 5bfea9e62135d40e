"""Export an 8-bit QAT model to a real int8 model (``torch.ao.nn.quantized`` kernels).

Backends: ``server`` = x86 CPUs (oneDNN int8 kernels; activations in a 7-bit range, as torch's x86
qconfig, to avoid the int16 overflow of u8*s8 kernels without VNNI), ``mobile`` = qnnpack (ARM; full
8-bit range).

Each block of a :class:`~qrobust.models.QNet` maps to one fused int8 module:
``ConvBNAct -> ConvReLU2d | Conv2d`` (BatchNorm folded), ``LinearAct -> LinearReLU | Linear``,
``BasicBlock -> convs + QFunctional.add_relu``; pooling and flatten run on quantized tensors as they are.
BatchNorm folding is exact for per-channel symmetric weights: ``Q(W) * k_c`` (``k_c = gamma_c /
sqrt(var_c + eps)``) has the *same integer codes* as ``W * k_c`` with scale ``s_c * |k_c|`` (up to the
sign of ``k_c``), so we reuse the QAT twin's integer codes rather than re-quantizing. Output scales and
zero points come from the twin's EMA activation ranges. The twin and the int8 model then differ only
by bias rounding and requantization, and :func:`twin_agreement` measures by how much.

Attacks run on the fake-quantized twin (int8 kernels have no autograd).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn

from qrobust.errors import ConfigError
from qrobust.metrics import predict
from qrobust.models import BasicBlock, ConvBNAct, LinearAct, QNet
from qrobust.quant.fake import ActQuant, QuantConfig, QuantConv2d, QuantLinear, weight_int_repr
from qrobust.utils import eval_mode

# server = x86 CPUs through oneDNN's int8 kernels: on this project's AMD EPYC (AVX2) they ran 1.6x faster
# than the "x86"/fbgemm engine with 99.99% top-1 agreement (docs/CHOICES.md); mobile = ARM through qnnpack.
ENGINES = {"server": "onednn", "mobile": "qnnpack"}

# torch >= 2.10 warns that its quantized tensor API is deprecated; it is still the only int8 CPU path.
warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")


@contextlib.contextmanager
def quantized_engine(backend: str):
    """Run the block with ``torch.backends.quantized.engine`` set for ``backend``."""
    if backend not in ENGINES:
        raise ConfigError(f"unknown int8 backend '{backend}'; use one of {sorted(ENGINES)}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = ENGINES[backend]
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _out_qparams(q: nn.Module) -> tuple[float, int]:
    if not isinstance(q, ActQuant) or not bool(q.initialized):
        raise ConfigError("export needs a QAT model whose activation ranges were trained or calibrated")
    scale, zero_point = q.qparams()
    return float(scale), int(zero_point)


def _folded_int_weight(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes of the twin's weights with BatchNorm folded in; returns (qweight, float bias)."""
    if not isinstance(layer, (QuantConv2d, QuantLinear)):
        raise ConfigError("export needs a QAT model: call qrobust.quant.quantize(model) first")
    if layer.bits != 8:
        raise ConfigError(f"only 8-bit layers export to int8, found a {layer.bits}-bit layer; "
                          "call set_bit_width(model, 8) on a model trained at 8 bits")
    codes, scale = weight_int_repr(layer.weight, 8)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features)
    if isinstance(bn, nn.BatchNorm2d):
        k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias.detach() + (bias - bn.running_mean) * k
        sign = torch.where(k < 0, -1, 1).to(torch.int8).view(-1, *([1] * (codes.dim() - 1)))
        codes, scale = codes * sign, scale * k.abs()
    zero_points = torch.zeros(codes.shape[0], dtype=torch.long)
    qweight = torch._make_per_channel_quantized_tensor(codes, scale.double(), zero_points, 0)
    return qweight, bias.float()


def _convert_conv(block: ConvBNAct) -> nn.Module:
    conv = block.conv
    relu = isinstance(block.act, nn.ReLU)
    cls = nniq.ConvReLU2d if relu else nnq.Conv2d
    out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
              conv.dilation, conv.groups, bias=True)
    out.set_weight_bias(*_folded_int_weight(conv, block.bn))
    out.scale, out.zero_point = _out_qparams(block.q)
    pool = getattr(block, "pool", None)
    return nn.Sequential(out, pool) if pool is not None else out


def _convert_linear(block: LinearAct) -> nn.Module:
    fc = block.fc
    cls = nniq.LinearReLU if isinstance(block.act, nn.ReLU) else nnq.Linear
    out = cls(fc.in_features, fc.out_features)
    out.set_weight_bias(*_folded_int_weight(fc, None))
    out.scale, out.zero_point = _out_qparams(block.q)
    return out


class Int8BasicBlock(nn.Module):
    def __init__(self, block: BasicBlock):
        super().__init__()
        self.conv1 = _convert_conv(block.conv1)
        self.conv2 = _convert_conv(block.conv2)
        self.shortcut = _convert_conv(block.shortcut) if isinstance(block.shortcut, ConvBNAct) else nn.Identity()
        self.add = nnq.QFunctional()
        self.add.scale, self.add.zero_point = _out_qparams(block.q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add.add_relu(self.conv2(self.conv1(x)), self.shortcut(x))


_PASSTHROUGH = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, ConvBNAct):
        return _convert_conv(module)
    if isinstance(module, LinearAct):
        return _convert_linear(module)
    if isinstance(module, BasicBlock):
        return Int8BasicBlock(module)
    if isinstance(module, _PASSTHROUGH):
        return module
    if type(module) is nn.Sequential:
        return nn.Sequential(*[_convert(m) for m in module])
    raise ConfigError(f"int8 export does not know how to convert {type(module).__name__}")


class Int8Model(nn.Module):
    """A real int8 model: float normalisation, quantize, int8 body, dequantize (logits out)."""

    def __init__(self, twin: QNet, backend: str):
        super().__init__()
        self.backend = backend
        self.arch = twin.arch
        self.normalize = twin.normalize
        scale, zero_point = _out_qparams(twin.input_q)
        self.quant = nnq.Quantize(scale, zero_point, torch.quint8)
        with quantized_engine(backend):
            self.body = _convert(twin.body)
        self.dequant = nnq.DeQuantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with quantized_engine(self.backend):
            return self.dequant(self.body(self.quant(self.normalize(x.float()))))


def export_int8(twin: nn.Module, backend: str | None = None) -> Int8Model:
    """Convert an 8-bit QAT twin (eval-mode ranges) into a real int8 model for ``backend``."""
    if not isinstance(twin, QNet):
        raise ConfigError("int8 export needs a qrobust model (built with qrobust.models.build_model)")
    config: QuantConfig = getattr(twin, "quant_config", None)
    if config is None:
        raise ConfigError("int8 export needs a QAT model: call qrobust.quant.quantize(model) and train it first")
    backend = backend or config.backend
    if backend not in ENGINES:
        raise ConfigError(f"unknown int8 backend '{backend}'; use one of {sorted(ENGINES)}")
    if backend != config.backend:
        warnings.warn(f"model was trained for '{config.backend}' but is exported for '{backend}'", stacklevel=2)
    if config.float_logits:
        raise ConfigError("this model keeps float logits (quant.float_logits=true), but torch's int8 modules always "
                          "quantize the logits to 8 bits; export it with --format onnx, or train with "
                          "quant.float_logits=false")
    acts = [m for m in twin.modules() if isinstance(m, ActQuant)]
    if any(m.bits != 8 for m in acts):
        raise ConfigError("only 8-bit activations export to int8: call set_bit_width(model, 8) first")
    with eval_mode(twin):
        return Int8Model(twin, backend).eval()


def twin_agreement(twin: nn.Module, int8_model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 agreement between the fake-quant twin and the int8 model on ``x`` (target >= 0.99)."""
    return float((predict(twin, x, batch_size) == predict(int8_model, x, batch_size)).float().mean())
