"""The DivQAT study's settings (defaults < ``configs/divqat-<preset>.toml`` < ``key=value``), their
validation, and what follows from them alone: the victims and the grid of (victim, defense, attack)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from qrobust.errors import ConfigError
from qrobust.experiment import DataSection, FloatSection, StudyBase, load_study, study_preset
from qrobust.studies.divqat.attacks import EXTRACTION_ATTACKS

ATTACKS = tuple(EXTRACTION_ATTACKS)  # the attacks a cell can run, in table order (attacks.py)
DEFENSES = ("none", "rs", "dcp")


@dataclass
class DataCfg(DataSection):
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
    max_acc_drop: float = 0.15  # larger test-accuracy loss vs plain QAT = collapse -> error (paper alphas)
    # The operating point (issue 12): the paper's is an accuracy cost, not an alpha. Over ``alphas`` +
    # ``search_alphas`` and every epoch checkpoint of each run, the victim with the largest mean
    # KL(f_q || f_fp) on validation images whose validation accuracy is within ``max_acc_cost`` points of
    # plain QAT is attacked as ``divqat-op-<backend>``. search_alphas train without the collapse guard
    # (they are meant to reach it). Empty = no search, no operating-point victim.
    search_alphas: list[float] = field(default_factory=list)
    max_acc_cost: float = 3.66  # percentage points of validation accuracy below plain QAT (the paper's cost)
    # BEYOND THE PAPER: "DivQAT-hinge" rewards each image's KL only up to hinge_cap nats (DivQATLoss.kl_cap),
    # swept over the same alphas and chosen at the same accuracy cost: victim divqat-hinge-op-<backend>.
    hinge_cap: float = 0.0  # 0 = off (needs search_alphas)


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
    # DFME and MAZE are costly: run them on these victims / defenses only (empty = all)
    zeroth_order_victims: list[str] = field(default_factory=list)  # e.g. ["qat-server", "divqat-op-server"]
    zeroth_order_defenses: list[str] = field(default_factory=list)  # e.g. ["none", "dcp"]


@dataclass
class KnockoffCfg:
    queries: int = 10000  # also the noise floor's budget
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    sampling: str = "random"
    inversion_steps: int = 300  # defense-aware KnockoffNets: Adam steps recovering each answer's clean probabilities
    ladder: int = 0  # extra KnockoffNets runs at queries / 2**k, k = ladder..1 (fresh victim and clone): the curve


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
    schedule: str = "multistep"  # lr schedule over the budget's iterations: multistep (DFME) | cosine | none
    eval_every: int = 10  # iterations between clone-accuracy points (clone acc vs queries)
    defense_aware: bool = False  # each answer inverted through the victim's known defense before fitting (Kerckhoffs)


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
    schedule: str = "cosine"  # MAZE's
    eval_every: int = 10
    defense_aware: bool = False  # as dfme.defense_aware


@dataclass
class StudyConfig(StudyBase):
    name: str = "divqat-quick"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    fp: FloatSection = field(default_factory=FloatSection)
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
        for alpha in self.divqat.search_alphas:
            need(math.isfinite(alpha) and alpha > 0, f"divqat.search_alphas must all be > 0, got {alpha!r}")
        need(self.divqat.hinge_cap >= 0 and (self.divqat.hinge_cap == 0 or bool(self.divqat.search_alphas)),
             f"divqat.hinge_cap must be >= 0 (0 = off) and needs divqat.search_alphas, got {self.divqat.hinge_cap}")
        need(0 <= self.divqat.max_acc_cost <= 100,
             f"divqat.max_acc_cost is in accuracy points (0..100, the paper's 3.66), got {self.divqat.max_acc_cost}")
        for key in ("dfme", "maze"):
            schedule = getattr(self, key).schedule
            need(schedule in ("multistep", "cosine", "none"),
                 f"{key}.schedule '{schedule}' is unknown; use multistep, cosine or none")
        need(self.knockoff.ladder >= 0 and self.knockoff.queries >> self.knockoff.ladder >= 1,
             f"knockoff.ladder={self.knockoff.ladder} must be >= 0 and leave >= 1 query at queries / 2**ladder")
        for name in self.attack.zeroth_order_victims:
            need(name in victim_names(self), f"attack.zeroth_order_victims: '{name}' is not a victim of this "
                 f"study; choose from: {', '.join(victim_names(self))}")
        for name in self.attack.zeroth_order_defenses:
            need(name in self.defense.names, f"attack.zeroth_order_defenses: '{name}' is not in defense.names "
                 f"{self.defense.names}")
        for name in self.defense.names + self.attack.label_defenses:
            need(name in DEFENSES, f"unknown defense '{name}'; choose from: {', '.join(DEFENSES)}")
        need("none" in self.defense.names, "defense.names must contain 'none' (the undefended baseline)")
        for name in self.attack.names:
            need(name in ATTACKS, f"unknown attack '{name}' in attack.names; choose from: {', '.join(ATTACKS)}")
        need(self.defense.l1_budget > 0, f"defense.l1_budget must be > 0, got {self.defense.l1_budget}")
        if "convnet" in (self.model.arch, self.model.clone_arch):
            need(self.model.width >= 1, f"model.width must be >= 1, got {self.model.width}")
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
            "maze.generator_width": self.maze.generator_width, "knockoff.inversion_steps": self.knockoff.inversion_steps,
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
    return load_study(StudyConfig(), path, overrides)


def alpha_tag(alpha: float) -> str:
    return f"{alpha:g}"


def victim_names(cfg: StudyConfig) -> list[str]:
    """The attacked victims, in table order: (fp32), QAT per backend, DivQAT per alpha."""
    names = ["fp32"] if cfg.attack.attack_float else []
    names += [f"qat-{b}" for b in cfg.qat.backends]
    names += [f"divqat-{alpha_tag(a)}-{cfg.divqat.backend}" for a in cfg.divqat.alphas]
    if cfg.divqat.search_alphas:
        names.append(operating_point_name(cfg))
        if cfg.divqat.hinge_cap > 0:
            names.append(operating_point_name(cfg, hinge=True))
    return names


def operating_point_name(cfg: StudyConfig, hinge: bool = False) -> str:
    """The attacked DivQAT victim at its operating point (chosen per seed, see ``divqat.max_acc_cost``);
    ``hinge``: the beyond-paper hinge variant's (``divqat.hinge_cap``)."""
    return f"divqat-{'hinge-' if hinge else ''}op-{cfg.divqat.backend}"


def sweep_alphas(cfg: StudyConfig) -> list[float]:
    """Every DivQAT alpha trained: the paper's (``alphas``) then the search's, without repeats, ascending."""
    return sorted(set(cfg.divqat.alphas) | set(cfg.divqat.search_alphas))


def cell_plan(cfg: StudyConfig) -> list[tuple[str, str, str]]:
    """Every (victim, defense, attack) cell the study runs, in table order."""
    cells = []
    for victim in victim_names(cfg):
        for defense in cfg.defense.names:
            for attack in cfg.attack.names:
                spec = EXTRACTION_ATTACKS[attack]
                if spec.label_only and defense not in cfg.attack.label_defenses:
                    continue
                if spec.defended_only and defense == "none":
                    continue
                if spec.zeroth_order and not zeroth_order_runs(cfg, victim, defense):
                    continue
                cells.append((victim, defense, attack))
    return cells


def zeroth_order_runs(cfg: StudyConfig, victim: str, defense: str) -> bool:
    """Whether DFME and MAZE attack this (victim, defense) (``attack.zeroth_order_victims/defenses``)."""
    a = cfg.attack
    return (not a.zeroth_order_victims or victim in a.zeroth_order_victims) and (
        not a.zeroth_order_defenses or defense in a.zeroth_order_defenses)


def transfer_name(cfg: StudyConfig) -> str:
    """What KnockoffNets queries: a named data set, or the attacker split of the victim's data."""
    return cfg.data.transfer or f"{cfg.data.name} (attacker split)"
