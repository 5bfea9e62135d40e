"""Turning a trained float network into a stochastic-quantizer (SQ) model, and back.

Farkya, Raghavan, Ziskind, arXiv:2312.00105 (2023) fine-tune a trained float network with SQs inserted
at the input and after chosen layers. Each SQ's bins start uniform over a range calibrated on the float
network's activations at its insertion point (:func:`calibrate_ranges`: ``[min(0, q_(100-p)), q_p]``,
``q`` the ``p``-th percentiles; the input SQ uses the pixel range [0, 1]); :func:`build_sq_model`
inserts them into a copy of the float network.

:func:`float_twin` goes the other way: the same weights with every fake quantizer off and every SQ
replaced by the identity, the differentiable stand-in of BPDA (Athalye et al. 2018, "Obfuscated
Gradients Give a False Sense of Security"): attack the twin, evaluate on the quantized model.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from qrobust.errors import ConfigError
from qrobust.quant.fake import is_quantized, set_quantization_enabled
from qrobust.quant.stochastic import StochasticQuantizer, insert_stochastic_quantizers, stochastic_quantizers
from qrobust.utils import eval_mode

__all__ = ["build_sq_model", "calibrate_ranges", "float_twin", "has_quantizers", "input_rounded"]

_MAX_VALUES = 1 << 20  # values per insertion point the percentiles are taken on (an even subsample)


@torch.no_grad()
def calibrate_ranges(model: nn.Module, x: Tensor, names: list[str], percentile: float) -> dict[str, list[float]]:
    """Per insertion point ``[low, high]``: ``[min(0, q_(100-p)), q_p]`` of the outputs of module ``name``.

    ``model`` is the trained float model, ``x`` calibration images in [0, 1] (the forwards run in eval
    mode, in batches of 256; every module's mode is restored). Percentiles are taken on at most 2^20
    values per point (an even subsample), enough for 99.9. A ConfigError names an unknown module or a
    point whose activations are constant (an SQ there would quantize nothing).
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        valid = [n for n in modules if n][:12]
        raise ConfigError(f"sq.after names unknown module(s) {missing}; valid names include: {', '.join(valid)}")
    outputs: dict[str, list[Tensor]] = {n: [] for n in names}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs[n].append(o.detach().flatten()))
             for n in names]
    try:
        with eval_mode(model):
            for start in range(0, len(x), 256):
                model(x[start : start + 256])
    finally:
        for h in hooks:
            h.remove()
    ranges = {}
    for n in names:
        values = torch.cat(outputs[n]).float()
        values = values[:: max(1, values.numel() // _MAX_VALUES)]
        q = torch.quantile(values, torch.tensor([1 - percentile / 100, percentile / 100], device=values.device))
        low, high = min(0.0, float(q[0])), float(q[1])
        if not high > low:
            raise ConfigError(
                f"the float model's activations after '{n}' are constant ({low:g}) on the calibration images: "
                "an SQ there would quantize nothing; choose other sq.after layers"
            )
        ranges[n] = [low, high]
    return ranges


def build_sq_model(fp: nn.Module, ranges: dict[str, list[float]], settings: dict, at_input: bool) -> nn.Module:
    """A copy of ``fp`` with an SQ after each module in ``ranges`` (its calibrated range) and, with
    ``at_input``, one on the input pixels (range [0, 1]); ``fp`` is left as it is.

    ``settings`` holds the SQ's ``num_bins``, ``alpha``, ``tau`` and ``learnable`` (other keys are ignored).
    """
    model = copy.deepcopy(fp)
    common = {k: settings[k] for k in ("num_bins", "alpha", "tau", "learnable")}
    for name, (low, high) in ranges.items():
        insert_stochastic_quantizers(model, after=[name], low=low, high=high, **common)
    if at_input:
        model = insert_stochastic_quantizers(model, at_input=True, low=0.0, high=1.0, **common)
    return model


def input_rounded(fp: nn.Module, levels: int) -> nn.Module:
    """A copy of ``fp`` behind a fixed rounding of its input pixels to ``levels`` uniform levels of [0, 1]
    (``0, 1/(L-1), ..., 1``; nearest level, ties down): bit-depth reduction (Xu et al. 2018, "Feature
    Squeezing", Sec. 3.1) as a deterministic, not learned, SQ at the input -- the input-quantization control
    of an SQ network, whose input SQ starts from this grid. ``fp`` is left as it is."""
    sq = {"num_bins": levels, "learnable": False, "deterministic": True}
    return insert_stochastic_quantizers(copy.deepcopy(fp), at_input=True, low=0.0, high=1.0, **sq)


def has_quantizers(model: nn.Module) -> bool:
    """Whether ``model`` holds a fake quantizer or a stochastic quantizer (else it is its own float twin)."""
    return is_quantized(model) or next(stochastic_quantizers(model), None) is not None


def float_twin(model: nn.Module) -> nn.Module:
    """BPDA's differentiable stand-in: a copy of ``model`` in eval mode with every fake quantizer off and
    every stochastic quantizer replaced by the identity (the same weights, no rounding, no randomness),
    its parameters frozen. ``model`` is left as it is."""
    twin = copy.deepcopy(model).eval()
    set_quantization_enabled(twin, False)
    for name, module in list(twin.named_modules()):
        if isinstance(module, StochasticQuantizer):
            parent_name, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, child, nn.Identity())
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
