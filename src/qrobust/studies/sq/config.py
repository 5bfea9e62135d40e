"""Settings of the SQ white-box study: the config sections, their validation and the presets
(``configs/sq-<preset>.toml``: smoke, quick, full, paper)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrobust.attacks.whitebox import parse_eps
from qrobust.config import check_act_range
from qrobust.errors import ConfigError
from qrobust.experiment import DataSection, FloatSection, StudyBase, load_study, study_preset
from qrobust.quant.stochastic import SQConfig, check_num_draws
from qrobust.train.sq_objective import MIEnsembleLoss


@dataclass
class DataCfg(DataSection):
    train_subset: int = 10000  # training images (0 = all but the validation ones)
    val_subset: int = 500  # other train images: calibration of the SQ ranges, detector threshold
    test_subset: int = 200  # held-out test images every attack runs on (0 = all)


@dataclass
class ModelCfg:
    arch: str = "lenet5"


@dataclass
class QATCfg:
    bits: int = 0  # 0 = ceil(log2(sq.num_bins)), the SQ's resolution (min 2)
    epochs: int = 1
    lr: float = 0.01  # fine-tuning from the float model
    act_range: str = "ema"  # activation ranges: ema (min/max) | learned (LSQ+; better at 2 bits)


@dataclass
class SQCfg:
    num_bins: int = 4  # K bins per value
    alpha: float = 4.0  # bin-logit sharpness (noise: a value on a bin moves with prob ~exp(-alpha))
    tau: float = 1.0  # Gumbel-softmax temperature (shapes the straight-through gradient only)
    learnable: bool = True  # learnable bin offset and gaps (+ spacing regulariser)
    at_input: bool = True  # an SQ on the input pixels, range [0, 1]
    # SQs after these modules: the paper's pipeline input -> SQ -> features -> SQ -> classifier (LeNet-5's
    # features end with body.1, its second conv block)
    after: list[str] = field(default_factory=lambda: ["body.1"])
    percentile: float = 99.9  # calibrated range: [min(0, q_(100-p)), q_p] of the float activations
    n_draws: int = 16  # N: ensemble draws per training step and at inference (the paper's 16)
    beta: float = 0.1  # MI weight of the sq-mi model (the sq model has beta = 0)
    mi_on: str = "last-sq"  # which MI: output (T = class output, X = draw) | last-sq | every-sq (T = quantized values)
    spacing_weight: float = 0.01
    ce_on: str = "draws"  # draws | mean (see MIEnsembleLoss)
    epochs: int = 2
    lr: float = 0.01  # fine-tuning from the float model


@dataclass
class AttackCfg:
    norm: str = "linf"
    eps: list[str] = field(default_factory=lambda: ["0.02", "0.05", "0.1"])  # numbers or fractions
    steps: int = 10  # PGD / EOT-PGD / transfer / adaptive steps (step size 2.5 eps / steps)
    eot: int = 4  # EOT draws of the deployed ensemble per EOT-PGD step
    draws: int = 4  # robust only if correct on all these evaluations (randomised models)
    batch_size: int = 100
    detector_fpr: float = 0.05  # threshold set on clean validation images at this false-positive rate
    detector_direction: str = "above"  # flag MI above (or below) the threshold
    adaptive: bool = True  # adaptive attack on the detector (sq-mi only)
    adaptive_eps: str = ""  # eps of the adaptive attack; empty = the middle one of `eps`
    adaptive_lambda: float = 1.0  # weight of the MI term in the adaptive attacker's loss
    square_queries: int = 1000  # Square Attack (black-box, L-inf only) queries per image; 0 = off
    square_p_init: float = 0.8  # share of the image Square's first windows cover (the Square paper's MNIST value)
    apgd_steps: int = 50  # APGD-CE iterations (step-size-free PGD, Croce & Hein 2020); 0 = off

    def runs(self, attack: str) -> bool:
        """Whether these settings switch ``attack`` on (:data:`ATTACK_SWITCHES`; an attack without a
        switch always runs, where the model allows)."""
        switch = ATTACK_SWITCHES.get(attack)
        return switch is None or switch(self)


# Attacks that settings can switch off: APGD-CE needs apgd_steps > 0, Square an L-inf budget and queries.
ATTACK_SWITCHES: dict[str, Callable[[AttackCfg], bool]] = {
    "apgd-ce": lambda a: a.apgd_steps > 0,
    "square": lambda a: a.norm == "linf" and a.square_queries > 0,
}


@dataclass
class AblationCfg:
    num_bins: list[int] = field(default_factory=list)  # extra sq-mi models, one setting changed each
    tau: list[float] = field(default_factory=list)
    n_draws: list[int] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    mi_on: list[str] = field(default_factory=list)  # other MI readings (MI_READINGS)
    spacing_weight: list[float] = field(default_factory=list)  # the bin-spacing term's weight (0 = off)
    eps: str = ""  # one eps for the ablation table; empty = the middle one of attack.eps


@dataclass
class StudyConfig(StudyBase):
    name: str = "sq-quick"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    fp: FloatSection = field(default_factory=FloatSection)
    qat: QATCfg = field(default_factory=QATCfg)
    sq: SQCfg = field(default_factory=SQCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    ablation: AblationCfg = field(default_factory=AblationCfg)

    @property
    def qat_bits(self) -> int:
        return self.qat.bits or max(2, math.ceil(math.log2(self.sq.num_bins)))

    def eps_values(self) -> list[float]:
        return [budget(spec, self.attack.norm, "attack.eps") for spec in self.attack.eps]

    def middle_eps(self, spec: str) -> str:
        """``spec``, or the middle one of ``attack.eps`` when it is empty."""
        return spec if spec else self.attack.eps[len(self.attack.eps) // 2]

    def adaptive_eps(self) -> tuple[str, float]:
        """The adaptive attack's budget: its spec and number."""
        spec = self.middle_eps(self.attack.adaptive_eps)
        return spec, budget(spec, self.attack.norm, "attack.adaptive_eps")

    def ablation_eps(self) -> tuple[str, float]:
        """The ablation table's budget: its spec and number."""
        spec = self.middle_eps(self.ablation.eps)
        return spec, budget(spec, self.attack.norm, "ablation.eps")

    def validate(self) -> StudyConfig:
        check_act_range(self.qat.act_range, "qat.act_range")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one, e.g. seeds=[0]")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device '{self.device}' is unknown; use cpu, cuda or auto")
        if self.attack.norm not in ("linf", "l2"):
            raise ConfigError(f"attack.norm must be 'linf' or 'l2', got {self.attack.norm!r}")
        if not self.attack.eps:
            raise ConfigError(
                "attack.eps is empty; give the budgets, e.g. attack.eps=['2/255','5/255','8/255']"
            )
        eps = self.eps_values()
        if len(set(eps)) != len(eps):
            raise ConfigError(f"attack.eps has repeated values: {self.attack.eps}")
        self.adaptive_eps()
        self.ablation_eps()
        positive = {
            "fp.epochs": self.fp.epochs,
            "fp.batch_size": self.fp.batch_size,
            "qat.epochs": self.qat.epochs,
            "sq.epochs": self.sq.epochs,
            "attack.steps": self.attack.steps,
            "attack.batch_size": self.attack.batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in {"fp.lr": self.fp.lr, "qat.lr": self.qat.lr, "sq.lr": self.sq.lr}.items():
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        for key in ("eot", "draws"):
            _draws(getattr(self.attack, key), f"attack.{key}")
        if self.attack.square_queries < 0:
            raise ConfigError(f"attack.square_queries must be >= 0 (0 = no Square Attack), got {self.attack.square_queries}")
        if self.attack.apgd_steps < 0:
            raise ConfigError(f"attack.apgd_steps must be >= 0 (0 = no APGD-CE), got {self.attack.apgd_steps}")
        if not 0 < self.attack.square_p_init <= 1:
            raise ConfigError("attack.square_p_init (share of the image Square's first windows cover) must be in "
                              f"(0, 1], got {self.attack.square_p_init}; 0.8 suits 28x28 images, 0.05 CIFAR-10")
        if self.qat.bits and not 2 <= self.qat.bits <= 8:
            raise ConfigError(f"qat.bits must be 2..8 (or 0 = the SQ's resolution), got {self.qat.bits}")
        if not 50.0 < self.sq.percentile <= 100.0:
            raise ConfigError(f"sq.percentile must be in (50, 100], e.g. 99.9; got {self.sq.percentile}")
        if self.attack.detector_direction not in ("above", "below"):
            raise ConfigError("attack.detector_direction must be 'above' or 'below'")
        if not 0.0 < self.attack.detector_fpr < 1.0:
            raise ConfigError(
                f"attack.detector_fpr must be in (0, 1), e.g. 0.05; got {self.attack.detector_fpr}"
            )
        for variant, settings in [("sq", self.sq_settings())] + self.ablation_variants():
            _check_sq(settings, variant)
        return self

    def sq_settings(self, **changes: Any) -> dict:
        """The SQ+MI settings (``changes`` for an ablation variant)."""
        s = self.sq
        base = dict(
            num_bins=s.num_bins,
            alpha=s.alpha,
            tau=s.tau,
            learnable=s.learnable,
            n_draws=s.n_draws,
            beta=s.beta,
            spacing_weight=s.spacing_weight,
            ce_on=s.ce_on,
            mi_on=s.mi_on,
        )
        return base | changes

    def ablation_variants(self) -> list[tuple[str, dict]]:
        a, out = self.ablation, []
        for k in a.num_bins:
            out.append((f"sq-mi-K{k}", self.sq_settings(num_bins=k)))
        for t in a.tau:
            out.append((f"sq-mi-tau{t:g}", self.sq_settings(tau=t)))
        for n in a.n_draws:
            out.append((f"sq-mi-N{n}", self.sq_settings(n_draws=n)))
        for b in a.beta:
            out.append((f"sq-mi-beta{b:g}", self.sq_settings(beta=b)))
        for reading in a.mi_on:
            out.append((f"sq-mi-{reading}", self.sq_settings(mi_on=reading)))
        for w in a.spacing_weight:
            out.append((f"sq-mi-spacing{w:g}", self.sq_settings(spacing_weight=w)))
        return out


def preset_path(preset: str) -> Path:
    """``configs/sq-<preset>.toml`` in the working directory, else in the source checkout."""
    return study_preset("sq", preset)


def load_study_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Defaults < TOML file < ``key=value`` overrides (lists as ``key=[8,4,2]``); validated."""
    return load_study(StudyConfig(), path, overrides)


def budget(spec: Any, norm: str, key: str) -> float:
    """The number of budget ``spec`` (``"0.05"``, ``"8/255"``, ``"linf:8/255"``); a ConfigError naming
    ``key`` when it is no budget or one of the other norm."""
    try:
        named, value = parse_eps(spec)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    if named is not None and named != norm:
        raise ConfigError(f"{key}: budget {spec!r} is an {named} budget but attack.norm is {norm!r}")
    return value


def _draws(value: Any, key: str) -> int:
    try:
        return check_num_draws(value)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def _check_sq(settings: dict, variant: str) -> None:
    """Surface the building blocks' errors (K < 2, tau <= 0, N = 0, ...) with the config key."""
    try:
        SQConfig(num_bins=settings["num_bins"], alpha=settings["alpha"], tau=settings["tau"])
        MIEnsembleLoss(
            beta=settings["beta"],
            spacing_weight=settings["spacing_weight"],
            n_draws=settings["n_draws"],
            ce_on=settings["ce_on"],
            mi_on=settings["mi_on"],
        )
    except ConfigError as err:
        raise ConfigError(f"{variant} (config section [sq] / [ablation]): {err}") from None


ROUNDED = "sq-mi-round"  # the SQ+MI network with nearest-bin rounding: trained as sq-mi, evaluated deterministic
INPUT_ROUNDED = "fp32-inq"  # the float network fine-tuned behind a fixed uniform K-level rounding of its input


def model_names(cfg: StudyConfig) -> list[str]:
    """The models every seed evaluates, in table order (ablation variants come on top); all but
    :data:`ROUNDED` (the sq-mi network with its SQs rounding, not sampling) are trained."""
    return ["fp32", "fp32-ft", INPUT_ROUNDED, f"qat{cfg.qat_bits}", "sq", "sq-mi", ROUNDED]
