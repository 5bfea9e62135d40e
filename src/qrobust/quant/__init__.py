"""Quantization: fake-quant QAT (2..8 bits), bit-width switching, stochastic quantizer, int8 deployment."""

from qrobust.quant.bitwidth import (
    BitWidthSchedule,
    RandomPrecision,
    SwitchableBatchNorm2d,
    check_bit_width,
    check_bit_widths,
    float_view,
    make_switchable_bn,
    model_bit_widths,
    statistics_kept,
)
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
    "ActQuant", "BitWidthSchedule", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantPoint", "RandomPrecision",
    "SwitchableBatchNorm2d", "activation_quantizers", "calibrate", "check_bit_width", "check_bit_widths",
    "float_view", "get_bit_width", "is_quantized", "make_switchable_bn", "model_bit_widths", "quantize",
    "set_bit_width", "set_quantization_enabled", "statistics_kept",
]
