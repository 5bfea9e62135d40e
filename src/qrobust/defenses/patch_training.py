"""Training-time defenses against adversarial patches on quantized networks: PBAT, DWQ and QADT-R.

Each defense is an :class:`~qrobust.train.objectives.Objective` for the one training loop
(``qrobust.train.loop.fit``); they differ only in the loss they build per step.

Papers:

* **PBAT**, patch adversarial training (the baseline of QADT-R; patches as in Brown et al. 2017,
  "Adversarial Patch", arXiv:1712.09665; patch AT in the style of Rao et al. 2020, "Adversarial
  Training against Location-Optimized Adversarial Patches", and of fast AT, Wong et al. 2020)::

      L = CE(f(x_mix), y),   x_mix = [A(p*, x_1..k, l), x_k+1..n],   p* ~ argmax_p CE(f(A(p, x, l)), y)

  ``p*`` is a *persistent* universal patch per (shape, size) that takes ``patch_steps`` Adam steps on
  the current batch every training step (warm start, so a few steps per training step are enough:
  the patch keeps improving over training as the model does). It is pasted on a ``fraction`` of the
  batch at random places inside the training region. PBAT makes its patches on the float view of
  the network (quantizers switched off, ``generate_on="float"``), then trains the network at its own
  width: the set-up whose failure on quantized deployments ("quantization shift") QADT-R reports.

* **DWQ**, Double-Win Quant (Y. Fu, Q. Yu, M. Li, V. Chandra, Y. Lin, "Double-Win Quant: Aggressively
  Winning Robustness of Quantized Deep Neural Networks via Random Precision Training and Inference",
  ICML 2021; reference code GATECH-EIC/Double-Win-Quant). Random precision training (RPT): each step
  draws ``b ~ U(bit_widths)``, sets the network to ``b`` bits, makes adversarial examples at ``b``
  bits and trains on them::

      L = CE(f_b(x + delta_b), y),   delta_b = FGSM-RS or PGD at width b (L-inf, eps = 8/255)

  with a BatchNorm per bit width (:class:`~qrobust.quant.bitwidth.SwitchableBatchNorm2d`, the paper's
  switchable BN) and random precision inference (RPI, :class:`~qrobust.quant.bitwidth.RandomPrecision`).

* **QADT-R** (A. Guesmi, B. Ouni, M. Shafique, "Breaking the Limits of Quantization-Aware Defenses:
  QADT-R for Robustness Against Patch-Based Adversarial Attacks in QNNs", arXiv:2503.07058, 2025),
  three parts, each switchable (:class:`QADTR`)::

      L = CE(f_b(x_mix), y) + lambda_GIR * R_GIR(x_mix, y)

  - **A-QAPA** (adaptive quantization-aware patch generation): ``x_mix`` uses patches made *inside the
    quantized network at bit width b* (the current width with DBWT, otherwise a width drawn from
    ``bit_widths`` per step), and an adaptive size schedule: the patch size moves one level up the
    ``sizes`` ladder when the exponential moving average of the patch's fooling rate on the training
    batch drops below ``asr_low`` (the model resists: make the patch stronger) and one level down
    above ``asr_high`` (too strong to learn from); shapes cycle over ``shapes``; places are uniform in
    the training region (EOT over places).
  - **DBWT** (dynamic bit-width training): ``b`` cycles over ``bit_widths`` (``"cycle"``, the paper's
    "bit-width cycling") or is drawn uniformly (``"random"``) per step, via ``set_bit_width``.
  - **GIR** (gradient-inconsistent regularization): the paper says GIR "injects controlled gradient
    perturbations to disrupt adversarial optimization" and measures gradient alignment between bit
    widths with cosine similarity (its Fig. 4); we regularise exactly that alignment::

        R_GIR = mean_i cos(g_b(x_i), g_b'(x_i)),   g_b(x) = grad_x CE(f_b(x), y)

    with ``b'`` another width of ``bit_widths`` (``gir_mode="bits"``, the default) or the same width
    at a perturbed input ``x + sigma * n`` (``gir_mode="noise"``, inconsistency across draws). The
    input gradients are taken with ``create_graph=True`` so ``R_GIR`` is differentiable in the
    weights (double back-propagation). Minimising it gives a patch optimiser that averages or
    switches widths conflicting signals. This is our reading of a vague text; it is a setting.

Patch places: the training region (:class:`~qrobust.attacks.patch.PatchConfig` ``region``) restricts the
top-left corner of the pasted patch to a sub-box of the valid positions, so that places outside it are
*unseen* at evaluation (QADT-R's "unseen patch configurations": sizes, shapes and places not used in
training).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.patch import ANYWHERE, PatchConfig, apply_patch, patch_mask, train_patch
from qrobust.attacks.whitebox import input_gradient
from qrobust.config import Settings
from qrobust.errors import ConfigError
from qrobust.quant.bitwidth import (
    SCHEDULES,
    BitWidthSchedule,
    check_bit_width,
    check_bit_widths,
    float_view,
    plain_batchnorms,
    statistics_kept,
)
from qrobust.quant.fake import ActQuant, get_bit_width, is_quantized, set_bit_width
from qrobust.registry import OBJECTIVES
from qrobust.train.objectives import Objective
from qrobust.utils import eval_mode

__all__ = [
    "DWQ",
    "PBAT",
    "QADTR",
    "DWQConfig",
    "PBATConfig",
    "PatchTrainingConfig",
    "QADTRConfig",
    "gir_penalty",
    "input_gradient_cosine",
]


# --------------------------------------------------------------------------------------------------
# GIR: input-gradient alignment across bit widths (or draws)
# --------------------------------------------------------------------------------------------------


def _graph_input_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, grad_x sum_i CE_i)`` at ``x`` (a leaf with requires_grad), the gradient kept in the
    autograd graph (``create_graph=True``) so that a loss on it trains the weights (double
    back-propagation). :func:`qrobust.attacks.whitebox.input_gradient` is the same gradient, detached."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    return logits, grad


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


def gir_penalty(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    bits: int | None,
    other_bits: int | None,
    *,
    sigma: float = 0.0,
    generator: torch.Generator | None = None,
    update_statistics: bool = True,
) -> tuple[Tensor, Tensor]:
    """QADT-R's GIR term ``R = mean_i cos(g_b(x_i), g_b'(x_i'))``, differentiable in the weights.

    ``g_b(x) = grad_x CE(f_b(x), y)`` with ``create_graph=True``. ``bits``/``other_bits`` are the two
    widths (None: leave the model's width as it is); ``sigma > 0`` takes the second gradient at
    ``x' = clamp(x + sigma * n, 0, 1)``, ``n ~ N(0, I)`` from ``generator``. The model is left at
    ``bits``. Returns ``(R, logits at bits)``; the logits let the caller reuse that forward for CE.

    The second forward (at ``other_bits`` or on the noisy images) never updates the model's BatchNorm
    running statistics or EMA activation ranges (:func:`~qrobust.quant.bitwidth.statistics_kept`): they
    belong to the width being trained. ``update_statistics=False`` spares them in the first forward too
    (for a caller that takes CE, and so the statistics' update, from another forward).
    """
    xa = x.detach().requires_grad_(True)
    if bits is not None:
        set_bit_width(model, bits)
    if update_statistics:
        logits, ga = _graph_input_grad(model, xa, y)
    else:
        with statistics_kept(model):
            logits, ga = _graph_input_grad(model, xa, y)
    xb = x.detach()
    if sigma > 0:
        gdev = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        xb = (xb + sigma * noise).clamp(0, 1)
    xb = xb.requires_grad_(True)
    if other_bits is not None:
        set_bit_width(model, other_bits)
    with statistics_kept(model):
        _, gb = _graph_input_grad(model, xb, y)
    if bits is not None:
        set_bit_width(model, bits)
    return _cosine(ga, gb).mean(), logits


def input_gradient_cosine(model: nn.Module, x: Tensor, y: Tensor, bits: int, other_bits: int) -> float:
    """Mean per-image cosine similarity of input gradients at two widths (eval mode, no graph)."""
    with eval_mode(model):
        set_bit_width(model, bits)
        ga = input_gradient(model, x, y)
        set_bit_width(model, other_bits)
        gb = input_gradient(model, x, y)
    return float(_cosine(ga, gb).mean())


# --------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------


def _ensure_ranges(model: nn.Module, x: Tensor) -> None:
    """A fresh QAT model has no activation ranges; patch generation runs in eval mode and needs them."""
    if any(isinstance(m, ActQuant) and m.enabled and not bool(m.initialized) for m in model.modules()):
        with torch.no_grad():
            model(x)


def _whole(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")


@dataclass
class PatchTrainingConfig(Settings):
    """Settings every patch-training objective has (PBAT, QADT-R's A-QAPA)."""

    fraction: float = 0.5  # share of each batch that gets the patch (the rest stays clean)
    patch_steps: int = 2  # Adam steps on the persistent patch per training step
    patch_lr: float = 0.1  # their learning rate
    seed: int = 0  # the objective's generator: initial patches, batches and places of the patch steps

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ConfigError(
                f"fraction (share of each batch that gets a patch) must be in (0, 1], got {self.fraction}"
            )
        _whole("patch_steps", self.patch_steps, 1)
        _positive("patch_lr", self.patch_lr)
        _whole("seed", self.seed, 0)


GENERATE_ON = ("float", "model")


def _default_pbat_specs() -> tuple[PatchConfig, ...]:
    return (PatchConfig("square", 0.08),)


@dataclass
class PBATConfig(PatchTrainingConfig):
    """PBAT's settings (module docstring)."""

    specs: Sequence[PatchConfig | dict] = field(default_factory=_default_pbat_specs)  # training patches, in turn
    generate_on: str = "float"  # make the patch on "float" (quantizers off: PBAT) or the trained "model"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.specs = tuple(s if isinstance(s, PatchConfig) else PatchConfig(**s) for s in self.specs)
        if not self.specs:
            raise ConfigError("specs is empty; give at least one PatchConfig(shape, size, region=...)")
        if self.generate_on not in GENERATE_ON:
            raise ConfigError(f"generate_on must be 'float' or 'model', got {self.generate_on!r}")


ADVERSARIES = ("fgsm", "pgd", "none")


@dataclass
class DWQConfig(Settings):
    """DWQ's settings (Fu et al. 2021; the reference code's defaults)."""

    bit_widths: Sequence[int] = (2, 4, 8)  # widths drawn per step (random precision training)
    adversary: str = "fgsm"  # "fgsm" (FGSM with a random start), "pgd", or "none" (clean images)
    eps: float = 8 / 255  # L-inf budget on [0, 1] images
    alpha: float = 10 / 255  # FGSM step
    pgd_steps: int = 7  # PGD steps (of 2/255) when adversary="pgd"
    seed: int = 0  # the objective's generator (widths, random starts)
    require_switchable_bn: bool = True  # refuse a BatchNorm shared by all widths

    def __post_init__(self) -> None:
        self.bit_widths = check_bit_widths(self.bit_widths)
        if self.adversary not in ADVERSARIES:
            raise ConfigError(f"unknown DWQ adversary '{self.adversary}'; use one of: {', '.join(ADVERSARIES)}")
        if not (0 < float(self.eps) <= 1 and 0 < float(self.alpha) <= 1):
            raise ConfigError(
                f"eps and alpha are L-inf budgets on [0, 1] images, in (0, 1]; got {self.eps}, {self.alpha}"
            )
        self.eps, self.alpha = float(self.eps), float(self.alpha)
        _whole("pgd_steps", self.pgd_steps, 1)
        _whole("seed", self.seed, 0)
        self.require_switchable_bn = bool(self.require_switchable_bn)


GIR_MODES = ("bits", "noise")


@dataclass
class QADTRConfig(PatchTrainingConfig):
    """QADT-R's settings (Guesmi et al. 2025; module docstring). Each part can be switched off: A-QAPA
    alone, A-QAPA+DBWT, DBWT+GIR, ... are its ablations."""

    aqapa: bool = True  # A-QAPA: train on patches made inside the quantized network
    dbwt: bool = True  # DBWT: a new width every step (dbwt_mode); off: the model's own width
    gir: bool = True  # GIR: penalise the input-gradient cosine between widths (or input draws)
    bit_widths: Sequence[int] = (2, 4, 8)  # the widths DBWT cycles over, A-QAPA makes patches at, GIR compares
    dbwt_mode: str = "cycle"  # "cycle" (2 -> 4 -> 8 -> ...) or "random" (BitWidthSchedule)
    shapes: Sequence[str] = ("square",)  # A-QAPA's training shapes, in turn
    sizes: Sequence[float] = (0.06, 0.08, 0.1)  # A-QAPA's size ladder (shares of the image; start: the middle)
    region: tuple[float, float] = ANYWHERE  # A-QAPA's training places (PatchConfig.region)
    asr_low: float = 0.2  # EMA fooling rate below this: one size up (the model resists)
    asr_high: float = 0.6  # above this: one size down (too strong to learn from)
    asr_momentum: float = 0.9  # momentum of that EMA
    gir_weight: float = 0.5  # lambda_GIR
    gir_mode: str = "bits"  # "bits" (another width of bit_widths) or "noise" (same width, input noise)
    gir_sigma: float = 0.05  # the input noise std of gir_mode="noise" (on [0, 1] images)
    gir_batch: int = 32  # images per step on which R_GIR is estimated (a random sub-batch; 0 = all)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.aqapa, self.dbwt, self.gir = bool(self.aqapa), bool(self.dbwt), bool(self.gir)
        self.bit_widths = check_bit_widths(self.bit_widths)
        self.shapes = tuple(self.shapes)
        self.sizes = tuple(sorted(float(v) for v in self.sizes))
        if not self.shapes or not self.sizes:
            raise ConfigError("A-QAPA needs at least one shape and one size, e.g. shapes=['square'], sizes=[0.08]")
        self.region = tuple(float(v) for v in self.region)  # type: ignore[assignment]
        for shape in self.shapes:  # validates every shape, size and the region
            for size in self.sizes:
                PatchConfig(shape, size, region=self.region)
        if self.dbwt_mode not in SCHEDULES:
            raise ConfigError(f"unknown bit-width schedule '{self.dbwt_mode}'; use one of: {', '.join(SCHEDULES)}")
        if not 0 <= self.asr_low < self.asr_high <= 1 or not 0 <= self.asr_momentum < 1:
            raise ConfigError(
                f"need 0 <= asr_low < asr_high <= 1 and 0 <= asr_momentum < 1, got {self.asr_low}, "
                f"{self.asr_high}, {self.asr_momentum}"
            )
        if self.gir_mode not in GIR_MODES:
            raise ConfigError(f"unknown gir_mode '{self.gir_mode}'; use one of: {', '.join(GIR_MODES)}")
        if not (math.isfinite(self.gir_weight) and self.gir_weight >= 0 and self.gir_sigma >= 0):
            raise ConfigError(f"gir_weight and gir_sigma must be >= 0, got {self.gir_weight}, {self.gir_sigma}")
        if self.gir and self.gir_mode == "bits" and len(self.bit_widths) < 2:
            raise ConfigError(
                "GIR across bit widths needs at least two bit widths to compare; add one to bit_widths "
                "or use gir_mode='noise'"
            )
        if self.gir and self.gir_mode == "noise" and self.gir_sigma <= 0:
            raise ConfigError("gir_mode='noise' needs gir_sigma > 0 (the input noise std on [0, 1] images)")
        _whole("gir_batch (0 = the whole batch)", self.gir_batch, 0)


class _PatchTraining(Objective):
    """Shared machinery: persistent patches per (shape, size), a generator, step count, state."""

    config_class: type[PatchTrainingConfig] = PatchTrainingConfig

    def __init__(self, config: PatchTrainingConfig | Mapping | None = None, **overrides):
        self.settings = self.config_class.build(config, **overrides)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.patches: dict[str, Tensor] = {}
        self.step = 0
        self.last_bits: int | None = None

    # ---- patches
    def _patch_for(self, spec: PatchConfig, x: Tensor) -> Tensor:
        if spec.key not in self.patches:
            side, _ = patch_mask(spec, (x.shape[-2], x.shape[-1]))
            self.patches[spec.key] = torch.rand(x.shape[1], side, side, generator=self.generator)
        return self.patches[spec.key].to(device=x.device, dtype=x.dtype)

    def _patched_batch(
        self, generator_model: nn.Module, spec: PatchConfig, x: Tensor, y: Tensor
    ) -> tuple[Tensor, int]:
        """``patch_steps`` Adam steps on the persistent patch, then paste it on the first k images."""
        k = max(1, round(self.settings.fraction * x.shape[0]))
        patch = train_patch(
            generator_model,
            x[:k],
            y[:k],
            replace(spec, region=ANYWHERE),
            steps=self.settings.patch_steps,
            lr=self.settings.patch_lr,
            batch_size=k,
            init=self._patch_for(spec, x),
            generator=self.generator,
            progress=False,
        )
        self.patches[spec.key] = patch.detach().cpu()
        locs = spec.locations(k, (x.shape[-2], x.shape[-1]), self.generator).to(x.device)
        x_patched, _ = apply_patch(x[:k], patch, spec, locations=locs)
        return torch.cat([x_patched, x[k:]]), k

    # ---- state (resume)
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "generator": self.generator.get_state(),
            "patches": {k: v.clone() for k, v in self.patches.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        try:
            self.step = int(state["step"])
            self.generator.set_state(state["generator"])
            self.patches = {k: v.clone() for k, v in state["patches"].items()}
        except (KeyError, TypeError, RuntimeError) as err:
            raise ConfigError(
                f"cannot restore {type(self).__name__} state ({err}); the checkpoint was written by another "
                "objective: delete the run folder or train into another one"
            ) from None

    def config(self) -> dict:
        return {"name": self.name, **self.settings.to_dict()}


@OBJECTIVES.register("pbat")
class PBAT(_PatchTraining):
    """Patch adversarial training on one network (the module docstring gives the loss).

    ``PBAT(config=None, **overrides)``: :class:`PBATConfig` (or a mapping of it), single settings as
    keywords, e.g. ``PBAT(specs=[PatchConfig("square", 0.08, region=(0, 0.6))], patch_steps=1)``. Step
    ``t`` uses ``specs[t % len(specs)]``.
    """

    name = "pbat"
    config_class = PBATConfig
    settings: PBATConfig

    def __call__(self, model, x, y):
        _ensure_ranges(model, x)
        specs = self.settings.specs
        spec = specs[self.step % len(specs)]
        self.step += 1
        if self.settings.generate_on == "float":
            with float_view(model):
                x_mix, _ = self._patched_batch(model, spec, x, y)
        else:
            x_mix, _ = self._patched_batch(model, spec, x, y)
        logits = model(x_mix)
        loss = F.cross_entropy(logits, y)
        return loss, {"correct": (logits.detach().argmax(1) == y).sum()}


@OBJECTIVES.register("dwq")
class DWQ(Objective):
    """Double-Win Quant random precision (adversarial) training (module docstring; Fu et al. 2021).

    ``DWQ(config=None, **overrides)`` with :class:`DWQConfig`. Each step: ``b ~ U(bit_widths)`` from the
    objective's generator; the model is switched to ``b`` (its switchable BNs follow); the adversarial
    batch is made at ``b`` in train mode, as in the reference code; the loss is CE at ``b``.

    The model must be quantized; a plain ``BatchNorm2d`` is refused (call
    :func:`~qrobust.quant.bitwidth.make_switchable_bn` first) unless ``require_switchable_bn=False``.
    """

    name = "dwq"

    def __init__(self, config: DWQConfig | Mapping | None = None, **overrides):
        self.settings = DWQConfig.build(config, **overrides)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.step = 0
        self.last_bits: int | None = None
        self._checked = False

    def _check_model(self, model: nn.Module) -> None:
        if self.settings.require_switchable_bn and plain_batchnorms(model):
            raise ConfigError(
                "DWQ needs a BatchNorm per bit width: call make_switchable_bn(model, bit_widths) on the QAT "
                "model before training (or DWQ(require_switchable_bn=False) for a shared BN)"
            )
        for bits in self.settings.bit_widths:
            check_bit_width(model, bits)
        self._checked = True

    def __call__(self, model, x, y):
        from qrobust.attacks.whitebox import pgd

        c = self.settings
        if not self._checked:
            self._check_model(model)
        bits = c.bit_widths[int(torch.randint(len(c.bit_widths), (1,), generator=self.generator))]
        self.step += 1
        self.last_bits = bits
        set_bit_width(model, bits)
        if c.adversary == "none":
            x_adv = x
        else:
            steps, step_size = (1, c.alpha) if c.adversary == "fgsm" else (c.pgd_steps, 2 / 255)
            x_adv = pgd(model, x, y, c.eps, steps=steps, step_size=step_size, random_start=True,
                        generator=self.generator, check=False)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"correct": (logits.detach().argmax(1) == y).sum(), "bits": bits}

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.step = int(state["step"])
            self.generator.set_state(state["generator"])

    def config(self) -> dict:
        return {"name": self.name, **self.settings.to_dict()}


@OBJECTIVES.register("qadtr")
class QADTR(_PatchTraining):
    """QADT-R (Guesmi et al. 2025) with each part switchable: A-QAPA, DBWT, GIR (module docstring).

    ``QADTR(config=None, **overrides)`` with :class:`QADTRConfig` (each setting and its meaning listed
    there): ``QADTR(dbwt=False, gir=False)`` is the "A-QAPA" ablation, ``QADTR(gir=False)`` A-QAPA+DBWT,
    ``QADTR()`` all three. ``aqapa=False`` trains on clean images (DBWT and/or GIR only).
    """

    name = "qadtr"
    config_class = QADTRConfig
    settings: QADTRConfig

    def __init__(self, config: QADTRConfig | Mapping | None = None, **overrides):
        super().__init__(config, **overrides)
        c = self.settings
        self.schedule = BitWidthSchedule(c.bit_widths, c.dbwt_mode, c.seed)
        self.ladder = [[PatchConfig(sh, sz, region=c.region) for sz in c.sizes] for sh in c.shapes]
        self.level = (len(c.sizes) - 1) // 2
        self.fool_ema = 0.5 * (c.asr_low + c.asr_high)
        self.train_bits: int | None = None
        self.level_history: list[int] = []

    @property
    def sizes(self) -> tuple[float, ...]:
        return tuple(self.settings.sizes)

    def _random_width(self, exclude: int | None = None) -> int:
        choices = [b for b in self.settings.bit_widths if b != exclude]
        return choices[int(torch.randint(len(choices), (1,), generator=self.generator))]

    def __call__(self, model, x, y):
        c = self.settings
        if not is_quantized(model):
            raise ConfigError("QADT-R trains a quantized model: call qrobust.quant.quantize(model) first")
        if self.train_bits is None:
            self.train_bits = get_bit_width(model)
            for bits in c.bit_widths:
                check_bit_width(model, bits)
        _ensure_ranges(model, x)
        step = self.step
        self.step += 1
        bits = self.schedule(step) if c.dbwt else self.train_bits
        self.last_bits = bits
        k = 0
        x_mix = x
        if c.aqapa:
            spec = self.ladder[step % len(self.ladder)][self.level]
            gen_bits = bits if c.dbwt else self._random_width()
            set_bit_width(model, gen_bits)  # A-QAPA: the patch is made inside the quantized model at gen_bits
            x_mix, k = self._patched_batch(model, spec, x, y)
        set_bit_width(model, bits)
        stats: dict = {"bits": bits}
        if c.gir and c.gir_weight > 0:
            other = self._random_width(exclude=bits) if c.gir_mode == "bits" else bits
            sigma = c.gir_sigma if c.gir_mode == "noise" else 0.0
            n = x_mix.shape[0]
            if c.gir_batch == 0 or c.gir_batch >= n:
                penalty, logits = gir_penalty(
                    model, x_mix, y, bits, other, sigma=sigma, generator=self.generator
                )
            else:
                # Double back-propagation costs several plain steps: estimate the mean cosine on a random
                # sub-batch (unbiased) and take CE from one ordinary forward of the whole batch.
                idx = torch.randperm(n, generator=self.generator)[: c.gir_batch].to(x_mix.device)
                penalty, _ = gir_penalty(model, x_mix[idx], y[idx], bits, other, sigma=sigma,
                                         generator=self.generator, update_statistics=False)
                logits = model(x_mix)
            loss = F.cross_entropy(logits, y) + c.gir_weight * penalty
            stats["gir_cos"] = float(penalty.detach())
        else:
            logits = model(x_mix)
            loss = F.cross_entropy(logits, y)
        if k:
            fooled = float((logits.detach()[:k].argmax(1) != y[:k]).float().mean())
            self.fool_ema = c.asr_momentum * self.fool_ema + (1 - c.asr_momentum) * fooled
            if self.fool_ema < c.asr_low and self.level < len(self.sizes) - 1:
                self.level += 1  # the model resists this size: train against a larger patch
                self.fool_ema = 0.5 * (c.asr_low + c.asr_high)
            elif self.fool_ema > c.asr_high and self.level > 0:
                self.level -= 1  # too strong to learn from: smaller patch
                self.fool_ema = 0.5 * (c.asr_low + c.asr_high)
            self.level_history.append(self.level)
        stats["correct"] = (logits.detach().argmax(1) == y).sum()
        return loss, stats

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "level": self.level,
            "fool_ema": self.fool_ema,
            "train_bits": -1 if self.train_bits is None else self.train_bits,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        super().load_state_dict(state)
        self.level = int(state.get("level", self.level))
        self.fool_ema = float(state.get("fool_ema", self.fool_ema))
        train_bits = int(state.get("train_bits", -1))
        self.train_bits = None if train_bits < 0 else train_bits
