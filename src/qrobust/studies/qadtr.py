"""The QADT-R patch study: ``qrobust run qadtr [--preset quick|full|paper]``.

Paper: A. Guesmi, B. Ouni, M. Shafique, "Breaking the Limits of Quantization-Aware Defenses: QADT-R for
Robustness Against Patch-Based Adversarial Attacks in QNNs", arXiv:2503.07058 (2025).

Threat model (DESIGN.md, 2): a universal patch (Brown et al. 2017) made white-box on a source model at
bit width ``b_s`` is pasted on test images fed to a target at ``b_t``; ASR = share of clean-correct
test images whose prediction the patch flips (untargeted). Patches are made on attacker images (train
images no model was trained on) and evaluated on held-out test images.

What the study measures, per seed (``runs/<name>/seed-<s>/``):

* **Table 1** (transfer): a float model and QAT models at 8/4/2 bits fine-tuned from it; a patch made on
  each source, its ASR on each target: ``ASR[b_s][b_t]`` (paper claim: > 70% down to 2 bits). With
  ``attack.table1_switched`` also for one 8-bit QAT model switched between widths.
* **Table 2** (defenses): none (the per-width QAT models), PBAT, DWQ, A-QAPA, A-QAPA+DBWT, QADT-R (and
  more ablations in ``full``), each at 8/4/2 bits (+ ``rand``: random precision inference, for the
  randomised ones): clean accuracy, ASR on *seen* patch configurations (training shape/sizes, placed
  in the training region) and on *unseen* ones (other shapes/sizes, placed outside it), for patches
  transferred from the float model and for adaptive patches made against the defended model itself
  at that width (``rand``: over random widths, one per optimisation step).
* **Gradients**: cosine similarity and MSE between input gradients of the float and the 8/4/2-bit
  models at clean, patched and PGD (pixel) inputs (paper Fig. 4), and per defense the alignment of
  input gradients between its own widths (what GIR targets).
* **Feature maps**: the first layers' channel-mean activations, clean vs patched, per width (Fig. 3),
  with the relative change ``||F(x_p) - F(x)|| / ||F(x)||`` as a table.

Every trained model is its own run folder (``seed-<s>/models/<name>``, resumable by the one loop);
every finished stage writes a JSON file and is skipped on re-run. ``results.json`` / ``results.md``
at the top level hold the tables (mean +- std over seeds when there are several).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from qrobust import data as datasets
from qrobust.attacks.patch import PatchConfig, apply_patch, patch_transfer_matrix, train_patch
from qrobust.config import TrainSection, check_act_range
from qrobust.defenses.patch_training import (
    DWQ,
    PBAT,
    QADTR,
    PatchSpec,
    RandomPrecision,
    make_switchable_bn,
    patch_asr,
)
from qrobust.errors import ConfigError
from qrobust.metrics import accuracy, accuracy_and_tie_rate, as_float_images
from qrobust.models import QNet, _convnet, model_for_data
from qrobust.quant import QuantConfig, quantize, set_bit_width
from qrobust.runs import atomic_write_bytes, environment, safe_load
from qrobust.studies.common import (
    PRESETS,
    QAT_EDGES,
    SeedStudy,
    StudyBase,
    act_range_tag,
    aggregate_seeds,
    load_study,
    open_study,
    study_preset,
)
from qrobust.train.objectives import CrossEntropy, Objective

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


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
        region = _region(self.patches.region, "patches.region")
        return [PatchSpec(self.patches.shape, s, region) for s in self.patches.sizes]

    def unseen_specs(self) -> list[PatchSpec]:
        region = _region(self.patches.unseen_region, "patches.unseen_region")
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


def preset_path(preset: str) -> Path:
    """``configs/qadtr-<preset>.toml`` in the working directory, else in the source checkout."""
    return study_preset("qadtr", preset)


def load_study_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Defaults < TOML file < ``key=value`` overrides (lists as ``key=[8,4,2]``); validated."""
    return load_study(StudyConfig(), "qadtr", path, overrides)


def _region(values, key: str) -> tuple[float, float]:
    if len(values) != 2:
        raise ConfigError(f"{key} must be [lo, hi] (fractions of the valid top-left positions), got {values}")
    return float(values[0]), float(values[1])


# --------------------------------------------------------------------------------------------------
# Models and defenses
# --------------------------------------------------------------------------------------------------


def build_float_model(cfg: StudyConfig, info: datasets.DatasetInfo) -> nn.Module:
    if cfg.model.arch == "convnet" and cfg.model.width != 32:
        if cfg.model.width < 1:
            raise ConfigError(f"model.width must be >= 1, got {cfg.model.width}")
        body = _convnet(info.channels, info.num_classes, info.image_size, width=cfg.model.width)
        model = QNet("convnet", body, info.mean, info.std)
        model.input_shape, model.num_classes = (info.channels, *info.image_size), info.num_classes
        return model
    return model_for_data(cfg.model.arch, info)


def qat_model(float_model: nn.Module, bits: int, act_range: str = "ema") -> nn.Module:
    """The QAT twin at ``bits`` (weights and activations; first/last layers kept at 8, the default)."""
    return quantize(float_model, QuantConfig(weight_bits=bits, act_bits=bits, act_range=act_range))


@dataclass(frozen=True)
class DefenseSpec:
    """How a Table-2 defense is built: its objective, whether its BNs are per width, randomised."""

    make: Callable[[StudyConfig, int], Objective] | None
    switchable_bn: Callable[[StudyConfig], bool] = lambda cfg: False
    randomised: bool = False


def _qadtr(aqapa: bool, dbwt: bool, gir: bool, **extra) -> Callable[[StudyConfig, int], Objective]:
    def make(cfg: StudyConfig, seed: int) -> Objective:
        d, p = cfg.defense, cfg.patches
        kwargs = dict(
            bit_widths=d.bit_widths, dbwt_mode=d.dbwt_mode, shapes=[p.shape], sizes=p.aqapa_sizes,
            region=_region(p.region, "patches.region"), asr_low=d.asr_low, asr_high=d.asr_high,
            fraction=d.fraction, patch_steps=d.patch_steps, patch_lr=d.patch_lr, gir_weight=d.gir_weight,
            gir_mode=d.gir_mode, gir_sigma=d.gir_sigma, gir_batch=d.gir_batch, seed=seed,
        )
        return QADTR(aqapa, dbwt, gir, **(kwargs | extra))

    return make


def _pbat(cfg: StudyConfig, seed: int) -> Objective:
    d = cfg.defense
    return PBAT(cfg.seen_specs(), fraction=d.fraction, patch_steps=d.patch_steps, patch_lr=d.patch_lr, seed=seed)


def _dwq(cfg: StudyConfig, seed: int) -> Objective:
    d = cfg.defense
    return DWQ(d.bit_widths, adversary=d.dwq_adversary, eps=d.dwq_eps, alpha=d.dwq_alpha, seed=seed)


def _qsbn(cfg: StudyConfig) -> bool:
    return cfg.defense.qadtr_switchable_bn


DEFENSES: dict[str, DefenseSpec] = {
    "none": DefenseSpec(None),
    "pbat": DefenseSpec(_pbat),
    "dwq": DefenseSpec(_dwq, lambda cfg: True, randomised=True),
    "aqapa": DefenseSpec(_qadtr(True, False, False), _qsbn),
    "aqapa+dbwt": DefenseSpec(_qadtr(True, True, False), _qsbn, randomised=True),
    "qadtr": DefenseSpec(_qadtr(True, True, True), _qsbn, randomised=True),
    "dbwt": DefenseSpec(_qadtr(False, True, False), _qsbn, randomised=True),
    "dbwt+gir": DefenseSpec(_qadtr(False, True, True), _qsbn, randomised=True),
    "aqapa+gir": DefenseSpec(_qadtr(True, False, True), _qsbn),
    "qadtr-noise": DefenseSpec(_qadtr(True, True, True, gir_mode="noise"), _qsbn, randomised=True),
}
LABELS = {"none": "none (QAT per width)", "pbat": "PBAT", "dwq": "DWQ", "aqapa": "A-QAPA",
          "aqapa+dbwt": "A-QAPA+DBWT", "qadtr": "QADT-R", "dbwt": "DBWT", "dbwt+gir": "DBWT+GIR",
          "aqapa+gir": "A-QAPA+GIR", "qadtr-noise": "QADT-R (GIR noise)"}


# --------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------


class _Data:
    """Tensors of one study: training images (uint8, for the loader), attacker and test images (float)."""

    def __init__(self, cfg: StudyConfig, device: torch.device):
        d = cfg.data
        ds = datasets.load_dataset(d.name, data_dir=d.dir or None, download=d.download)
        self.info = ds.info
        n = len(ds.train_y)
        n_train = min(d.train_subset or n, n)
        n_attack = min(d.attack_subset, n - n_train)
        if n_attack < 1 or n_train < 1:
            raise ConfigError(
                f"{d.name} has {n} training images: data.train_subset ({d.train_subset}) leaves "
                f"{n - n_train} for the attacker (data.attack_subset={d.attack_subset}); lower train_subset"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
        self.train_x, self.train_y = ds.train_x[perm[:n_train]], ds.train_y[perm[:n_train]]
        att = perm[n_train : n_train + n_attack]
        self.attack_x = as_float_images(ds.train_x[att]).to(device)
        self.attack_y = ds.train_y[att].to(device)
        m = len(ds.test_y)
        test = torch.randperm(m, generator=torch.Generator().manual_seed(54321))[: min(d.test_subset or m, m)]
        self.test_x = as_float_images(ds.test_x[test]).to(device)
        self.test_y = ds.test_y[test].to(device)


class QADTRStudy(SeedStudy):
    """One seed of the study in ``root``; :meth:`run` does every stage not done yet."""

    def __init__(self, cfg: StudyConfig, root: Path, seed: int):
        super().__init__(cfg, root, seed)
        self.data = _Data(cfg, self.device)

    # ---------------------------------------------------------------- helpers
    def _acc(self, model: nn.Module) -> float:
        return accuracy(model, self.data.test_x, self.data.test_y, _eval_batch(model), self.device)

    def _tie_rate(self, model: nn.Module) -> float:
        return accuracy_and_tie_rate(model, self.data.test_x, self.data.test_y, _eval_batch(model),
                                     self.device)["tie_rate"]

    def _loader(self, batch_size: int, seed: int) -> datasets.BatchLoader:
        return datasets.BatchLoader(self.data.train_x, self.data.train_y, batch_size, shuffle=True,
                                    augment=self.cfg.data.augment, info=self.data.info, device=self.device,
                                    drop_last=True, seed=seed)

    def _fit(self, name: str, model: nn.Module, objective: Objective, train: TrainSection,
             eval_bits: int | None, describe: dict) -> nn.Module:
        """Train ``model`` in its own run folder, or load it when that run is complete."""

        def evaluate(m: nn.Module) -> dict:
            if eval_bits is not None:
                set_bit_width(m, eval_bits)
            return {"test_acc": self._acc(m)}

        return self._fit_stage(name, model, objective, train, describe,
                               lambda: self._loader(train.batch_size, self.seed), evaluate)[0]

    def _train_section(self, epochs: int, lr: float, batch_size: int, warmup: float) -> TrainSection:
        return TrainSection(epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup,
                            device=self.cfg.device if self.cfg.device != "auto" else "auto")

    # ---------------------------------------------------------------- stage 1: float + QAT models
    def train_models(self) -> None:
        cfg = self.cfg
        torch.manual_seed(self.seed)
        fp = build_float_model(cfg, self.data.info)
        fp_train = self._train_section(cfg.fp.epochs, cfg.fp.lr, cfg.fp.batch_size, 0.5)
        self.models["32"] = self._fit("fp32", fp, CrossEntropy(), fp_train, None, {}).eval()
        qat_train = self._train_section(cfg.qat.epochs, cfg.qat.lr, cfg.fp.batch_size, 0.0)
        for bits in cfg.qat.bits:
            q = qat_model(self.models["32"], bits, cfg.qat.act_range)
            self.models[str(bits)] = self._fit(f"qat{bits}", q, CrossEntropy(), qat_train, bits,
                                               act_range_tag(cfg.qat.act_range) | QAT_EDGES).eval()

    def train_defenses(self) -> dict[str, nn.Module]:
        cfg, d = self.cfg, self.cfg.defense
        defended: dict[str, nn.Module] = {}
        train = self._train_section(d.epochs, d.lr, cfg.fp.batch_size, 0.0)
        for name in tqdm(d.names, desc="defenses", disable=not self.progress, leave=False):
            spec = DEFENSES[name]
            if spec.make is None:
                continue
            torch.manual_seed(self.seed)
            model = qat_model(self.models["32"], d.train_bits, cfg.qat.act_range)
            sbn = spec.switchable_bn(cfg)
            if sbn:
                make_switchable_bn(model, d.bit_widths)
            objective = spec.make(cfg, self.seed)
            defended[name] = self._fit(f"defense-{name}", model, objective, train, d.train_bits,
                                       {"switchable_bn": sbn, **act_range_tag(cfg.qat.act_range), **QAT_EDGES}).eval()
        return defended

    # ---------------------------------------------------------------- stage 2: Table 1
    def table1(self) -> dict:
        done = self._json("table1.json")
        if done is not None:
            return done
        cfg, a = self.cfg, self.cfg.attack
        spec = cfg.seen_specs()[0]
        pcfg = PatchConfig(spec.shape, spec.size, "random")
        widths = ["32"] + [str(b) for b in cfg.qat.bits]
        kwargs = dict(steps=a.steps, lr=a.lr, batch_size=a.batch_size, progress=self.progress)
        models = {w: self.models[w] for w in widths}
        x, y = self.data.attack_x, self.data.attack_y
        matrix = patch_transfer_matrix(models, x, y, pcfg, train_kwargs=kwargs, x_eval=self.data.test_x,
                                       y_eval=self.data.test_y, seed=self.seed, draws=a.draws)
        random_patch = patch_transfer_matrix({"32": models["32"]} | {w: models[w] for w in widths[1:]}, x, y,
                                             pcfg, train_kwargs=kwargs | {"steps": 0}, x_eval=self.data.test_x,
                                             y_eval=self.data.test_y, seed=self.seed, draws=a.draws)["32"]
        out = {"patch": spec.to_dict(), "clean_acc": {w: self._acc(models[w]) for w in widths},
               "tie_rate": {w: self._tie_rate(models[w]) for w in widths},
               "asr": matrix, "random_patch_asr": random_patch}
        if a.table1_switched and 8 in cfg.qat.bits:
            base = self.models["8"]

            def at(bits: int) -> Callable[[], nn.Module]:
                return lambda: set_bit_width(base, bits)

            switched = {"32": models["32"]} | {str(b): at(b) for b in cfg.qat.bits}
            out["asr_switched"] = patch_transfer_matrix(
                switched, x, y, pcfg, train_kwargs=kwargs, x_eval=self.data.test_x, y_eval=self.data.test_y,
                seed=self.seed, draws=a.draws)
            out["clean_acc_switched"] = {str(b): self._acc(set_bit_width(base, b)) for b in cfg.qat.bits}
            set_bit_width(base, 8)
        self._write_json("table1.json", out)
        return out

    # ---------------------------------------------------------------- stage 3: Table 2
    def float_patches(self) -> dict[str, Tensor]:
        path = self.root / "float_patches.pt"
        if path.exists():
            return {k: v.to(self.device) for k, v in safe_load(path).items()}
        a = self.cfg.attack
        patches = {}
        for spec in tqdm(self.cfg.seen_specs() + self.cfg.unseen_specs(), desc="float patches",
                         disable=not self.progress, leave=False):
            patches[spec.key] = train_patch(
                self.models["32"], self.data.attack_x, self.data.attack_y, spec.config(), steps=a.steps,
                lr=a.lr, batch_size=a.batch_size, generator=torch.Generator().manual_seed(self.seed),
                progress=False)
        import io

        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in patches.items()}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return patches

    def _views(self, name: str, defended: dict[str, nn.Module]) -> dict[str, Callable[[], nn.Module]]:
        """Zero-argument callables giving the model of ``name`` at each evaluated width."""
        cfg = self.cfg
        views: dict[str, Callable[[], nn.Module]] = {}
        if name == "none":
            for bits in cfg.qat.bits:
                views[str(bits)] = (lambda m: lambda: m)(self.models[str(bits)])
            return views
        model = defended[name]
        for bits in cfg.qat.bits:
            if bits in cfg.defense.bit_widths or not DEFENSES[name].switchable_bn(cfg):
                views[str(bits)] = (lambda b: lambda: set_bit_width(model, b))(bits)
        if DEFENSES[name].randomised:
            rp = RandomPrecision(model, cfg.defense.bit_widths,
                                 generator=torch.Generator().manual_seed(self.seed + 7))
            views["rand"] = lambda: rp
        return views

    def _asr(self, model: nn.Module, patch: Tensor, spec: PatchSpec) -> float:
        return patch_asr(model, self.data.test_x, self.data.test_y, patch, spec, draws=self.cfg.attack.draws,
                         batch_size=_eval_batch(model), generator=torch.Generator().manual_seed(self.seed + 1))["asr"]

    def table2(self, defended: dict[str, nn.Module]) -> dict:
        cfg, a = self.cfg, self.cfg.attack
        done = self._json("table2.json") or {}
        seen, unseen = cfg.seen_specs(), cfg.unseen_specs()
        float_patches = self.float_patches()
        for name in tqdm(cfg.defense.names, desc="table 2", disable=not self.progress, leave=False):
            if name in done:
                continue
            rows = {}
            for width, view in self._views(name, defended).items():
                model = view()
                row: dict[str, Any] = {"clean_acc": self._acc(model), "tie_rate": self._tie_rate(view()),
                                       "per_spec": {}}
                for group, specs in (("seen", seen), ("unseen", unseen)):
                    for spec in specs:
                        entry = {"transfer": self._asr(view(), float_patches[spec.key], spec)}
                        if a.adaptive:
                            patch = train_patch(
                                view(), self.data.attack_x, self.data.attack_y, spec.config(),
                                steps=a.adaptive_steps, lr=a.lr, batch_size=a.batch_size, progress=False,
                                generator=torch.Generator().manual_seed(self.seed + 2))
                            entry["adaptive"] = self._asr(view(), patch, spec)
                        row["per_spec"][f"{group}:{spec.key}"] = entry
                    for kind in ("transfer", "adaptive") if a.adaptive else ("transfer",):
                        values = [row["per_spec"][f"{group}:{s.key}"][kind] for s in specs]
                        row[f"{kind}_{group}"] = _nanmean(values)
                rows[width] = row
            done[name] = rows
            self._write_json("table2.json", done)
        return done

    # ---------------------------------------------------------------- stage 4: gradients, features
    def _grad(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            xg = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
        finally:
            for m, flag in flags:
                m.train(flag)
        return g

    def _attacked_inputs(self, n: int) -> dict[str, Tensor]:
        from qrobust.attacks.whitebox import pgd

        cfg = self.cfg
        x, y = self.data.test_x[:n], self.data.test_y[:n]
        spec = cfg.seen_specs()[0]
        patch = self.float_patches()[spec.key]
        locs = spec.locations(len(x), x.shape[-2:], torch.Generator().manual_seed(self.seed + 3)).to(x.device)
        x_patch, _ = apply_patch(x, patch, spec.config(), locations=locs)
        fp = self.models["32"].eval()
        x_pgd = pgd(fp, x, y, cfg.analysis.pgd_eps, steps=cfg.analysis.pgd_steps, check=False,
                    generator=torch.Generator().manual_seed(self.seed + 4))
        return {"clean": x, "patch": x_patch, "pixel": x_pgd}

    def gradients(self, defended: dict[str, nn.Module]) -> dict:
        done = self._json("gradients.json")
        if done is not None:
            return done
        cfg = self.cfg
        n = min(cfg.analysis.num_images, len(self.data.test_y))
        y = self.data.test_y[:n]
        inputs = self._attacked_inputs(n)
        float_vs_q: dict[str, dict[str, dict[str, float]]] = {}
        for attack, x in inputs.items():
            g32 = self._grad(self.models["32"], x, y)
            float_vs_q[attack] = {}
            for bits in cfg.qat.bits:
                gb = self._grad(self.models[str(bits)], x, y)
                cos = F.cosine_similarity(g32.flatten(1), gb.flatten(1), dim=1, eps=1e-12)
                float_vs_q[attack][str(bits)] = {"cos": float(cos.mean()), "mse": float((g32 - gb).pow(2).mean())}
        # Per defense: alignment of input gradients between its own widths (what GIR acts on).
        pairs = [(max(cfg.qat.bits), b) for b in cfg.qat.bits if b != max(cfg.qat.bits)]
        across: dict[str, dict[str, float]] = {}
        for name in cfg.defense.names:
            views = self._views(name, defended)
            across[name] = {}
            for hi, lo in pairs:
                if str(hi) not in views or str(lo) not in views:
                    continue
                for attack in ("clean", "patch"):
                    ga = self._grad(views[str(hi)](), inputs[attack], y)
                    gb = self._grad(views[str(lo)](), inputs[attack], y)
                    cos = F.cosine_similarity(ga.flatten(1), gb.flatten(1), dim=1, eps=1e-12)
                    across[name][f"{attack}:{hi}v{lo}"] = float(cos.mean())
        out = {"float_vs_quantized": float_vs_q, "defense_width_alignment": across, "num_images": n}
        self._write_json("gradients.json", out)
        self._gradient_png(inputs, y)
        return out

    def _gradient_png(self, inputs: dict[str, Tensor], y: Tensor) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        widths = ["32"] + [str(b) for b in self.cfg.qat.bits]
        attacks = ["patch", "pixel"]
        fig = Figure(figsize=(2.0 * len(widths), 2.1 * len(attacks)))
        for r, attack in enumerate(attacks):
            x = inputs[attack][:1]
            for c, w in enumerate(widths):
                g = self._grad(self.models[w], x, y[:1])[0].abs().sum(0).cpu()
                ax = fig.add_subplot(len(attacks), len(widths), r * len(widths) + c + 1)
                ax.imshow(g.numpy(), cmap="inferno")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{attack}, {w}-bit", fontsize=8)
        fig.tight_layout()
        FigureCanvasAgg(fig).print_png(str(self.root / "gradient_maps.png"))

    def features(self) -> dict:
        done = self._json("features.json")
        if done is not None:
            return done
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        cfg = self.cfg
        n = min(cfg.analysis.num_images, len(self.data.test_y))
        inputs = self._attacked_inputs(n)
        widths = ["32"] + [str(b) for b in cfg.qat.bits]
        maps: dict[str, list[tuple[Tensor, Tensor]]] = {}
        shift: dict[str, dict[str, float]] = {}
        for w in widths:
            clean = _layer_outputs(self.models[w], inputs["clean"], cfg.analysis.feature_layers)
            patched = _layer_outputs(self.models[w], inputs["patch"], cfg.analysis.feature_layers)
            maps[w] = [(c[0].mean(0).cpu(), p[0].mean(0).cpu()) for c, p in zip(clean, patched, strict=True)]
            shift[w] = {
                f"layer{i + 1}": float(((p - c).flatten(1).norm(dim=1) / c.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())
                for i, (c, p) in enumerate(zip(clean, patched, strict=True))
            }
        layers = len(next(iter(maps.values())))
        cols = 2 + 2 * layers
        fig = Figure(figsize=(1.6 * cols, 1.7 * len(widths)))
        for r, w in enumerate(widths):
            panels = [("clean", inputs["clean"][0].mean(0).cpu()), ("patched", inputs["patch"][0].mean(0).cpu())]
            for i, (c, p) in enumerate(maps[w]):
                panels += [(f"L{i + 1} clean", c), (f"L{i + 1} patched", p)]
            for c_idx, (title, img) in enumerate(panels):
                ax = fig.add_subplot(len(widths), cols, r * cols + c_idx + 1)
                ax.imshow(img.numpy(), cmap="gray" if c_idx < 2 else "viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{w}-bit {title}" if c_idx == 0 else title, fontsize=7)
        fig.tight_layout()
        FigureCanvasAgg(fig).print_png(str(self.root / "feature_maps.png"))
        out = {"relative_shift": shift, "num_images": n}
        self._write_json("features.json", out)
        return out

    # ---------------------------------------------------------------- all
    def run(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        self._timed("train_models", self.train_models)
        defended = self._timed("train_defenses", self.train_defenses)
        t1 = self._timed("table1", self.table1)
        t2 = self._timed("table2", lambda: self.table2(defended))
        grads = self._timed("gradients", lambda: self.gradients(defended))
        feats = self._timed("features", self.features)
        result = {"seed": self.seed, "table1": t1, "table2": t2, "gradients": grads, "features": feats,
                  "stage_seconds_this_call": self.timings, "stage_seconds_total": self._json("timings.json")}
        self._write_json("results.json", result)
        return result


def _eval_batch(model: nn.Module) -> int:
    """Random precision draws one width per forward: small batches give many draws per evaluation."""
    return 32 if isinstance(model, RandomPrecision) else 512


def _layer_outputs(model: nn.Module, x: Tensor, layers: int) -> list[Tensor]:
    """Outputs of the first ``layers`` 4-D blocks of ``model.body`` (eval mode, no grad)."""
    blocks = [m for m in getattr(model, "body", nn.Sequential()).children()][:layers]
    outs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for b in blocks]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags:
            m.train(flag)
    return [o for o in outs if o.dim() == 4]


def _nanmean(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if good else float("nan")


# --------------------------------------------------------------------------------------------------
# Aggregation over seeds, Markdown, plots
# --------------------------------------------------------------------------------------------------


def _fmt(cell: Any, percent: bool = True, seeds: int = 1) -> str:
    if isinstance(cell, dict) and "mean" in cell:
        mean, std = cell["mean"], cell["std"]
    else:
        mean, std = float(cell), 0.0
    if math.isnan(mean):
        return "n/a"
    if percent:
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if seeds > 1 else "")
    return f"{mean:.3g}" + (f" ± {std:.2g}" if seeds > 1 else "")


def results_markdown(cfg: StudyConfig, agg: dict, seeds: int, seconds: float) -> str:
    t1, t2, grads, feats = agg["table1"], agg["table2"], agg["gradients"], agg["features"]
    widths = ["32"] + [str(b) for b in cfg.qat.bits]
    seen = ", ".join(f"{s.shape} {s.size:g}" for s in cfg.seen_specs())
    unseen = ", ".join(f"{s.shape} {s.size:g}" for s in cfg.unseen_specs())
    lines = [
        f"# QADT-R patch study: {cfg.name}",
        "",
        f"{cfg.data.name}, {cfg.model.arch} (width {cfg.model.width}), seeds {cfg.seeds}; "
        "ASR in % (untargeted, on clean-correct held-out test images, "
        f"{cfg.attack.draws} placement draw(s) per image){'; mean ± std over seeds' if seeds > 1 else ''}. "
        f"Compute time of all stages (summed over calls and seeds): {seconds / 60:.1f} min.",
        "",
        f"## Table 1: patch transfer across bit widths ({cfg.seen_specs()[0].shape} patch, "
        f"{cfg.seen_specs()[0].size:g} of the image, {cfg.attack.steps} Adam steps, random places)",
        "",
        "| source \\ target | " + " | ".join(f"{w}-bit" for w in widths) + " |",
        "|---|" + "---|" * len(widths),
        "| clean accuracy | " + " | ".join(_fmt(t1["clean_acc"][w], seeds=seeds) for w in widths) + " |",
        "| tie rate (top-1 logit tied) | " + " | ".join(
            _fmt(t1["tie_rate"][w], seeds=seeds) if "tie_rate" in t1 else "-" for w in widths) + " |",
    ]
    for src in widths:
        lines.append(f"| patch from {src}-bit | " + " | ".join(_fmt(t1["asr"][src][w], seeds=seeds) for w in widths)
                     + " |")
    lines.append("| random patch (0 steps) | " + " | ".join(_fmt(t1["random_patch_asr"][w], seeds=seeds)
                                                         for w in widths) + " |")
    if "asr_switched" in t1:
        lines += ["", "One 8-bit QAT model switched between widths (clean accuracy, then ASR):", "",
                  "| source \\ target | " + " | ".join(f"{w}-bit" for w in widths) + " |",
                  "|---|" + "---|" * len(widths),
                  "| clean accuracy | " + _fmt(t1["clean_acc"]["32"], seeds=seeds) + " | "
                  + " | ".join(_fmt(t1["clean_acc_switched"][w], seeds=seeds) for w in widths[1:]) + " |"]
        for src in widths:
            lines.append(f"| patch from {src}-bit | "
                         + " | ".join(_fmt(t1["asr_switched"][src][w], seeds=seeds) for w in widths) + " |")
    lines += [
        "",
        "## Table 2: defenses x bit width",
        "",
        f"Seen = {seen} at places in the training region {cfg.patches.region}; unseen = {unseen} at places "
        f"{cfg.patches.unseen_region} (outside it). Transfer = patch made on the float model; adaptive = "
        f"patch made against the defended model at that width ({cfg.attack.adaptive_steps} steps; "
        "`rand` = random precision inference, the attack sees a random width per step). Lower ASR is better.",
        "",
        "| defense | width | clean acc | tie rate | transfer seen | transfer unseen | adaptive seen | adaptive unseen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in cfg.defense.names:
        for width, row in t2.get(name, {}).items():
            cells = [_fmt(row["clean_acc"], seeds=seeds), _fmt(row["tie_rate"], seeds=seeds) if "tie_rate" in row else "-"] + [
                _fmt(row[k], seeds=seeds) if k in row else "-"
                for k in ("transfer_seen", "transfer_unseen", "adaptive_seen", "adaptive_unseen")]
            lines.append(f"| {LABELS[name]} | {width} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Gradient analysis: float vs quantized input gradients",
        "",
        f"Mean per-image cosine similarity and MSE between grad_x CE of the float model and of the QAT model, "
        f"on {grads['num_images'] if not isinstance(grads['num_images'], dict) else grads['num_images']['mean']:.0f} "
        f"test images: clean, with the float model's patch, and after PGD (L-inf {cfg.analysis.pgd_eps:g}, "
        f"{cfg.analysis.pgd_steps} steps, made on the float model).",
        "",
        "| input | " + " | ".join(f"cos 32 vs {b}" for b in cfg.qat.bits) + " | "
        + " | ".join(f"MSE 32 vs {b}" for b in cfg.qat.bits) + " |",
        "|---|" + "---|" * (2 * len(cfg.qat.bits)),
    ]
    for attack, per in grads["float_vs_quantized"].items():
        lines.append(f"| {attack} | " + " | ".join(_fmt(per[str(b)]["cos"], False, seeds) for b in cfg.qat.bits)
                     + " | " + " | ".join(_fmt(per[str(b)]["mse"], False, seeds) for b in cfg.qat.bits) + " |")
    align = grads["defense_width_alignment"]
    keys = sorted({k for per in align.values() for k in per})
    if keys:
        lines += ["", "Input-gradient cosine between a defense's own widths (lower = less aligned; GIR's target):",
                  "", "| defense | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, per in align.items():
            lines.append(f"| {LABELS[name]} | " + " | ".join(_fmt(per[k], False, seeds) if k in per else "-"
                                                          for k in keys) + " |")
    shift = feats["relative_shift"]
    layer_keys = list(next(iter(shift.values())).keys())
    lines += ["", "## Feature maps: relative change ||F(x_patch) - F(x)|| / ||F(x)|| (see feature_maps.png)", "",
              "| width | " + " | ".join(layer_keys) + " |", "|---|" + "---|" * len(layer_keys)]
    for w, per in shift.items():
        lines.append(f"| {w}-bit | " + " | ".join(_fmt(per[k], False, seeds) for k in layer_keys) + " |")
    lines += ["", "Figures: transfer_matrix.png, table2_asr.png, seed-*/feature_maps.png, seed-*/gradient_maps.png.", ""]
    return "\n".join(lines)


def _plots(cfg: StudyConfig, agg: dict, root: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def mean(cell: Any) -> float:
        return cell["mean"] if isinstance(cell, dict) and "mean" in cell else float(cell)

    widths = ["32"] + [str(b) for b in cfg.qat.bits]
    t1 = agg["table1"]
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    grid = [[100 * mean(t1["asr"][s][t]) for t in widths] for s in widths]
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="magma")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    ax.set_xticks(range(len(widths)), [f"{w}" for w in widths])
    ax.set_yticks(range(len(widths)), [f"{w}" for w in widths])
    ax.set_xlabel("target bits")
    ax.set_ylabel("source bits")
    ax.set_title("patch ASR (%)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(root / "transfer_matrix.png"))

    t2 = agg["table2"]
    kinds = [k for k in ("transfer_seen", "transfer_unseen", "adaptive_seen", "adaptive_unseen")
             if any(k in row for per in t2.values() for row in per.values())]
    labels, values = [], {k: [] for k in kinds}
    for name in cfg.defense.names:
        for width, row in t2.get(name, {}).items():
            labels.append(f"{name} @ {width}")
            for k in kinds:
                values[k].append(100 * mean(row[k]) if k in row else float("nan"))
    fig = Figure(figsize=(max(6.0, 0.45 * len(labels)), 4.4))
    ax = fig.add_subplot(1, 1, 1)
    step = 0.8 / max(1, len(kinds))
    for i, k in enumerate(kinds):
        ax.bar([j + i * step for j in range(len(labels))], values[k], width=step, label=k.replace("_", " "))
    ax.set_xticks([j + 0.4 - step / 2 for j in range(len(labels))], labels, fontsize=7, rotation=90)
    ax.set_ylabel("ASR (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(root / "table2_asr.png"))


def run_study(cfg: StudyConfig, executor=None) -> dict:
    """Run (or resume) every seed of the study; write ``results.json``, ``results.md`` and plots."""
    if executor is not None and executor.name != "local":
        raise ConfigError("this study does not run on the study engine yet: use --executor local")
    root, run = open_study(cfg)
    t0 = time.perf_counter()
    per_seed = []
    for seed in tqdm(cfg.seeds, desc="seeds", disable=not cfg.progress or len(cfg.seeds) == 1):
        per_seed.append(QADTRStudy(cfg, root / f"seed-{seed}", seed).run())
    keys = ("table1", "table2", "gradients", "features")
    agg = {k: aggregate_seeds([r[k] for r in per_seed], average_lists=False) for k in keys}
    seconds = time.perf_counter() - t0
    results = {"complete": True, "name": cfg.name, "seeds": cfg.seeds, **agg,
               "per_seed_stage_seconds": {str(r["seed"]): r["stage_seconds_total"] for r in per_seed},
               "wall_seconds_this_call": seconds, "environment": environment(cfg.device)}
    compute = sum(sum(r["stage_seconds_total"].values()) for r in per_seed)
    run.write_json("results.json", results)
    run.write_text("results.md", results_markdown(cfg, agg, len(cfg.seeds), compute))
    _plots(cfg, agg, root)
    return results


__all__ = ["DEFENSES", "PRESETS", "QADTRStudy", "StudyConfig", "load_study_config", "preset_path", "run_study"]
