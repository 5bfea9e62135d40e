"""Bit-width switching of one QAT network: validation, switchable BatchNorm, random precision, schedules.

A QAT model made by :func:`qrobust.quant.quantize` runs at any body width 2..8 through
:func:`~qrobust.quant.fake.set_bit_width`. This module holds what defenses and studies build on that:

* :class:`SwitchableBatchNorm2d` / :func:`make_switchable_bn`: one BatchNorm per width (Double-Win Quant's
  switchable BN; Y. Fu, Q. Yu, M. Li, V. Chandra, Y. Lin, "Double-Win Quant: Aggressively Winning
  Robustness of Quantized Deep Neural Networks via Random Precision Training and Inference", ICML 2021,
  Sec. 3.3), and :func:`check_bit_width` / :func:`model_bit_widths` for the widths such a model supports.
* :class:`RandomPrecision`: random precision inference (DWQ's RPI), a random width per forward.
* :class:`BitWidthSchedule`: DBWT's per-step width (QADT-R, Guesmi et al. 2025, arXiv:2503.07058).
* :func:`float_view`: the same network with its quantizers off; :func:`statistics_kept`: forwards in
  train mode that leave BatchNorm running statistics and EMA activation ranges as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qrobust.errors import ConfigError
from qrobust.quant.fake import (
    check_bits,
    get_bit_width,
    is_quantized,
    set_bit_width,
    set_quantization_enabled,
)

__all__ = [
    "SCHEDULES",
    "BitWidthSchedule",
    "RandomPrecision",
    "SwitchableBatchNorm2d",
    "check_bit_width",
    "check_bit_widths",
    "float_view",
    "make_switchable_bn",
    "model_bit_widths",
    "plain_batchnorms",
    "statistics_kept",
]


def check_bit_widths(bit_widths: Iterable[int], what: str = "bit_widths") -> tuple[int, ...]:
    """``bit_widths`` as a sorted tuple without repeats; ConfigError naming ``what`` if one is not 2..8."""
    try:
        widths = tuple(bit_widths)
    except TypeError:
        raise ConfigError(
            f"{what} must be a list of bit widths such as [2, 4, 8], got {bit_widths!r}"
        ) from None
    if not widths:
        raise ConfigError(f"{what} is empty; give at least one bit width from 2 to 8, e.g. [2, 4, 8]")
    for bits in widths:
        check_bits(bits, f"each of {what}")
    return tuple(sorted(set(widths)))


class SwitchableBatchNorm2d(nn.Module):
    """One ``BatchNorm2d`` per bit width (DWQ's switchable BN, Fu et al. 2021, Sec. 3.3).

    Quantization at different widths shifts activation statistics, so one shared BN mixes them; DWQ
    keeps separate running statistics and affine parameters per width. ``set_bit_width`` calls
    :meth:`on_bit_width`, which selects the BN of that width; a width outside the set raises
    :class:`ConfigError` (a silently shared BN would be the bug this module exists to avoid).
    """

    def __init__(
        self, num_features: int, bit_widths: Sequence[int], eps: float = 1e-5, momentum: float = 0.1
    ):
        super().__init__()
        self.bit_widths = check_bit_widths(bit_widths)
        self.per_bits = nn.ModuleDict(
            {str(b): nn.BatchNorm2d(num_features, eps=eps, momentum=momentum) for b in self.bit_widths}
        )
        self.active = self.bit_widths[-1]

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, bit_widths: Sequence[int]) -> SwitchableBatchNorm2d:
        """Every width starts as a copy of ``bn`` (its statistics and affine parameters)."""
        new = cls(bn.num_features, bit_widths, bn.eps, bn.momentum if bn.momentum is not None else 0.1)
        for b in new.bit_widths:
            new.per_bits[str(b)] = copy.deepcopy(bn)  # deepcopy keeps the device
        return new

    def on_bit_width(self, bits: int) -> None:
        if bits not in self.bit_widths:
            raise ConfigError(
                f"bit width {bits} not in the model's set {list(self.bit_widths)}: its BatchNorms were made "
                f"per bit width for {list(self.bit_widths)} only; use one of those, or rebuild the model "
                f"with make_switchable_bn(model, bit_widths=[..., {bits}]) and train it at that width"
            )
        self.active = bits

    def forward(self, x: Tensor) -> Tensor:
        return self.per_bits[str(self.active)](x)

    def extra_repr(self) -> str:
        return f"bit_widths={list(self.bit_widths)}, active={self.active}"


def model_bit_widths(model: nn.Module) -> tuple[int, ...] | None:
    """The widths a model supports: the intersection of its switchable BNs' sets (None: any 2..8)."""
    sets = [set(m.bit_widths) for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    if not sets:
        return None
    return tuple(sorted(set.intersection(*sets)))


def check_bit_width(model: nn.Module, bits: int) -> int:
    """Check, before switching anything, that ``model`` can run at ``bits`` (ConfigError if not).

    ``set_bit_width`` changes layers in order and a switchable BN refuses a foreign width mid-way;
    checking first keeps the model consistent.
    """
    check_bits(bits)
    if not is_quantized(model):
        raise ConfigError("bit widths need a quantized model: call qrobust.quant.quantize(model) first")
    allowed = model_bit_widths(model)
    if allowed is not None and bits not in allowed:
        raise ConfigError(
            f"bit width {bits} not in the model's set {list(allowed)} (it has a BatchNorm per bit width); "
            f"use one of {list(allowed)}"
        )
    return bits


def make_switchable_bn(model: nn.Module, bit_widths: Sequence[int]) -> nn.Module:
    """Swap every ``BatchNorm2d`` of a QAT model for a :class:`SwitchableBatchNorm2d` (in place).

    Each width's BN starts as a copy of the original. The model is then switched to its current
    width if that is in ``bit_widths``, else to the largest of them. Returns the model.
    """
    widths = check_bit_widths(bit_widths)
    if not is_quantized(model):
        raise ConfigError(
            "make_switchable_bn needs a QAT model (BatchNorm per bit width): call qrobust.quant.quantize(model) first"
        )
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not _inside_switchable(model, name)
    ]
    for name, bn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SwitchableBatchNorm2d.from_batchnorm(bn, widths))
    current = get_bit_width(model)
    set_bit_width(model, current if current in widths else widths[-1])
    return model


def plain_batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """BatchNorm2d layers shared by all widths (not inside a :class:`SwitchableBatchNorm2d`)."""
    inside = {id(bn) for m in model.modules() if isinstance(m, SwitchableBatchNorm2d) for bn in m.modules()}
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in inside]


def _inside_switchable(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), SwitchableBatchNorm2d):
            return True
    return False


class RandomPrecision(nn.Module):
    """Random precision inference (DWQ's RPI): each forward runs ``model`` at a random width.

    The width is drawn uniformly from ``bit_widths`` per call (per batch) from ``generator`` (None:
    the global RNG) and kept in ``last_bits``. Attacks on it see a random width per step, which is
    the expectation over widths an adaptive attacker must optimise (EOT).
    """

    def __init__(self, model: nn.Module, bit_widths: Sequence[int], generator: torch.Generator | None = None):
        super().__init__()
        self.bit_widths = check_bit_widths(bit_widths)
        for bits in self.bit_widths:
            check_bit_width(model, bits)
        self.model = model
        self.generator = generator
        self.last_bits: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        i = int(torch.randint(len(self.bit_widths), (1,), generator=self.generator))
        self.last_bits = self.bit_widths[i]
        set_bit_width(self.model, self.last_bits)
        return self.model(x)


SCHEDULES = ("cycle", "random")


class BitWidthSchedule:
    """DBWT's per-step bit width: ``"cycle"`` (``bit_widths[step % K]``) or ``"random"`` (uniform).

    A pure function of ``(seed, step)``, so a resumed run continues the same sequence.
    """

    def __init__(self, bit_widths: Sequence[int] = (2, 4, 8), mode: str = "cycle", seed: int = 0):
        if mode not in SCHEDULES:
            raise ConfigError(f"unknown bit-width schedule '{mode}'; use one of: {', '.join(SCHEDULES)}")
        self.bit_widths = check_bit_widths(bit_widths)
        self.mode = mode
        self.seed = int(seed)

    def __call__(self, step: int) -> int:
        if self.mode == "cycle":
            return self.bit_widths[step % len(self.bit_widths)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.bit_widths[int(torch.randint(len(self.bit_widths), (1,), generator=gen))]


@contextmanager
def float_view(model: nn.Module) -> Iterator[nn.Module]:
    """The float network with the same weights (every quantizer off) inside the block; a float model is
    yielded as it is. The quantizers are switched back on at exit, also after an error."""
    if not is_quantized(model):
        yield model
        return
    set_quantization_enabled(model, False)
    try:
        yield model
    finally:
        set_quantization_enabled(model, True)


@contextmanager
def statistics_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, forwards of ``model`` (also in train mode) leave its buffers as they were: the
    BatchNorm running statistics and the EMA activation ranges (and their ``initialized`` flags).

    Train mode still normalises with the batch's statistics; only the running estimates are spared. Each
    buffer is swapped for a copy for the block and the original put back at exit (also after an error),
    so the tensors autograd saved from the block's forwards are never modified in place. An extra
    forward (e.g. GIR's gradient at another bit width, QADT-R) thus does not pull the statistics of the
    width being trained towards another width's activations.
    """
    saved = []
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                saved.append((module, name, buf))
                module._buffers[name] = buf.clone()
    try:
        yield model
    finally:
        for module, name, buf in saved:
            module._buffers[name] = buf
