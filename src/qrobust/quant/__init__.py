"""Quantization: fake-quant QAT (2..8 bits), stochastic quantizer, int8 deployment."""

from qrobust.quant.fake import (
    ActQuant,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantPoint,
    activation_quantizers,
    calibrate,
    get_bit_width,
    is_quantized,
    quantize,
    set_bit_width,
    set_quantization_enabled,
)

__all__ = [
    "ActQuant", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantPoint", "activation_quantizers", "calibrate",
    "get_bit_width",
    "is_quantized", "quantize", "set_bit_width", "set_quantization_enabled",
]
