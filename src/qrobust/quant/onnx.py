"""Export an 8-bit QAT model to a QDQ ONNX graph that ONNX Runtime runs with int8 kernels.

The graph is built node by node from the same block mapping as the torch int8 export
(:mod:`qrobust.quant.deploy`), not traced: every activation quantizer of the twin becomes a
``QuantizeLinear`` (uint8, the twin's EMA scale and zero point) and each consumer reads it through its
own ``DequantizeLinear``; weights are the twin's *integer codes* (int8, per output channel, symmetric)
with BatchNorm folded exactly as ``deploy.py`` folds it, dequantized by a per-axis
``DequantizeLinear``; biases are int32 at scale ``s_in * s_w[c]`` (the ONNX QDQ convention). ONNX
Runtime's QDQ transformers (``CPUExecutionProvider``, graph optimizations on) fuse
``DQ -> Conv -> Q`` into ``QLinearConv``, ``DQ -> Gemm -> Q`` into ``QGemm``, ``DQ + DQ -> Add -> Q``
into ``QLinearAdd`` and ``DQ -> GlobalAveragePool -> Q`` into ``QLinearGlobalAveragePool``;
:func:`optimized_op_counts` lists what actually runs.

Code-space clamps. A twin's activation quantizer with ``L`` levels computes
``clamp(round(x / s) + z, 0, L)``; ``QuantizeLinear`` (uint8) saturates at 255. When ``L < 255`` (the
``server`` backend's 7-bit ``reduce_range`` activations, ``L = 127``) a ``Clip`` on the uint8 codes
(``max = L``) makes the top of the range exact. A ReLU before a quantizer is the clamp ``code >= z``
(``Q(relu(y)) == max(Q(y), z)`` exactly), so it is the same ``Clip``'s ``min``; with ``z = 0`` and
``L = 255`` no ``Clip`` is needed at all. Max-pooling and flattening act on the uint8 codes directly
(quantization and the clamp are monotone, so they commute with max, as the twin's quant point after
the pool already assumes); the clamp follows the pool, on a quarter of the elements.

Logits: 8-bit by default (the twin's last quantizer: ``Q -> DQ`` on the output), float when the model
has no quantizer on its last block (``float_logits``): then ``Gemm`` ends the graph and ONNX Runtime
runs it as an int8 GEMM with a float output.

Remaining differences to the twin (measured by :func:`~qrobust.quant.deploy.twin_agreement`): int32
bias rounding, requantization rounding in the int8 kernels, ``x / s`` versus the twin's ``x * (1 / s)``
at exact rounding ties, and global average pooling (requantized to feed the int8 classifier, see
:func:`_global_avg_pool`; the twin feeds it the float mean).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qrobust.errors import ConfigError
from qrobust.models import BasicBlock, ConvBNAct, LinearAct, QNet
from qrobust.quant.fake import ActQuant, QuantConfig, QuantConv2d, QuantLinear, weight_int_repr
from qrobust.runs import atomic_write_bytes

OPSET = 17  # QuantizeLinear/DequantizeLinear per-axis (>= 13) and Clip on uint8 (>= 12); widely supported
INPUT_NAME, OUTPUT_NAME = "images", "logits"
INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool",
            "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


@dataclass(frozen=True)
class _QTensor:
    """A uint8 code tensor in the graph and its quantization parameters (``x = s * (code - z)``)."""

    name: str
    scale: float
    zero_point: int
    levels: int = 255  # the largest code that occurs


class _Graph:
    """A small ONNX graph under construction: nodes, initializers, fresh names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = Counter()

    def fresh(self, stem: str) -> str:
        self._count[stem] += 1
        return f"{stem}_{self._count[stem]}"

    def const(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(np.array(array, copy=True, order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], stem: str | None = None, output: str | None = None, **attrs) -> str:
        output = output or self.fresh(stem or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.fresh(f"{op}"), **attrs))
        return output

    def quantize(self, x: str, q: ActQuant, relu: bool = False, clamp: bool = True) -> _QTensor:
        """``QuantizeLinear`` with the quantizer's scale and zero point, then (unless ``clamp`` is False:
        the caller clamps later) the code-space clamp of :meth:`clamp`."""
        scale, zero_point = _act_qparams(q)
        levels = q.levels
        if levels > 255:
            raise ConfigError(f"an activation quantizer has {levels} levels; int8 export needs at most 255")
        codes = self.node("QuantizeLinear", [x, self.const("act_scale", np.array(scale, np.float32)),
                                              self.const("act_zp", np.array(zero_point, np.uint8))], "q")
        t = _QTensor(codes, scale, zero_point, levels)
        return self.clamp(t, relu) if clamp else t

    def clamp(self, t: _QTensor, relu: bool) -> _QTensor:
        """Clip the codes to ``[z if relu else 0, L]`` where that is not the uint8 range already (see the
        module docstring): the twin's ``L < 255`` levels, and a ReLU as ``code >= z``."""
        low = t.zero_point if relu else 0
        if low == 0 and t.levels == 255:
            return t
        codes = self.node("Clip", [t.name, self.const("code_min", np.array(low, np.uint8)),
                                   self.const("code_max", np.array(t.levels, np.uint8))], "q_clip")
        return _QTensor(codes, t.scale, t.zero_point, t.levels)

    def dequantize(self, t: _QTensor) -> str:
        """One ``DequantizeLinear`` per consumer (ONNX Runtime's QDQ fusion wants a DQ per node)."""
        return self.node("DequantizeLinear", [t.name, self.const("act_scale", np.array(t.scale, np.float32)),
                                              self.const("act_zp", np.array(t.zero_point, np.uint8))], "dq")

    def weight_and_bias(self, layer: nn.Module, bn: nn.Module | None, x: _QTensor) -> tuple[str, str]:
        """Dequantized int8 per-channel weight codes (BatchNorm folded) and int32 bias, as graph inputs."""
        codes, scale, bias = folded_weight_codes(layer, bn)
        w_scale = scale.double().numpy()
        w = self.node("DequantizeLinear", [
            self.const("w_codes", codes.numpy()), self.const("w_scale", w_scale.astype(np.float32)),
            self.const("w_zp", np.zeros(len(w_scale), np.int8))], "w", axis=0)
        b_scale = (np.float32(x.scale) * w_scale.astype(np.float32)).astype(np.float32)
        b_codes = np.clip(np.round(bias.double().numpy() / b_scale.astype(np.float64)), -(2**31), 2**31 - 1)
        b = self.node("DequantizeLinear", [
            self.const("b_codes", b_codes.astype(np.int32)), self.const("b_scale", b_scale),
            self.const("b_zp", np.zeros(len(w_scale), np.int32))], "b", axis=0)
        return w, b


def _act_qparams(q: nn.Module) -> tuple[float, int]:
    if not isinstance(q, ActQuant) or not bool(q.initialized):
        raise ConfigError("ONNX export needs a QAT model whose activation ranges were trained or calibrated")
    if not q.enabled:
        raise ConfigError("ONNX export needs the fake quantizers on: call set_quantization_enabled(model, True)")
    scale, zero_point = q.qparams()
    return float(scale), int(zero_point)


def folded_weight_codes(layer: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin's int8 weight codes with BatchNorm folded in: ``(codes, per-channel scale, float bias)``.

    As :mod:`qrobust.quant.deploy`: ``Q(W) * k_c`` (``k_c = gamma_c / sqrt(var_c + eps)``) has the codes
    of ``W`` (sign-flipped where ``k_c < 0``) at scale ``s_c * |k_c|``; the bias becomes
    ``beta_c + (b_c - mu_c) * k_c``.
    """
    if not isinstance(layer, (QuantConv2d, QuantLinear)):
        raise ConfigError("ONNX export needs a QAT model: call qrobust.quant.quantize(model) first")
    if layer.bits != 8 or not layer.enabled:
        raise ConfigError(f"only 8-bit layers export to int8, found a {layer.bits}-bit layer; "
                          "call set_bit_width(model, 8) on a model trained at 8 bits")
    codes, scale = weight_int_repr(layer.weight, 8)
    out_channels = codes.shape[0]
    bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(out_channels)
    if isinstance(bn, nn.BatchNorm2d):
        k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias.detach() + (bias - bn.running_mean) * k
        sign = torch.where(k < 0, -1, 1).to(torch.int8).view(-1, *([1] * (codes.dim() - 1)))
        codes, scale = codes * sign, scale * k.abs()
    return codes.to(torch.int8), scale.float(), bias.float()


def _conv_block(g: _Graph, block: ConvBNAct, x: _QTensor) -> _QTensor:
    conv = block.conv
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ConfigError("ONNX export supports convolutions with numeric zero padding only")
    w, b = g.weight_and_bias(conv, block.bn, x)
    ph, pw = conv.padding
    y = g.node("Conv", [g.dequantize(x), w, b], "conv", kernel_shape=list(conv.kernel_size),
               strides=list(conv.stride), pads=[ph, pw, ph, pw], dilations=list(conv.dilation), group=conv.groups)
    relu = isinstance(block.act, nn.ReLU)
    pool = getattr(block, "pool", None)
    if pool is None:
        return g.quantize(y, block.q, relu)
    # quantize before the pool with the block's (post-pool) quantizer, pool the codes, then clamp them:
    # exact, since quantization and the clamp are monotone and so commute with max; the clamp then
    # touches a quarter of the elements
    if not isinstance(pool, nn.MaxPool2d) or pool.dilation != 1 or pool.ceil_mode:
        raise ConfigError(f"ONNX export supports plain max-pooling only, found {pool}")
    codes = g.quantize(y, block.q, relu, clamp=False)
    k, s, p = (pool.kernel_size, pool.stride, pool.padding)
    k, s, p = ((v, v) if isinstance(v, int) else tuple(v) for v in (k, s, p))
    pooled = g.node("MaxPool", [codes.name], "pool", kernel_shape=list(k), strides=list(s), pads=[*p, *p])
    return g.clamp(_QTensor(pooled, codes.scale, codes.zero_point, codes.levels), relu)


def _linear_block(g: _Graph, block: LinearAct, x: _QTensor, last: bool) -> _QTensor | str:
    w, b = g.weight_and_bias(block.fc, None, x)
    y = g.node("Gemm", [g.dequantize(x), w, b], "gemm", transB=1)
    relu = isinstance(block.act, nn.ReLU)
    if isinstance(block.q, ActQuant):
        return g.quantize(y, block.q, relu)
    if not last:
        raise ConfigError("ONNX export needs an activation quantizer after every block but the last")
    return g.node("Relu", [y], "relu") if relu else y  # float logits


def _basic_block(g: _Graph, block: BasicBlock, x: _QTensor) -> _QTensor:
    h = _conv_block(g, block.conv2, _conv_block(g, block.conv1, x))
    shortcut = _conv_block(g, block.shortcut, x) if isinstance(block.shortcut, ConvBNAct) else x
    if not isinstance(block.shortcut, (ConvBNAct, nn.Identity)):
        raise ConfigError(f"ONNX export does not know the shortcut {type(block.shortcut).__name__}")
    y = g.node("Add", [g.dequantize(h), g.dequantize(shortcut)], "add")
    return g.quantize(y, block.q, relu=True)


def _global_avg_pool(g: _Graph, x: _QTensor) -> _QTensor:
    """The mean must be requantized to feed an int8 GEMM (the twin keeps it float). The codes' mean lies
    in ``[0, L]``, so the finest grid that still fits uint8 is ``s / r`` with ``r = floor(255 / L)``
    (2 for the server's 7-bit activations, 1 for 8-bit ones): half the rounding error where it is free."""
    r = max(1, 255 // x.levels)
    scale, zero_point = x.scale / r, x.zero_point * r
    y = g.node("GlobalAveragePool", [g.dequantize(x)], "gap")
    codes = g.node("QuantizeLinear", [y, g.const("act_scale", np.array(scale, np.float32)),
                                      g.const("act_zp", np.array(zero_point, np.uint8))], "q")
    return _QTensor(codes, scale, zero_point, x.levels * r)


def _blocks(body: nn.Module) -> list[nn.Module]:
    if type(body) is not nn.Sequential:
        return [body]
    out: list[nn.Module] = []
    for m in body:
        out.extend(_blocks(m) if type(m) is nn.Sequential else [m])
    return out


def _body(g: _Graph, body: nn.Module, x: _QTensor) -> _QTensor | str:
    blocks = _blocks(body)
    t: _QTensor | str = x
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        if isinstance(t, str):
            raise ConfigError("ONNX export found float logits before the end of the model")
        if isinstance(block, ConvBNAct):
            t = _conv_block(g, block, t)
        elif isinstance(block, LinearAct):
            t = _linear_block(g, block, t, last)
        elif isinstance(block, BasicBlock):
            t = _basic_block(g, block, t)
        elif isinstance(block, nn.AdaptiveAvgPool2d) and block.output_size in (1, (1, 1)):
            t = _global_avg_pool(g, t)
        elif isinstance(block, nn.Flatten) and block.start_dim == 1 and block.end_dim == -1:
            t = _QTensor(g.node("Flatten", [t.name], "flatten", axis=1), t.scale, t.zero_point, t.levels)
        elif isinstance(block, nn.Identity):
            continue
        else:
            raise ConfigError(f"ONNX export does not know how to convert {type(block).__name__}")
    return t


def has_float_logits(twin: nn.Module) -> bool:
    """True when the model's last block has no activation quantizer (``float_logits``): a plain
    ``QuantPoint``/``Identity`` where the logit quantizer (role ``"logits"``) would be."""
    last = _blocks(twin.body)[-1]
    q = getattr(last, "q", None)
    return not isinstance(q, ActQuant) or getattr(q, "role", "logits") != "logits"


def check_exportable(twin: nn.Module) -> QuantConfig:
    """Refuse what has no int8 graph: a non-qrobust or float model, a model not at 8 bits."""
    if not isinstance(twin, QNet):
        raise ConfigError("ONNX export needs a qrobust model (built with qrobust.models.build_model)")
    config: QuantConfig | None = getattr(twin, "quant_config", None)
    if config is None or not any(isinstance(m, ActQuant) for m in twin.modules()):
        raise ConfigError("ONNX int8 export needs an 8-bit QAT model; call qrobust.quant.quantize(model) "
                          "and train or calibrate it first (a float model has no int8 graph)")
    bits = sorted({m.bits for m in twin.modules() if isinstance(m, (QuantConv2d, QuantLinear, ActQuant))})
    if bits != [8]:
        raise ConfigError(f"only 8-bit models export to int8, this one uses {bits} bits; "
                          "call set_bit_width(model, 8) on a model trained at 8 bits")
    return config


def export_onnx(twin: nn.Module, backend: str | None = None) -> onnx.ModelProto:
    """The QDQ ONNX graph of an 8-bit QAT twin (eval-mode ranges); the twin is left as it was.

    Input ``images`` (float32, N x C x H x W, values in [0, 1]; normalisation is in the graph), output
    ``logits`` (float32, N x classes). ``backend`` only names the target in the model's metadata: the
    activation ranges are the twin's, 7-bit for a ``server`` twin, 8-bit for ``mobile``.
    """
    config = check_exportable(twin)
    backend = backend or config.backend
    if backend not in ("server", "mobile"):
        raise ConfigError(f"unknown int8 backend '{backend}'; use 'server' or 'mobile'")
    if backend != config.backend:
        warnings.warn(f"model was trained for '{config.backend}' but is exported for '{backend}'; the graph keeps "
                      "the twin's activation ranges (7-bit on server, 8-bit on mobile)", stacklevel=2)
    g = _Graph()
    mean = twin.normalize.mean.detach().float().numpy()
    std = twin.normalize.std.detach().float().numpy()
    x = g.node("Sub", [INPUT_NAME, g.const("mean", mean)], "centred")
    x = g.node("Div", [x, g.const("std", std)], "normalised")
    codes = g.quantize(x, twin.input_q)
    out = _body(g, twin.body, codes)
    float_logits = isinstance(out, str)
    if not float_logits:
        out = g.dequantize(out)
    g.nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME], name="output"))
    channels, height, width = getattr(twin, "input_shape", (mean.shape[1], None, None))
    num_classes = getattr(twin, "num_classes", None)
    graph = helper.make_graph(
        g.nodes, f"qrobust-{twin.arch}-int8",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", channels, height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", num_classes])],
        g.initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="qrobust",
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(model, {
        "arch": twin.arch, "backend": backend, "inputs": "float images in [0, 1], N x C x H x W",
        "logits": "float" if float_logits else "8-bit quantized"})
    onnx.checker.check_model(model, full_check=True)
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> int:
    """Write ``model`` to ``path`` atomically; returns the file's size in bytes."""
    data = model.SerializeToString()
    atomic_write_bytes(Path(path), data)
    return len(data)


def _session_options(threads: int | None, optimized_path: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return options


class OrtModel(nn.Module):
    """An ONNX Runtime session (``CPUExecutionProvider``, all graph optimizations) as a torch module, so
    :func:`qrobust.metrics.predict` and friends run it like any classifier. No autograd, CPU only."""

    def __init__(self, model: onnx.ModelProto | bytes | str | Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        source = str(source) if isinstance(source, Path) else source
        self.session = ort.InferenceSession(source, _session_options(threads), providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def optimized_op_counts(model: onnx.ModelProto, threads: int | None = None) -> dict[str, int]:
    """Op types of the graph ONNX Runtime actually runs (after its optimizations), with counts."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), _session_options(threads, path),
                             providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    return dict(sorted(Counter(n.op_type for n in optimized.graph.node).items()))


def int8_op_counts(op_counts: dict[str, int]) -> dict[str, int]:
    """The int8 compute kernels among ``op_counts`` (QLinearConv, QGemm, ...)."""
    return {op: n for op, n in op_counts.items() if op in INT8_OPS}


def float_compute_ops(op_counts: dict[str, int]) -> dict[str, int]:
    """Float convolutions / matrix products left unfused (an export that fused fully has none)."""
    return {op: n for op, n in op_counts.items() if op in ("Conv", "Gemm", "MatMul", "FusedConv", "NchwcConv",
                                                            "FusedGemm", "FusedMatMul")}


__all__ = ["OPSET", "OrtModel", "check_exportable", "export_onnx", "float_compute_ops", "folded_weight_codes",
           "has_float_logits", "int8_op_counts", "optimized_op_counts", "save_onnx"]
