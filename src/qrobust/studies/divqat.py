"""The DivQAT extraction study: ``qrobust run divqat [--preset quick|full|paper]``.

Paper: "DivQAT: Enhancing Robustness of Quantized Convolutional Neural Networks against Model
Extraction Attacks", arXiv:2512.23948. DivQAT trains the quantized model with

    L = CE(y, f_q(x)) - alpha * KL(f_q(x) || f_fp(x))          (qrobust.train.divqat.DivQATLoss)

so that its probabilities deviate from the float model's and a clone trained on them is worse.

Threat model (DESIGN.md, 1): the victim is a deployed 8-bit (fake-quantized) model behind a budgeted
:class:`~qrobust.attacks.extraction.victim.Victim` that answers defended probabilities (top-1 labels
for the hard-label row). Every query counts, zeroth-order probes included; the defense applies to all.

Per seed (``runs/<name>/seed-<s>/``):

1. **Splits**: the victim data set's training images are cut by seed into disjoint victim-train /
   attacker pool / validation sets (``split_indices``); test images are a fixed subset of the test set.
2. **Victims** (each its own resumable run folder under ``models/``): the float model; plain QAT
   victims for each backend ('server' = x86, 'mobile' = ARM); DivQAT victims over the alpha sweep,
   all fine-tuned from the float model. For each quantized victim: test accuracy and the mean
   ``KL(f_q || f_fp)`` on test images (the mechanism). A DivQAT victim that lost more than
   ``divqat.max_acc_drop`` accuracy vs plain QAT stops the study with a clear error (its folder is kept);
   the objective's own guard stops it earlier, during training, at the same threshold vs the teacher.
3. **Defenses**: none, RS and DCP, each calibrated per victim to the strongest parameter with mean
   l1 <= ``defense.l1_budget`` (0.6) on the validation probabilities (``calibrate_defense``).
4. **Attacks** per victim x defense: KnockoffNets (soft labels, transfer set = the attacker split or a
   named data set), hard-label KnockoffNets (the paper's stated limit), DFME, MAZE, and the
   random-noise floor (KnockoffNets' fit on as many uniform-noise queries). Each cell records defender
   accuracy, clone accuracy, clone/victim agreement, l1 (test), queries used and the victim's ledger;
   cells are stored in ``cells.json`` as they finish and skipped on re-run.

Top level: ``results.json`` (mean and std over seeds), ``results.md`` (the paper-style table: rows QAT /
DivQAT(alpha) x defense; defender accuracy, clone accuracy per attack, adversary error gain over QAT of
the same backend), ``defender_vs_clone.png`` and ``clone_vs_queries.png``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qrobust import data as datasets
from qrobust.attacks.extraction.dfme import DFME, Generator
from qrobust.attacks.extraction.knockoff import KnockoffNets, prepare_transfer_set, random_noise_floor
from qrobust.attacks.extraction.maze import MAZE
from qrobust.attacks.extraction.metrics import agreement, clone_accuracy
from qrobust.attacks.extraction.victim import Victim
from qrobust.config import TrainSection
from qrobust.defenses.output import (
    DefenseAccuracyWarning,
    calibrate_defense,
    defense_accuracy_warning,
    make_defense,
)
from qrobust.errors import ConfigError
from qrobust.metrics import accuracy, accuracy_and_tie_rate, as_float_images, predict_logits
from qrobust.models import QNet, _convnet, model_for_data
from qrobust.quant import QuantConfig, quantize
from qrobust.runs import environment
from qrobust.studies.common import (
    PRESETS,
    QAT_EDGES,
    SeedStudy,
    StudyBase,
    load_study,
    mean_std,
    open_study,
    study_preset,
)

# generic config plumbing shared with the QADT-R study (TOML + key=value overrides into dataclasses)
from qrobust.train.divqat import DivQATLoss, check_divqat_accuracy, mean_kl_to_float
from qrobust.train.objectives import CrossEntropy, Objective

ATTACKS = ("knockoff", "knockoff-hard", "dfme", "maze", "noise")
DEFENSES = ("none", "rs", "dcp")
ATTACK_LABELS = {"knockoff": "KnockoffNets", "knockoff-hard": "KnockoffNets (hard label)", "dfme": "DFME",
                 "maze": "MAZE", "noise": "noise floor"}
PAPER_BUDGETS = "KnockoffNets 50k queries, DFME 20M, MAZE 5M (CIFAR-10)"

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class DataCfg:
    name: str = "fashion-mnist"
    dir: str = ""  # empty = $QROBUST_DATA or the data set's default place
    download: bool = False
    augment: bool = True
    victim_fraction: float = 0.2  # of the training images: the victim trains on these
    attacker_fraction: float = 0.2  # disjoint: the attacker's pool (KnockoffNets' default transfer set)
    val_fraction: float = 0.05  # disjoint: defense calibration (l1 budget)
    test_subset: int = 2000  # test images for every accuracy / agreement / KL (0 = all)
    transfer: str = ""  # KnockoffNets transfer set: "" = the attacker split, else a data set name
    transfer_subset: int = 0  # images of a named transfer set to use (0 = all)


@dataclass
class ModelCfg:
    arch: str = "convnet"
    width: int = 16  # convnet only: channels of the first block (the registered convnet has 32)
    clone_arch: str = ""  # attacker's clone architecture ("" = same as the victim)


@dataclass
class FloatCfg:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05  # peak LR, Nesterov SGD, 0.5 epoch warm-up then cosine


@dataclass
class QATCfg:
    bits: int = 8  # weight and activation bits of every quantized victim
    backends: list[str] = field(default_factory=lambda: ["server", "mobile"])
    epochs: int = 1
    lr: float = 0.01  # fine-tuning from the float model


@dataclass
class DivQATCfg:
    alphas: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.05, 0.08, 0.1])
    backend: str = "server"  # DivQAT victims use this backend; gains are vs QAT of the same backend
    epochs: int = 1
    lr: float = 0.01
    teacher_floor: float = 1e-6  # bounds the KL term (see qrobust.train.divqat)
    max_acc_drop: float = 0.15  # larger test-accuracy loss vs plain QAT = collapse -> error


@dataclass
class DefenseCfg:
    names: list[str] = field(default_factory=lambda: ["none", "rs", "dcp"])
    l1_budget: float = 0.6  # mean l1 between defended and clean probabilities (validation set)
    rs_gamma: float = 0.2
    dcp_gamma: float = 0.2
    dcp_nu: float = 1000.0


@dataclass
class AttackCfg:
    names: list[str] = field(default_factory=lambda: list(ATTACKS))
    label_defenses: list[str] = field(default_factory=lambda: ["none"])  # defenses for knockoff-hard / noise
    attack_float: bool = False  # also attack the float model (reference row)


@dataclass
class KnockoffCfg:
    queries: int = 10000  # also the noise floor's budget
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    sampling: str = "random"


@dataclass
class DFMECfg:
    queries: int = 20000
    batch_size: int = 64
    num_directions: int = 1
    clone_steps: int = 5
    lr_clone: float = 0.1
    lr_generator: float = 5e-4
    generator_width: int = 64  # w of DFME's generator (conv widths 2w, w); smaller = cheaper
    latent_dim: int = 256
    eval_every: int = 10  # iterations between clone-accuracy points (clone acc vs queries)


@dataclass
class MAZECfg:
    queries: int = 20000
    batch_size: int = 32
    num_directions: int = 10
    clone_steps: int = 5
    replay_steps: int = 10
    lr_clone: float = 0.1
    lr_generator: float = 1e-4
    generator_width: int = 64  # w of DFME's generator (conv widths 2w, w); smaller = cheaper
    latent_dim: int = 100
    eval_every: int = 10


@dataclass
class StudyConfig(StudyBase):
    name: str = "divqat-quick"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    fp: FloatCfg = field(default_factory=FloatCfg)
    qat: QATCfg = field(default_factory=QATCfg)
    divqat: DivQATCfg = field(default_factory=DivQATCfg)
    defense: DefenseCfg = field(default_factory=DefenseCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    knockoff: KnockoffCfg = field(default_factory=KnockoffCfg)
    dfme: DFMECfg = field(default_factory=DFMECfg)
    maze: MAZECfg = field(default_factory=MAZECfg)

    def validate(self) -> StudyConfig:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.seeds), "seeds is empty; give at least one, e.g. seeds=[0]")
        need(self.device in ("cpu", "cuda", "auto"), f"device '{self.device}' is unknown; use cpu, cuda or auto")
        need(2 <= self.qat.bits <= 8, f"qat.bits must be 2..8, got {self.qat.bits}")
        for backend in [*self.qat.backends, self.divqat.backend]:
            need(backend in ("server", "mobile"), f"backend '{backend}' is unknown; use 'server' or 'mobile'")
        need(self.divqat.backend in self.qat.backends,
             f"divqat.backend '{self.divqat.backend}' needs a plain QAT victim of the same backend to compare "
             f"with; add it to qat.backends (now {self.qat.backends})")
        for alpha in self.divqat.alphas:
            need(math.isfinite(alpha) and alpha > 0,
                 f"divqat.alphas must all be > 0 (the paper sweeps 0.01 .. 0.1), got {alpha!r}")
        need(len(set(self.divqat.alphas)) == len(self.divqat.alphas), f"divqat.alphas has repeats: {self.divqat.alphas}")
        need(0 <= self.divqat.max_acc_drop <= 1, f"divqat.max_acc_drop must be in [0, 1], got {self.divqat.max_acc_drop}")
        for name in self.defense.names + self.attack.label_defenses:
            need(name in DEFENSES, f"unknown defense '{name}'; choose from: {', '.join(DEFENSES)}")
        need("none" in self.defense.names, "defense.names must contain 'none' (the undefended baseline)")
        for name in self.attack.names:
            need(name in ATTACKS, f"unknown attack '{name}' in attack.names; choose from: {', '.join(ATTACKS)}")
        need(self.defense.l1_budget > 0, f"defense.l1_budget must be > 0, got {self.defense.l1_budget}")
        d = self.data
        fractions = d.victim_fraction + d.attacker_fraction + d.val_fraction
        need(min(d.victim_fraction, d.attacker_fraction, d.val_fraction) > 0 and fractions <= 1,
             f"data.victim/attacker/val_fraction must be > 0 and sum to <= 1, got {d.victim_fraction}, "
             f"{d.attacker_fraction}, {d.val_fraction}")
        positive = {
            "fp.epochs": self.fp.epochs, "qat.epochs": self.qat.epochs, "divqat.epochs": self.divqat.epochs,
            "fp.batch_size": self.fp.batch_size, "knockoff.queries": self.knockoff.queries,
            "knockoff.batch_size": self.knockoff.batch_size, "dfme.queries": self.dfme.queries,
            "maze.queries": self.maze.queries, "dfme.eval_every": self.dfme.eval_every,
            "maze.eval_every": self.maze.eval_every, "dfme.generator_width": self.dfme.generator_width,
            "maze.generator_width": self.maze.generator_width,
        }
        for key, value in positive.items():
            need(value >= 1, f"{key} must be >= 1, got {value}")
        for key, value in {"fp.lr": self.fp.lr, "qat.lr": self.qat.lr, "divqat.lr": self.divqat.lr}.items():
            need(value > 0, f"{key} must be > 0, got {value}")
        return self


def preset_path(preset: str) -> Path:
    """``configs/divqat-<preset>.toml`` in the working directory, else in the source checkout."""
    return study_preset("divqat", preset)


def load_study_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Defaults < TOML file < ``key=value`` overrides (lists as ``key=[8,4,2]``); validated."""
    return load_study(StudyConfig(), "divqat", path, overrides)


def alpha_tag(alpha: float) -> str:
    return f"{alpha:g}"


def victim_names(cfg: StudyConfig) -> list[str]:
    """The attacked victims, in table order: (fp32), QAT per backend, DivQAT per alpha."""
    names = ["fp32"] if cfg.attack.attack_float else []
    names += [f"qat-{b}" for b in cfg.qat.backends]
    names += [f"divqat-{alpha_tag(a)}-{cfg.divqat.backend}" for a in cfg.divqat.alphas]
    return names


def cell_plan(cfg: StudyConfig) -> list[tuple[str, str, str]]:
    """Every (victim, defense, attack) cell the study runs."""
    cells = []
    for victim in victim_names(cfg):
        for defense in cfg.defense.names:
            for attack in cfg.attack.names:
                if attack in ("knockoff-hard", "noise") and defense not in cfg.attack.label_defenses:
                    continue
                cells.append((victim, defense, attack))
    return cells


# --------------------------------------------------------------------------------------------------
# The study, one seed
# --------------------------------------------------------------------------------------------------


class _Data:
    """One seed's tensors: victim-train (uint8, for the loader), attacker pool, validation, test, transfer."""

    def __init__(self, cfg: StudyConfig, seed: int, device: torch.device):
        d = cfg.data
        ds = datasets.load_dataset(d.name, data_dir=d.dir or None, download=d.download)
        self.info = ds.info
        self.image_shape = (ds.info.channels, *ds.info.image_size)
        split = datasets.split_indices(
            len(ds.train_y), {"victim": d.victim_fraction, "attacker": d.attacker_fraction, "val": d.val_fraction},
            seed)
        if min(len(v) for v in split.values()) < 2:
            raise ConfigError(f"{d.name} has {len(ds.train_y)} training images: the split fractions leave a split "
                              f"with < 2 images ({ {k: len(v) for k, v in split.items()} }); raise the fractions")
        self.train_x, self.train_y = ds.train_x[split["victim"]], ds.train_y[split["victim"]]
        self.attacker_x = as_float_images(ds.train_x[split["attacker"]]).to(device)
        self.val_x = as_float_images(ds.train_x[split["val"]]).to(device)
        m = len(ds.test_y)
        test = torch.randperm(m, generator=torch.Generator().manual_seed(10_000 + seed))[: min(d.test_subset or m, m)]
        self.test_x = as_float_images(ds.test_x[test]).to(device)
        self.test_y = ds.test_y[test].to(device)
        self.split_sizes = {k: len(v) for k, v in split.items()} | {"test": len(test)}
        self.transfer_name = d.transfer or f"{d.name} (attacker split)"
        if d.transfer:
            other = datasets.load_dataset(d.transfer, data_dir=None, download=d.download)
            n = len(other.train_y)
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(20_000 + seed))
            pick = pick[: min(d.transfer_subset or n, n)]
            self.transfer = prepare_transfer_set(other.train_x[pick], self.image_shape).to(device)
        else:
            self.transfer = self.attacker_x


class DivQATStudy(SeedStudy):
    """One seed of the study in ``root``; :meth:`run` does every stage not done yet."""

    def __init__(self, cfg: StudyConfig, root: Path, seed: int):
        super().__init__(cfg, root, seed)
        self.data = _Data(cfg, seed, self.device)

    # ---------------------------------------------------------------- helpers
    def _acc(self, model: nn.Module) -> float:
        return accuracy(model, self.data.test_x, self.data.test_y, 512, self.device)

    def _model(self, arch: str) -> nn.Module:
        info = self.data.info
        if arch == "convnet" and self.cfg.model.width != 32:
            if self.cfg.model.width < 1:
                raise ConfigError(f"model.width must be >= 1, got {self.cfg.model.width}")
            model = QNet("convnet", _convnet(info.channels, info.num_classes, info.image_size,
                                             width=self.cfg.model.width), info.mean, info.std)
            model.input_shape, model.num_classes = (info.channels, *info.image_size), info.num_classes
            return model
        return model_for_data(arch, info)

    def _fit(self, name: str, model: nn.Module, objective: Objective, train: TrainSection, describe: dict,
             teacher: nn.Module | None = None) -> nn.Module:
        """Train ``model`` in its own run folder, or load it when that run is complete."""

        def evaluate(m: nn.Module) -> dict:
            row = {"test_acc": self._acc(m)}
            if isinstance(objective, DivQATLoss):
                row |= objective.pop_epoch_stats()
            if teacher is not None:
                row["test_kl_to_fp"] = mean_kl_to_float(m, teacher, self.data.test_x)
            return row

        def loader() -> datasets.BatchLoader:
            return datasets.BatchLoader(self.data.train_x, self.data.train_y, train.batch_size, shuffle=True,
                                        augment=self.cfg.data.augment, info=self.data.info, device=self.device,
                                        drop_last=True, seed=self.seed)

        return self._fit_stage(name, model, objective, train, describe, loader, evaluate,
                               extra_state={"stage": name})[0]

    def _train(self, epochs: int, lr: float, warmup: float) -> TrainSection:
        return TrainSection(epochs=epochs, batch_size=self.cfg.fp.batch_size, lr=lr, warmup_epochs=warmup,
                            device=self.cfg.device)

    # ---------------------------------------------------------------- stage 1: victims
    def train_victims(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(self.seed)
        fp = self._fit("fp32", self._model(cfg.model.arch), CrossEntropy(),
                       self._train(cfg.fp.epochs, cfg.fp.lr, 0.5), {})
        self.models["fp32"] = fp
        info = {"fp32": {"kind": "float", "backend": "", "alpha": 0.0, "kl_to_fp": 0.0}}
        qat_train = self._train(cfg.qat.epochs, cfg.qat.lr, 0.0)
        for backend in cfg.qat.backends:
            torch.manual_seed(self.seed)
            q = quantize(fp, QuantConfig(cfg.qat.bits, cfg.qat.bits, backend=backend))
            name = f"qat-{backend}"
            self.models[name] = self._fit(name, q, CrossEntropy(), qat_train, {"backend": backend, **QAT_EDGES},
                                          teacher=fp)
            info[name] = {"kind": "qat", "backend": backend, "alpha": 0.0}
        d = cfg.divqat
        div_train = self._train(d.epochs, d.lr, 0.0)
        for alpha in tqdm(d.alphas, desc="DivQAT alphas", disable=not self.progress, leave=False):
            torch.manual_seed(self.seed)
            q = quantize(fp, QuantConfig(cfg.qat.bits, cfg.qat.bits, backend=d.backend))
            name = f"divqat-{alpha_tag(alpha)}-{d.backend}"
            # the same collapse check and threshold in training (vs the teacher) and after it (vs QAT)
            objective = DivQATLoss(fp, alpha, teacher_floor=d.teacher_floor, max_acc_drop=d.max_acc_drop)
            self.models[name] = self._fit(name, q, objective, div_train, {"backend": d.backend, **QAT_EDGES}, teacher=fp)
            info[name] = {"kind": "divqat", "backend": d.backend, "alpha": alpha}
        for name, meta in info.items():
            clean = accuracy_and_tie_rate(self.models[name], self.data.test_x, self.data.test_y, 512, self.device)
            meta["test_acc"], meta["tie_rate"] = clean["acc"], clean["tie_rate"]
            if name != "fp32":
                meta["kl_to_fp"] = mean_kl_to_float(self.models[name], fp, self.data.test_x)
        for name, meta in info.items():
            if meta["kind"] == "divqat":
                check_divqat_accuracy(meta["test_acc"], info[f"qat-{meta['backend']}"]["test_acc"],
                                      alpha=meta["alpha"], max_drop=d.max_acc_drop,
                                      where=str(self.root / "models" / name))
        self._write_json("victims.json", info)
        return info

    # ---------------------------------------------------------------- stage 2: defenses
    def calibrate(self) -> dict:
        done = self._json("defenses.json")
        if done is not None:
            return done
        cfg, dc = self.cfg, self.cfg.defense
        fixed = {"rs": {"gamma": dc.rs_gamma}, "dcp": {"gamma": dc.dcp_gamma, "nu": dc.dcp_nu}}
        out: dict = {}
        for name in victim_names(cfg):
            model = self.models[name]
            probs_val = torch.softmax(predict_logits(model, self.data.val_x, 512, self.device), dim=1)
            out[name] = {}
            for defense in dc.names:
                if defense == "none":
                    params, l1 = {}, 0.0
                else:
                    params, l1 = calibrate_defense(defense, probs_val, dc.l1_budget, fixed=fixed[defense])
                victim = Victim(model, defense=self._defense(defense, params), budget=0)
                out[name][defense] = {"params": params, "l1_val": l1,
                                      "l1_test": victim.mean_l1(self.data.test_x),
                                      "defender_acc": victim.accuracy(self.data.test_x, self.data.test_y)}
                message = defense_accuracy_warning(f"{defense} on victim {name}", out[name]["none"]["defender_acc"],
                                                   out[name][defense]["defender_acc"])
                if message:  # also listed in results.md (defense_warnings)
                    warnings.warn(message, DefenseAccuracyWarning, stacklevel=2)
        self._write_json("defenses.json", out)
        return out

    @staticmethod
    def _defense(name: str, params: dict):
        return None if name == "none" else make_defense(name, **params)

    # ---------------------------------------------------------------- stage 3: attacks
    def attack_cell(self, victim_name: str, defense: str, attack: str, params: dict) -> dict:
        """One attack on one defended victim with a fresh budget and a fresh clone."""
        cfg, data = self.cfg, self.data
        cell_seed = hash_seed(self.seed, victim_name, defense, attack)
        torch.manual_seed(cell_seed)
        clone = self._model(cfg.model.clone_arch or cfg.model.arch).to(self.device)
        eval_data = (data.test_x, data.test_y)
        k = cfg.knockoff
        fit_args = dict(epochs=k.epochs, batch_size=k.batch_size, optimizer=k.optimizer, lr=k.lr,
                        momentum=k.momentum, progress=self.progress, seed=cell_seed)
        budget = {"dfme": cfg.dfme.queries, "maze": cfg.maze.queries}.get(attack, k.queries)
        victim = Victim(self.models[victim_name], defense=self._defense(defense, params),
                        output="top1" if attack == "knockoff-hard" else "probs", budget=budget)
        t0 = time.perf_counter()
        if attack in ("knockoff", "knockoff-hard"):
            if k.queries > len(data.transfer):
                raise ConfigError(f"knockoff.queries={k.queries} exceeds the transfer set ({len(data.transfer)} "
                                  "images); lower it or raise data.attacker_fraction / data.transfer_subset")
            result = KnockoffNets(victim, clone, sampling=k.sampling, hard_labels=attack == "knockoff-hard",
                                  **fit_args).run(data.transfer, num_queries=k.queries, eval_data=eval_data)
        elif attack == "noise":
            result = random_noise_floor(victim, clone, num_queries=k.queries, image_shape=data.image_shape,
                                        eval_data=eval_data, **fit_args)
        else:
            z = cfg.dfme if attack == "dfme" else cfg.maze
            kwargs = dict(image_shape=data.image_shape, batch_size=z.batch_size, num_directions=z.num_directions,
                          clone_steps=z.clone_steps, lr_clone=z.lr_clone, lr_generator=z.lr_generator,
                          progress=self.progress, seed=cell_seed)
            if attack == "maze":
                kwargs["replay_steps"] = cfg.maze.replay_steps
            cls = DFME if attack == "dfme" else MAZE
            kwargs["latent_dim"] = z.latent_dim
            kwargs["generator"] = Generator(data.image_shape, z.latent_dim, z.generator_width)
            result = cls(victim, clone, **kwargs).run(num_queries=z.queries, eval_data=eval_data,
                                                      eval_every=z.eval_every)
        return {
            "defender_acc": victim.accuracy(data.test_x, data.test_y),
            "clone_acc": clone_accuracy(clone, data.test_x, data.test_y),
            "agreement": agreement(clone, victim, data.test_x),
            "l1": victim.mean_l1(data.test_x),
            "queries_used": result.queries_used,
            "victim_ledger_total": sum(victim.ledger.values()),
            "ledger": victim.ledger,
            "budget": budget,
            "stopped_early": result.stopped_early,
            "history": [[q, a] for q, a in result.history],
            "seconds": time.perf_counter() - t0,
        }

    def attacks(self, defenses: dict) -> dict:
        cells = self._json("cells.json") or {}
        plan = [c for c in cell_plan(self.cfg) if "/".join(c) not in cells]
        for victim_name, defense, attack in tqdm(plan, desc=f"attacks (seed {self.seed})",
                                                 disable=not self.progress):
            params = defenses[victim_name][defense]["params"]
            cells["/".join((victim_name, defense, attack))] = self.attack_cell(victim_name, defense, attack, params)
            self._write_json("cells.json", cells)  # after every cell: a crash loses at most one
        return cells

    # ---------------------------------------------------------------- all
    def run(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        victims = self._timed("train_victims", self.train_victims)
        defenses = self._timed("calibrate_defenses", self.calibrate)
        cells = self._timed("attacks", lambda: self.attacks(defenses))
        result = {"seed": self.seed, "splits": self.data.split_sizes, "victims": victims, "defenses": defenses,
                  "cells": _nest(cells), "stage_seconds_total": self._json("timings.json")}
        self._write_json("results.json", result)
        return result


def hash_seed(seed: int, *parts: str) -> int:
    """A stable per-cell seed (Python's ``hash`` of strings changes between processes)."""
    value = seed * 1_000_003
    for char in "/".join(parts):
        value = (value * 31 + ord(char)) % (2**31 - 1)
    return value


def _nest(cells: dict) -> dict:
    """``{"v/d/a": row}`` -> ``{v: {d: {a: row}}}``."""
    out: dict = {}
    for key, row in cells.items():
        victim, defense, attack = key.split("/")
        out.setdefault(victim, {}).setdefault(defense, {})[attack] = row
    return out


# --------------------------------------------------------------------------------------------------
# Aggregation over seeds, Markdown, plots
# --------------------------------------------------------------------------------------------------

_NUMERIC = ("defender_acc", "clone_acc", "agreement", "l1", "queries_used", "victim_ledger_total", "seconds")


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of victims, defenses and cells (histories kept per seed)."""
    first = per_seed[0]
    victims = {name: {k: (mean_std([r["victims"][name][k] for r in per_seed])
                          if k in ("test_acc", "tie_rate", "kl_to_fp")
                          else v) for k, v in meta.items()} for name, meta in first["victims"].items()}
    defenses = {v: {d: {"params": [r["defenses"][v][d]["params"] for r in per_seed],
                        **{k: mean_std([r["defenses"][v][d][k] for r in per_seed])
                           for k in ("l1_val", "l1_test", "defender_acc")}}
                    for d in per_d} for v, per_d in first["defenses"].items()}
    cells: dict = {}
    for v, per_d in first["cells"].items():
        for d, per_a in per_d.items():
            for a in per_a:
                rows = [r["cells"][v][d][a] for r in per_seed]
                cell = {k: mean_std([row[k] for row in rows]) for k in _NUMERIC}
                cell["ledger_matches_queries"] = all(row["victim_ledger_total"] == row["queries_used"] for row in rows)
                cell["stopped_early"] = any(row["stopped_early"] for row in rows)
                cell["history"] = [row["history"] for row in rows]
                cells.setdefault(v, {}).setdefault(d, {})[a] = cell
    return {"victims": victims, "defenses": defenses, "cells": cells}


def _pct(cell: dict | None, seeds: int, signed: bool = False) -> str:
    if cell is None or math.isnan(cell["mean"]):
        return "-"
    text = f"{100 * cell['mean']:+.1f}" if signed else f"{100 * cell['mean']:.1f}"
    return text + (f" ± {100 * cell['std']:.1f}" if seeds > 1 else "")


def error_gains(cfg: StudyConfig, agg: dict) -> dict:
    """Adversary error gain of each DivQAT victim over QAT of the same backend, per defense and attack:
    ``(1 - clone_acc_DivQAT) - (1 - clone_acc_QAT) = clone_acc_QAT - clone_acc_DivQAT`` (seed means)."""
    cells, out = agg["cells"], {}
    base = f"qat-{cfg.divqat.backend}"
    for name in victim_names(cfg):
        if not name.startswith("divqat-"):
            continue
        for defense, per_a in cells.get(name, {}).items():
            for attack, cell in per_a.items():
                ref = cells.get(base, {}).get(defense, {}).get(attack)
                if ref is not None:
                    gain = ref["clone_acc"]["mean"] - cell["clone_acc"]["mean"]
                    out.setdefault(name, {}).setdefault(defense, {})[attack] = gain
    return out


def defense_warnings(cfg: StudyConfig, defenses: dict) -> list[str]:
    """One line per (victim, defense) whose mean test defender accuracy is below half the undefended
    victim's (:func:`defense_accuracy_warning`), from the seed-aggregated ``defenses`` table."""
    out = []
    for name in victim_names(cfg):
        for defense in cfg.defense.names:
            message = defense_accuracy_warning(f"{defense} on victim {name}",
                                               defenses[name]["none"]["defender_acc"]["mean"],
                                               defenses[name][defense]["defender_acc"]["mean"])
            if message:
                out.append(message)
    return out


def results_markdown(cfg: StudyConfig, agg: dict, gains: dict, seeds: int, seconds: float, splits: dict,
                     transfer: str) -> str:
    v_info, defenses, cells = agg["victims"], agg["defenses"], agg["cells"]
    attacks = [a for a in cfg.attack.names]
    lines = [
        f"# DivQAT extraction study: {cfg.name}",
        "",
        f"{cfg.data.name}, {cfg.model.arch} (width {cfg.model.width}) victims at {cfg.qat.bits} bits, seeds "
        f"{cfg.seeds}{' (mean ± std)' if seeds > 1 else ''}; splits per seed: {splits}. Compute time of all "
        f"stages (summed over calls and seeds): {seconds / 60:.1f} min. Accuracies in %.",
        "",
        f"**Budgets**: KnockoffNets {cfg.knockoff.queries} queries (transfer set: {transfer}; "
        f"{cfg.knockoff.epochs} clone epochs), noise floor the same, DFME {cfg.dfme.queries}, MAZE "
        f"{cfg.maze.queries} queries. The papers use {PAPER_BUDGETS}"
        + (": **these budgets are far below the papers'**, so DFME/MAZE clones stay weak and differences "
           "between victims are small and noisy." if cfg.dfme.queries < 1_000_000 else "."),
        "",
        "## Victims: accuracy and the mechanism",
        "",
        "Mean KL(f_q || f_fp) on test images: how far each quantized victim's probabilities are from the "
        "float model's (DivQAT's mechanism; plain QAT should be near 0).",
        "",
        "Tie rate: share of test images whose top-1 logit is tied (decided by argmax's lowest index, not "
        "by the model); the input quantizer and the logits stay 8-bit at every body width.",
        "",
        "| victim | backend | alpha | test acc | tie rate | mean KL(f_q \\|\\| f_fp) |",
        "|---|---|---|---|---|---|",
    ]
    for name, meta in v_info.items():
        kl = meta["kl_to_fp"]
        kl_text = f"{kl['mean']:.4f}" + (f" ± {kl['std']:.4f}" if seeds > 1 else "")
        lines.append(f"| {name} | {meta['backend'] or '-'} | {meta['alpha'] or '-'} | "
                     f"{_pct(meta['test_acc'], seeds)} | {_pct(meta['tie_rate'], seeds)} | {kl_text} |")
    lines += [
        "",
        f"## Extraction: victim x defense (l1 <= {cfg.defense.l1_budget} on validation) x attack",
        "",
        f"Clone accuracy (lower is better for the defender); for DivQAT rows, in brackets: adversary error "
        f"gain over QAT-{cfg.divqat.backend} with the same defense and attack, in points (positive = DivQAT "
        "helps). `-` = cell not run (hard-label KnockoffNets and the noise floor run with "
        f"{cfg.attack.label_defenses} only).",
        "",
        "| victim | defense | defender acc | l1 (test) | " + " | ".join(ATTACK_LABELS[a] for a in attacks) + " |",
        "|---|---|---|---|" + "---|" * len(attacks),
    ]
    for name in victim_names(cfg):
        for defense in cfg.defense.names:
            row = cells.get(name, {}).get(defense, {})
            dmeta = defenses[name][defense]
            parts = []
            for a in attacks:
                cell = row.get(a)
                text = _pct(cell["clone_acc"], seeds) if cell else "-"
                gain = gains.get(name, {}).get(defense, {}).get(a)
                if cell and gain is not None:
                    text += f" ({100 * gain:+.1f})"
                parts.append(text)
            lines.append(f"| {_label(name, v_info)} | {defense} | {_pct(dmeta['defender_acc'], seeds)} | "
                         f"{dmeta['l1_test']['mean']:.3f} | " + " | ".join(parts) + " |")
    warned = defense_warnings(cfg, defenses)
    if warned:
        lines += ["", "**Warning**: " + " ".join(f"{w}." for w in warned)]
    ledger_ok = all(c["ledger_matches_queries"] for per_d in cells.values() for per_a in per_d.values()
                    for c in per_a.values())
    mean_gain = {a: [g[a] for per_d in gains.values() for g in per_d.values() if a in g] for a in attacks}
    lines += ["", "Mean adversary error gain of DivQAT over QAT (all alphas and defenses), in points: "
              + ", ".join(f"{ATTACK_LABELS[a]} {100 * sum(v) / len(v):+.1f}" for a, v in mean_gain.items() if v)
              + ".", "",
              f"Query ledger equals the queries each attack reports in every cell: {'yes' if ledger_ok else 'NO'}. "
              "Agreement (clone = victim label), l1 and per-seed histories are in results.json.", "",
              "Figures: defender_vs_clone.png (defender vs clone accuracy per victim), clone_vs_queries.png.", ""]
    return "\n".join(lines)


def _label(name: str, v_info: dict) -> str:
    meta = v_info[name]
    if meta["kind"] == "divqat":
        return f"DivQAT(α={meta['alpha']:g}, {meta['backend']})"
    if meta["kind"] == "qat":
        return f"QAT ({meta['backend']})"
    return "float"


def _plots(cfg: StudyConfig, agg: dict, root: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v_info, defenses, cells = agg["victims"], agg["defenses"], agg["cells"]
    attacks = [a for a in cfg.attack.names if a != "noise"]
    markers = {"none": "o", "rs": "s", "dcp": "^"}
    fig = Figure(figsize=(3.6 * max(1, len(attacks)), 3.4))
    for i, attack in enumerate(attacks):
        ax = fig.add_subplot(1, max(1, len(attacks)), i + 1)
        for defense in cfg.defense.names:
            xs, ys, labels = [], [], []
            for name in victim_names(cfg):
                cell = cells.get(name, {}).get(defense, {}).get(attack)
                if cell is None:
                    continue
                xs.append(100 * cell["clone_acc"]["mean"])
                ys.append(100 * defenses[name][defense]["defender_acc"]["mean"])
                labels.append("QAT-" + name[4:10] if v_info[name]["kind"] != "divqat" else f"α={v_info[name]['alpha']:g}")
            if xs:
                ax.scatter(xs, ys, marker=markers.get(defense, "o"), label=defense)
                for x, y, text in zip(xs, ys, labels, strict=True):
                    ax.annotate(text, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("clone accuracy (%)")
        ax.set_ylabel("defender accuracy (%)")
        ax.set_title(ATTACK_LABELS[attack], fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(root / "defender_vs_clone.png"))

    fig = Figure(figsize=(3.6 * max(1, len(attacks)), 3.4))
    for i, attack in enumerate(attacks):
        ax = fig.add_subplot(1, max(1, len(attacks)), i + 1)
        for name in victim_names(cfg):
            cell = cells.get(name, {}).get("none", {}).get(attack)
            if cell is None:
                continue
            points = [(q, a) for q, a in cell["history"][0] if a is not None]
            if points:
                ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker=".", label=_label(name, v_info))
        ax.set_xlabel("queries")
        ax.set_ylabel("clone accuracy (%)")
        ax.set_title(f"{ATTACK_LABELS[attack]} (no defense, seed {cfg.seeds[0]})", fontsize=9)
        ax.legend(fontsize=5)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(root / "clone_vs_queries.png"))


def run_study(cfg: StudyConfig, executor=None) -> dict:
    """Run (or resume) every seed of the study; write ``results.json``, ``results.md`` and plots."""
    if executor is not None and executor.name != "local":
        raise ConfigError("this study does not run on the study engine yet: use --executor local")
    root, run = open_study(cfg)
    t0 = time.perf_counter()
    per_seed, transfer = [], ""
    for seed in tqdm(cfg.seeds, desc="seeds", disable=not cfg.progress or len(cfg.seeds) == 1):
        study = DivQATStudy(cfg, root / f"seed-{seed}", seed)
        transfer = study.data.transfer_name
        per_seed.append(study.run())
    agg = aggregate(per_seed)
    gains = error_gains(cfg, agg)
    compute = sum(sum(r["stage_seconds_total"].values()) for r in per_seed)
    results = {"complete": True, "name": cfg.name, "seeds": cfg.seeds, **agg, "error_gain_over_qat": gains,
               "splits": per_seed[0]["splits"], "transfer_set": transfer,
               "per_seed_stage_seconds": {str(r["seed"]): r["stage_seconds_total"] for r in per_seed},
               "wall_seconds_this_call": time.perf_counter() - t0, "environment": environment(cfg.device)}
    run.write_json("results.json", results)
    run.write_text("results.md", results_markdown(cfg, agg, gains, len(cfg.seeds), compute,
                                                  per_seed[0]["splits"], transfer))
    _plots(cfg, agg, root)
    return results


__all__ = ["ATTACKS", "DEFENSES", "PRESETS", "DivQATStudy", "StudyConfig", "aggregate", "cell_plan",
           "error_gains", "load_study_config", "preset_path", "run_study", "victim_names"]
