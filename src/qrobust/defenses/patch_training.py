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
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.patch import ANYWHERE, PatchConfig, apply_patch, patch_mask, train_patch
from qrobust.attacks.whitebox import input_gradient
from qrobust.errors import ConfigError
from qrobust.quant.bitwidth import (
    BitWidthSchedule,
    check_bit_width,
    check_bit_widths,
    float_view,
    plain_batchnorms,
)
from qrobust.quant.fake import ActQuant, get_bit_width, is_quantized, set_bit_width
from qrobust.registry import OBJECTIVES
from qrobust.train.objectives import Objective
from qrobust.utils import eval_mode

__all__ = [
    "DWQ",
    "PBAT",
    "QADTR",
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
) -> tuple[Tensor, Tensor]:
    """QADT-R's GIR term ``R = mean_i cos(g_b(x_i), g_b'(x_i'))``, differentiable in the weights.

    ``g_b(x) = grad_x CE(f_b(x), y)`` with ``create_graph=True``. ``bits``/``other_bits`` are the two
    widths (None: leave the model's width as it is); ``sigma > 0`` takes the second gradient at
    ``x' = clamp(x + sigma * n, 0, 1)``, ``n ~ N(0, I)`` from ``generator``. The model is left at
    ``bits``. Returns ``(R, logits at bits)``; the logits let the caller reuse that forward for CE.
    """
    xa = x.detach().requires_grad_(True)
    if bits is not None:
        set_bit_width(model, bits)
    logits, ga = _graph_input_grad(model, xa, y)
    xb = x.detach()
    if sigma > 0:
        gdev = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        xb = (xb + sigma * noise).clamp(0, 1)
    xb = xb.requires_grad_(True)
    if other_bits is not None:
        set_bit_width(model, other_bits)
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


def _check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"fraction (share of each batch that gets a patch) must be in (0, 1], got {fraction}"
        )
    return fraction


class _PatchTraining(Objective):
    """Shared machinery: persistent patches per (shape, size), a generator, step count, state."""

    def __init__(self, *, fraction: float, patch_steps: int, patch_lr: float, seed: int):
        self.fraction = _check_fraction(fraction)
        if isinstance(patch_steps, bool) or not isinstance(patch_steps, int) or patch_steps < 1:
            raise ConfigError(f"patch_steps must be a whole number >= 1, got {patch_steps!r}")
        if not (math.isfinite(float(patch_lr)) and float(patch_lr) > 0):
            raise ConfigError(f"patch_lr must be a number > 0, got {patch_lr!r}")
        self.patch_steps, self.patch_lr, self.seed = patch_steps, float(patch_lr), int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
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
        k = max(1, round(self.fraction * x.shape[0]))
        patch = train_patch(
            generator_model,
            x[:k],
            y[:k],
            replace(spec, region=ANYWHERE),
            steps=self.patch_steps,
            lr=self.patch_lr,
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


def _specs(specs: Sequence[PatchConfig | dict], what: str = "specs") -> tuple[PatchConfig, ...]:
    out = tuple(s if isinstance(s, PatchConfig) else PatchConfig(**s) for s in specs)
    if not out:
        raise ConfigError(f"{what} is empty; give at least one PatchConfig(shape, size, region=...)")
    return out


@OBJECTIVES.register("pbat")
class PBAT(_PatchTraining):
    """Patch adversarial training on one network (see the module docstring for the loss).

    Args:
        specs: training patch configurations, used in turn (step ``t`` uses ``specs[t % len]``).
        fraction: share of each batch that gets the patch (the rest stays clean).
        patch_steps, patch_lr: Adam steps per training step on the persistent patch, and their rate.
        generate_on: ``"float"`` (quantizers off while making the patch: PBAT in full precision) or
            ``"model"`` (the network as it is trained).
    """

    name = "pbat"

    def __init__(
        self,
        specs: Sequence[PatchConfig | dict] = (PatchConfig(size=0.08),),
        *,
        fraction: float = 0.5,
        patch_steps: int = 2,
        patch_lr: float = 0.1,
        generate_on: str = "float",
        seed: int = 0,
    ):
        super().__init__(fraction=fraction, patch_steps=patch_steps, patch_lr=patch_lr, seed=seed)
        self.specs = _specs(specs)
        if generate_on not in ("float", "model"):
            raise ConfigError(f"generate_on must be 'float' or 'model', got {generate_on!r}")
        self.generate_on = generate_on

    def __call__(self, model, x, y):
        _ensure_ranges(model, x)
        spec = self.specs[self.step % len(self.specs)]
        self.step += 1
        if self.generate_on == "float":
            with float_view(model):
                x_mix, _ = self._patched_batch(model, spec, x, y)
        else:
            x_mix, _ = self._patched_batch(model, spec, x, y)
        logits = model(x_mix)
        loss = F.cross_entropy(logits, y)
        return loss, {"correct": (logits.detach().argmax(1) == y).sum()}

    def config(self) -> dict:
        return {
            "name": self.name,
            "specs": [s.to_dict() for s in self.specs],
            "fraction": self.fraction,
            "patch_steps": self.patch_steps,
            "patch_lr": self.patch_lr,
            "generate_on": self.generate_on,
        }


ADVERSARIES = ("fgsm", "pgd", "none")


@OBJECTIVES.register("dwq")
class DWQ(Objective):
    """Double-Win Quant random precision (adversarial) training (module docstring; Fu et al. 2021).

    Each step: ``b ~ U(bit_widths)`` from the objective's generator; the model is switched to ``b``
    (its switchable BNs follow); the adversarial batch is made at ``b`` in train mode, as in the
    reference code; the loss is CE at ``b``. ``adversary``: ``"fgsm"`` (FGSM with a uniform random
    start, step ``alpha``: the reference code's default), ``"pgd"`` (``pgd_steps`` steps of
    ``2/255``), or ``"none"`` (random precision training on clean images only).

    The model must be quantized; a plain ``BatchNorm2d`` is refused (call :func:`make_switchable_bn`
    first) unless ``require_switchable_bn=False``.
    """

    name = "dwq"

    def __init__(
        self,
        bit_widths: Sequence[int] = (2, 4, 8),
        *,
        adversary: str = "fgsm",
        eps: float = 8 / 255,
        alpha: float = 10 / 255,
        pgd_steps: int = 7,
        seed: int = 0,
        require_switchable_bn: bool = True,
    ):
        self.bit_widths = check_bit_widths(bit_widths)
        if adversary not in ADVERSARIES:
            raise ConfigError(f"unknown DWQ adversary '{adversary}'; use one of: {', '.join(ADVERSARIES)}")
        if not (0 < float(eps) <= 1 and 0 < float(alpha) <= 1):
            raise ConfigError(
                f"eps and alpha are L-inf budgets on [0, 1] images, in (0, 1]; got {eps}, {alpha}"
            )
        if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
            raise ConfigError(f"pgd_steps must be a whole number >= 1, got {pgd_steps!r}")
        self.adversary, self.eps, self.alpha, self.pgd_steps = adversary, float(eps), float(alpha), pgd_steps
        self.require_switchable_bn = bool(require_switchable_bn)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step = 0
        self.last_bits: int | None = None
        self._checked = False

    def _check_model(self, model: nn.Module) -> None:
        if self.require_switchable_bn and plain_batchnorms(model):
            raise ConfigError(
                "DWQ needs a BatchNorm per bit width: call make_switchable_bn(model, bit_widths) on the QAT "
                "model before training (or DWQ(require_switchable_bn=False) for a shared BN)"
            )
        for bits in self.bit_widths:
            check_bit_width(model, bits)
        self._checked = True

    def __call__(self, model, x, y):
        from qrobust.attacks.whitebox import pgd

        if not self._checked:
            self._check_model(model)
        bits = self.bit_widths[int(torch.randint(len(self.bit_widths), (1,), generator=self.generator))]
        self.step += 1
        self.last_bits = bits
        set_bit_width(model, bits)
        if self.adversary == "none":
            x_adv = x
        elif self.adversary == "fgsm":
            x_adv = pgd(
                model,
                x,
                y,
                self.eps,
                steps=1,
                step_size=self.alpha,
                random_start=True,
                generator=self.generator,
                check=False,
            )
        else:
            x_adv = pgd(
                model,
                x,
                y,
                self.eps,
                steps=self.pgd_steps,
                step_size=2 / 255,
                random_start=True,
                generator=self.generator,
                check=False,
            )
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
        return {
            "name": self.name,
            "bit_widths": list(self.bit_widths),
            "adversary": self.adversary,
            "eps": self.eps,
            "alpha": self.alpha,
            "pgd_steps": self.pgd_steps,
        }


GIR_MODES = ("bits", "noise")


@OBJECTIVES.register("qadtr")
class QADTR(_PatchTraining):
    """QADT-R (Guesmi et al. 2025) with each part switchable: A-QAPA, DBWT, GIR (module docstring).

    ``QADTR(aqapa=True, dbwt=False, gir=False)`` is the "A-QAPA" ablation, ``dbwt=True`` adds DBWT,
    all three is QADT-R. ``aqapa=False`` trains on clean images (DBWT and/or GIR only).

    Args:
        bit_widths: the widths DBWT cycles over, A-QAPA makes patches at, and GIR compares.
        dbwt_mode: ``"cycle"`` or ``"random"`` (:class:`BitWidthSchedule`).
        shapes, sizes, region: A-QAPA's training patches: shapes cycle, ``sizes`` is the ladder the
            adaptive schedule moves on (start: the middle), places are uniform in ``region``.
        asr_low, asr_high, asr_momentum: the schedule's thresholds on the EMA (momentum) of the batch
            fooling rate of the patched images.
        fraction, patch_steps, patch_lr: as :class:`PBAT`.
        gir_weight: ``lambda_GIR``; gir_mode: ``"bits"`` (another width of ``bit_widths``) or
            ``"noise"`` (same width, input noise ``gir_sigma``); gir_batch: images per step on which
            ``R_GIR`` is estimated (a random sub-batch; 0 = all): double back-propagation is the
            expensive part of QADT-R.
    """

    name = "qadtr"

    def __init__(
        self,
        aqapa: bool = True,
        dbwt: bool = True,
        gir: bool = True,
        *,
        bit_widths: Sequence[int] = (2, 4, 8),
        dbwt_mode: str = "cycle",
        shapes: Sequence[str] = ("square",),
        sizes: Sequence[float] = (0.06, 0.08, 0.1),
        region: tuple[float, float] = (0.0, 1.0),
        asr_low: float = 0.2,
        asr_high: float = 0.6,
        asr_momentum: float = 0.9,
        fraction: float = 0.5,
        patch_steps: int = 2,
        patch_lr: float = 0.1,
        gir_weight: float = 0.5,
        gir_mode: str = "bits",
        gir_sigma: float = 0.05,
        gir_batch: int = 32,
        seed: int = 0,
    ):
        super().__init__(fraction=fraction, patch_steps=patch_steps, patch_lr=patch_lr, seed=seed)
        self.aqapa, self.dbwt, self.gir = bool(aqapa), bool(dbwt), bool(gir)
        self.bit_widths = check_bit_widths(bit_widths)
        self.schedule = BitWidthSchedule(self.bit_widths, dbwt_mode, seed)
        shapes = tuple(shapes)
        sizes = tuple(sorted(float(s) for s in sizes))
        if not shapes or not sizes:
            raise ConfigError(
                "A-QAPA needs at least one shape and one size, e.g. shapes=['square'], sizes=[0.08]"
            )
        self.ladder = [[PatchConfig(sh, sz, region=region) for sz in sizes] for sh in shapes]  # validates all
        if not 0 <= asr_low < asr_high <= 1 or not 0 <= asr_momentum < 1:
            raise ConfigError(
                f"need 0 <= asr_low < asr_high <= 1 and 0 <= asr_momentum < 1, got {asr_low}, {asr_high}, "
                f"{asr_momentum}"
            )
        self.asr_low, self.asr_high, self.asr_momentum = float(asr_low), float(asr_high), float(asr_momentum)
        if gir_mode not in GIR_MODES:
            raise ConfigError(f"unknown gir_mode '{gir_mode}'; use one of: {', '.join(GIR_MODES)}")
        if not (math.isfinite(gir_weight) and gir_weight >= 0 and gir_sigma >= 0):
            raise ConfigError(f"gir_weight and gir_sigma must be >= 0, got {gir_weight}, {gir_sigma}")
        if self.gir and gir_mode == "bits" and len(self.bit_widths) < 2:
            raise ConfigError(
                "GIR across bit widths needs at least two bit widths to compare; add one to bit_widths "
                "or use gir_mode='noise'"
            )
        if self.gir and gir_mode == "noise" and gir_sigma <= 0:
            raise ConfigError("gir_mode='noise' needs gir_sigma > 0 (the input noise std on [0, 1] images)")
        self.gir_weight, self.gir_mode, self.gir_sigma = float(gir_weight), gir_mode, float(gir_sigma)
        if isinstance(gir_batch, bool) or not isinstance(gir_batch, int) or gir_batch < 0:
            raise ConfigError(
                f"gir_batch must be a whole number >= 0 (0 = the whole batch), got {gir_batch!r}"
            )
        self.gir_batch = gir_batch
        self.level = (len(sizes) - 1) // 2
        self.fool_ema = 0.5 * (self.asr_low + self.asr_high)
        self.train_bits: int | None = None
        self.level_history: list[int] = []

    @property
    def sizes(self) -> tuple[float, ...]:
        return tuple(s.size for s in self.ladder[0])

    def _random_width(self, exclude: int | None = None) -> int:
        choices = [b for b in self.bit_widths if b != exclude]
        return choices[int(torch.randint(len(choices), (1,), generator=self.generator))]

    def __call__(self, model, x, y):
        if not is_quantized(model):
            raise ConfigError("QADT-R trains a quantized model: call qrobust.quant.quantize(model) first")
        if self.train_bits is None:
            self.train_bits = get_bit_width(model)
            for bits in self.bit_widths:
                check_bit_width(model, bits)
        _ensure_ranges(model, x)
        step = self.step
        self.step += 1
        bits = self.schedule(step) if self.dbwt else self.train_bits
        self.last_bits = bits
        k = 0
        x_mix = x
        if self.aqapa:
            spec = self.ladder[step % len(self.ladder)][self.level]
            gen_bits = bits if self.dbwt else self._random_width()
            set_bit_width(model, gen_bits)  # A-QAPA: the patch is made inside the quantized model at gen_bits
            x_mix, k = self._patched_batch(model, spec, x, y)
        set_bit_width(model, bits)
        stats: dict = {"bits": bits}
        if self.gir and self.gir_weight > 0:
            other = self._random_width(exclude=bits) if self.gir_mode == "bits" else bits
            sigma = self.gir_sigma if self.gir_mode == "noise" else 0.0
            n = x_mix.shape[0]
            if self.gir_batch == 0 or self.gir_batch >= n:
                penalty, logits = gir_penalty(
                    model, x_mix, y, bits, other, sigma=sigma, generator=self.generator
                )
            else:
                # Double back-propagation costs several plain steps: estimate the mean cosine on a random
                # sub-batch (unbiased) and take CE from one ordinary forward of the whole batch.
                idx = torch.randperm(n, generator=self.generator)[: self.gir_batch].to(x_mix.device)
                penalty, _ = gir_penalty(
                    model, x_mix[idx], y[idx], bits, other, sigma=sigma, generator=self.generator
                )
                logits = model(x_mix)
            loss = F.cross_entropy(logits, y) + self.gir_weight * penalty
            stats["gir_cos"] = float(penalty.detach())
        else:
            logits = model(x_mix)
            loss = F.cross_entropy(logits, y)
        if k:
            fooled = float((logits.detach()[:k].argmax(1) != y[:k]).float().mean())
            self.fool_ema = self.asr_momentum * self.fool_ema + (1 - self.asr_momentum) * fooled
            if self.fool_ema < self.asr_low and self.level < len(self.sizes) - 1:
                self.level += 1  # the model resists this size: train against a larger patch
                self.fool_ema = 0.5 * (self.asr_low + self.asr_high)
            elif self.fool_ema > self.asr_high and self.level > 0:
                self.level -= 1  # too strong to learn from: smaller patch
                self.fool_ema = 0.5 * (self.asr_low + self.asr_high)
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

    def config(self) -> dict:
        return {
            "name": self.name,
            "aqapa": self.aqapa,
            "dbwt": self.dbwt,
            "gir": self.gir,
            "bit_widths": list(self.bit_widths),
            "dbwt_mode": self.schedule.mode,
            "shapes": [row[0].shape for row in self.ladder],
            "sizes": list(self.sizes),
            "region": list(self.ladder[0][0].region),
            "asr_low": self.asr_low,
            "asr_high": self.asr_high,
            "fraction": self.fraction,
            "patch_steps": self.patch_steps,
            "patch_lr": self.patch_lr,
            "gir_weight": self.gir_weight,
            "gir_mode": self.gir_mode,
            "gir_sigma": self.gir_sigma,
            "gir_batch": self.gir_batch,
        }
