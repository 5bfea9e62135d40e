"""Settings of the QADT-R patch study (``configs/qadtr-<preset>.toml``): dataclasses, validation, presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qrobust.config import check_act_range
from qrobust.defenses.patch_training import PatchSpec
from qrobust.errors import ConfigError
from qrobust.experiment import StudyBase, load_study, study_preset


@dataclass
class DataCfg:
    name: str = "fashion-mnist"
    dir: str = ""  # empty = $QROBUST_DATA or the data set's default place
    download: bool = False
    augment: bool = True
    train_subset: int = 12000  # images the models train on (0 = all the rest)
    attack_subset: int = 2000  # other train images, used by the attacker to optimise patches
    test_subset: int = 1000  # held-out test images on which ASR and accuracy are measured (0 = all)


@dataclass
class ModelCfg:
    arch: str = "convnet"
    width: int = 16  # convnet only: channels of the first block (the registered convnet has 32)


@dataclass
class FloatCfg:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05  # peak LR, Nesterov SGD, cosine schedule


@dataclass
class QATCfg:
    bits: list[int] = field(default_factory=lambda: [8, 4, 2])
    epochs: int = 1
    lr: float = 0.01  # fine-tuning from the float model
    act_range: str = "ema"  # activation ranges: ema (min/max) | learned (LSQ+; better at 2 bits)


@dataclass
class DefenseCfg:
    names: list[str] = field(default_factory=lambda: ["none", "pbat", "dwq", "aqapa", "aqapa+dbwt", "qadtr"])
    epochs: int = 1
    lr: float = 0.01
    train_bits: int = 8  # width of the fixed-width defenses (PBAT, A-QAPA without DBWT)
    bit_widths: list[int] = field(default_factory=lambda: [2, 4, 8])  # DWQ / DBWT / A-QAPA / GIR widths
    fraction: float = 0.5  # share of each batch that gets a patch
    patch_steps: int = 2  # Adam steps on the persistent patch per training step
    patch_lr: float = 0.1
    dbwt_mode: str = "cycle"
    asr_low: float = 0.2  # A-QAPA size schedule thresholds
    asr_high: float = 0.6
    gir_weight: float = 0.5
    gir_mode: str = "bits"
    gir_sigma: float = 0.05
    gir_batch: int = 32  # images per step on which the GIR term is estimated (0 = the whole batch)
    dwq_adversary: str = "fgsm"
    dwq_eps: float = 0.03137  # 8/255
    dwq_alpha: float = 0.03922  # 10/255
    qadtr_switchable_bn: bool = False  # give QADT-R variants a BN per width too (the paper does not say)


@dataclass
class PatchCfg:
    shape: str = "square"  # training (seen) shape
    sizes: list[float] = field(default_factory=lambda: [0.08])  # seen sizes (PBAT trains on these)
    aqapa_sizes: list[float] = field(default_factory=lambda: [0.06, 0.08, 0.1])  # A-QAPA's size ladder
    region: list[float] = field(default_factory=lambda: [0.0, 0.6])  # seen places (top-left box)
    unseen: list[str] = field(default_factory=lambda: ["circle:0.1", "square:0.14"])  # "shape:size"
    unseen_region: list[float] = field(default_factory=lambda: [0.75, 1.0])  # unseen places


@dataclass
class AttackCfg:
    steps: int = 100  # Table 1 and float (transfer) patches: Adam steps
    lr: float = 0.05
    batch_size: int = 128
    draws: int = 2  # placements per test image in ASR
    adaptive: bool = True
    adaptive_steps: int = 40  # adaptive patches against each defended model and width
    table1_switched: bool = False  # Table 1 also for one 8-bit model switched between widths


@dataclass
class AnalysisCfg:
    num_images: int = 128
    pgd_eps: float = 0.1  # pixel attack for the gradient table (L-inf on [0, 1])
    pgd_steps: int = 10
    feature_layers: int = 3


@dataclass
class StudyConfig(StudyBase):
    name: str = "qadtr-quick"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    fp: FloatCfg = field(default_factory=FloatCfg)
    qat: QATCfg = field(default_factory=QATCfg)
    defense: DefenseCfg = field(default_factory=DefenseCfg)
    patches: PatchCfg = field(default_factory=PatchCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    analysis: AnalysisCfg = field(default_factory=AnalysisCfg)

    def validate(self) -> StudyConfig:
        from qrobust.studies.qadtr.defenses import DEFENSES

        check_act_range(self.qat.act_range, "qat.act_range")
        unknown = [n for n in self.defense.names if n not in DEFENSES]
        if unknown:
            raise ConfigError(f"unknown defense(s) {unknown} in defense.names; choose from: {', '.join(DEFENSES)}")
        for bits in list(self.qat.bits) + list(self.defense.bit_widths) + [self.defense.train_bits]:
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ConfigError(f"bit widths in qat.bits / defense.* must be 2..8, got {bits!r}")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one, e.g. seeds=[0]")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device '{self.device}' is unknown; use cpu, cuda or auto")
        positive = {
            "fp.epochs": self.fp.epochs, "qat.epochs": self.qat.epochs, "defense.epochs": self.defense.epochs,
            "attack.steps": self.attack.steps, "attack.batch_size": self.attack.batch_size,
            "attack.draws": self.attack.draws, "attack.adaptive_steps": self.attack.adaptive_steps,
            "analysis.num_images": self.analysis.num_images, "analysis.pgd_steps": self.analysis.pgd_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in {"fp.lr": self.fp.lr, "qat.lr": self.qat.lr, "defense.lr": self.defense.lr}.items():
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        if not self.patches.sizes:
            raise ConfigError("patches.sizes is empty; give the seen patch sizes, e.g. [0.08]")
        self.seen_specs()
        self.unseen_specs()
        return self

    def seen_specs(self) -> list[PatchSpec]:
        region = region_of(self.patches.region, "patches.region")
        return [PatchSpec(self.patches.shape, s, region) for s in self.patches.sizes]

    def unseen_specs(self) -> list[PatchSpec]:
        region = region_of(self.patches.unseen_region, "patches.unseen_region")
        specs = []
        for item in self.patches.unseen:
            shape, _, size = str(item).partition(":")
            try:
                value = float(size)
            except ValueError:
                raise ConfigError(
                    f"patches.unseen entry {item!r} must be 'shape:size', e.g. 'circle:0.1'"
                ) from None
            specs.append(PatchSpec(shape.strip(), value, region))
        return specs

    def widths(self) -> list[str]:
        """Table 1's models: the float model (``"32"``) and the QAT models of ``qat.bits``."""
        return ["32"] + [str(b) for b in self.qat.bits]


def region_of(values, key: str) -> tuple[float, float]:
    """``[lo, hi]`` from the config as a tuple (ConfigError naming ``key`` if it is not two numbers)."""
    if len(values) != 2:
        raise ConfigError(f"{key} must be [lo, hi] (fractions of the valid top-left positions), got {values}")
    return float(values[0]), float(values[1])


def preset_path(preset: str) -> Path:
    """``configs/qadtr-<preset>.toml`` in the working directory, else in the source checkout."""
    return study_preset("qadtr", preset)


def load_study_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Defaults < TOML file < ``key=value`` overrides (lists as ``key=[8,4,2]``); validated."""
    return load_study(StudyConfig(), path, overrides)
