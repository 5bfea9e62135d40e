"""Settings of the QADT-R patch study (``configs/qadtr-<preset>.toml``): dataclasses, validation, presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from qrobust.attacks.patch import PatchConfig
from qrobust.config import check_act_range
from qrobust.errors import ConfigError
from qrobust.experiment import DataSection, FloatSection, StudyBase, load_study, study_preset


@dataclass
class DataCfg(DataSection):
    train_subset: int = 12000  # images the models train on (0 = all the rest)
    attack_subset: int = 2000  # other train images, used by the attacker to optimise patches
    test_subset: int = 1000  # held-out test images on which ASR and accuracy are measured (0 = all)


@dataclass
class ModelCfg:
    arch: str = "convnet"
    width: int = 16  # convnet only: channels of the first block (the registered convnet has 32)


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
    # Unseen patches change one factor of the (first) seen patch at a time, then all three (Table 2):
    unseen_shape: str = "circle"  # new shape only
    unseen_size: float = 0.14  # new size only (share of the image; the report states the area in pixels)
    unseen_region: list[float] = field(default_factory=lambda: [0.75, 1.0])  # new places only
    size_curve: list[float] = field(default_factory=lambda: [0.04, 0.08, 0.12, 0.16])  # ASR vs size (0 = off)


@dataclass
class AttackCfg:
    steps: int = 100  # Table 1 and float (transfer) patches: Adam steps
    lr: float = 0.05
    batch_size: int = 128
    draws: int = 2  # placements per test image in ASR
    adaptive: bool = True
    adaptive_steps: int = 100  # adaptive patches against each defended model and width (>= steps)
    steps_curve: bool = True  # adaptive ASR after steps/4, /2, 1x, 2x adaptive_steps, one model per defense
    heatmap_grid: int = 5  # ASR of the float model's patch on a grid x grid of fixed places (0 = off)
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
    fp: FloatSection = field(default_factory=FloatSection)
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
        if self.attack.adaptive and self.attack.adaptive_steps < self.attack.steps:
            raise ConfigError(
                f"attack.adaptive_steps ({self.attack.adaptive_steps}) < attack.steps ({self.attack.steps}): an "
                "adaptive attack weaker than the transfer attack it is compared with; raise adaptive_steps"
            )
        if self.attack.heatmap_grid < 0 or self.attack.heatmap_grid == 1:
            raise ConfigError(f"attack.heatmap_grid must be 0 (off) or >= 2, got {self.attack.heatmap_grid}")
        if not self.patches.sizes:
            raise ConfigError("patches.sizes is empty; give the seen patch sizes, e.g. [0.08]")
        self.seen_specs()
        self.unseen_specs()
        for size in self.patches.size_curve:
            PatchConfig(self.patches.shape, size)
        return self

    def seen_specs(self) -> list[PatchConfig]:
        region = region_of(self.patches.region, "patches.region")
        return [PatchConfig(self.patches.shape, s, region=region) for s in self.patches.sizes]

    def unseen_specs(self) -> dict[str, PatchConfig]:
        """Table 2's unseen patches, one factor of the first seen patch changed at a time, then all:
        ``unseen_size``, ``unseen_shape``, ``unseen_place``, ``unseen_all``."""
        p = self.patches
        seen = self.seen_specs()[0]
        region = region_of(p.unseen_region, "patches.unseen_region")
        try:
            return {"unseen_size": replace(seen, size=p.unseen_size),
                    "unseen_shape": replace(seen, shape=p.unseen_shape),
                    "unseen_place": replace(seen, region=region),
                    "unseen_all": PatchConfig(p.unseen_shape, p.unseen_size, region=region)}
        except ConfigError as err:
            raise ConfigError(f"patches.unseen_*: {err}") from None

    def table2_specs(self) -> dict[str, PatchConfig]:
        """Every patch of Table 2 by its name: ``seen:<shape>@<size>`` per seen size, then the unseen ones."""
        return {f"seen:{s.key}": s for s in self.seen_specs()} | self.unseen_specs()

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
