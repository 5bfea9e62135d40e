"""The extraction attacks a cell can run, by name: one entry each in :data:`EXTRACTION_ATTACKS`.

An entry says what the attacker's victim answers (``output``: probabilities or top-1 labels), its
query budget from the settings, whether it runs with the label-only defenses (``attack.label_defenses``)
only, with an output defense only (``defended_only``: the defense-aware attacker), on the costly
zeroth-order list only (``attack.zeroth_order_victims/defenses``), whether it is a reference rather
than an attack (``reference``: the noise floor, kept out of the mean error gain), and ``run(cfg, data, victim, clone, seed) -> ExtractionResult``: the attack on a fresh budgeted
victim and a fresh clone, seeded with the cell's seed. ``data`` is the cell context's data
(:meth:`SeedData.for_cells`: test images/labels, transfer set, image shape). To add an attack: write its
``run`` here, add its entry (and a config section for its settings in config.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from qrobust.attacks.extraction.dfme import DFME, Generator
from qrobust.attacks.extraction.knockoff import KnockoffNets, random_noise_floor
from qrobust.attacks.extraction.maze import MAZE
from qrobust.attacks.extraction.metrics import ExtractionResult
from qrobust.attacks.extraction.victim import Victim


@dataclass(frozen=True)
class ExtractionAttack:
    label: str  # its column in results.md
    run: Callable[..., ExtractionResult]  # (cfg, data, victim, clone, seed)
    budget: Callable[..., int]  # (cfg) -> queries
    output: str = "probs"  # what the victim answers: "probs" or "top1"
    label_only: bool = False  # runs with attack.label_defenses only (the paper's stated limits, the floor)
    defended_only: bool = False  # runs beside an output defense only (not on the undefended victim)
    zeroth_order: bool = False  # DFME / MAZE: restricted by attack.zeroth_order_victims / _defenses
    reference: bool = False  # a reference point, not an attack: no error gain in the mean


def _fit_args(cfg, seed: int) -> dict:
    """KnockoffNets' clone fit (also the noise floor's)."""
    k = cfg.knockoff
    return dict(epochs=k.epochs, batch_size=k.batch_size, optimizer=k.optimizer, lr=k.lr, momentum=k.momentum,
                progress=cfg.progress, seed=seed)


def _eval(data: dict) -> tuple:
    return data["test_x"], data["test_y"]


def run_knockoff(cfg, data: dict, victim: Victim, clone: nn.Module, seed: int, hard: bool = False,
                 defense_aware: bool = False) -> ExtractionResult:
    """KnockoffNets on the transfer set (the attacker split or a named data set).

    With ``knockoff.ladder = L`` the clone-vs-queries curve is measured too: before the main run, L extra
    runs at ``queries / 2**k`` (k = L..1), each on a fresh victim with that budget (same model, defense
    and output; its queries are not in the cell's ledger) and a copy of the fresh clone. The result's
    history is then one point per budget (the ladder's final clone accuracies, then the main run's);
    ``info["ladder"]`` lists the ladder runs' queries."""
    k = cfg.knockoff

    def attack(target: Victim, model: nn.Module, queries: int) -> ExtractionResult:
        aware = {"defense_aware": True, "inversion_steps": k.inversion_steps} if defense_aware else {}
        return KnockoffNets(target, model, sampling=k.sampling, hard_labels=hard, **aware, **_fit_args(cfg, seed)).run(data["transfer"], num_queries=queries, eval_data=_eval(data))

    ladder = []
    for step in range(k.ladder, 0, -1):
        queries = k.queries >> step
        small = Victim(victim.model, defense=victim.defense, output=victim.output, budget=queries, int8=victim.int8)
        ladder.append(attack(small, copy.deepcopy(clone), queries))
    result = attack(victim, clone, k.queries)
    if ladder:
        result.info["ladder"] = [r.queries_used for r in ladder]
        result.history = [(r.queries_used, r.history[-1][1]) for r in [*ladder, result]]
    return result


def run_knockoff_adaptive(cfg, data: dict, victim: Victim, clone: nn.Module, seed: int) -> ExtractionResult:
    """Defense-aware KnockoffNets (Kerckhoffs: the attacker knows the defense; it recovers each answer's
    clean probabilities through it before fitting, :mod:`qrobust.attacks.extraction.defense_aware`)."""
    return run_knockoff(cfg, data, victim, clone, seed, defense_aware=True)


def run_knockoff_hard(cfg, data: dict, victim: Victim, clone: nn.Module, seed: int) -> ExtractionResult:
    """KnockoffNets on top-1 labels (the victim answers ``top1``)."""
    return run_knockoff(cfg, data, victim, clone, seed, hard=True)


def run_noise_floor(cfg, data: dict, victim: Victim, clone: nn.Module, seed: int) -> ExtractionResult:
    """KnockoffNets' fit on as many uniform-noise queries: what a clone learns from no data at all."""
    return random_noise_floor(victim, clone, num_queries=cfg.knockoff.queries, image_shape=data["image_shape"],
                              eval_data=_eval(data), **_fit_args(cfg, seed))


def _zeroth_order(cls: type, z, cfg, data: dict, victim: Victim, clone: nn.Module, seed: int,
                  **extra) -> ExtractionResult:
    """DFME or MAZE with settings ``z`` (``cfg.dfme`` / ``cfg.maze``) and a generator of their width."""
    shape = data["image_shape"]
    kwargs = dict(image_shape=shape, batch_size=z.batch_size, num_directions=z.num_directions,
                  clone_steps=z.clone_steps, lr_clone=z.lr_clone, lr_generator=z.lr_generator,
                  schedule=z.schedule, defense_aware=z.defense_aware, progress=cfg.progress, seed=seed, **extra)
    generator = Generator(shape, z.latent_dim, z.generator_width)  # after the clone: its init draws from the cell seed
    return cls(victim, clone, latent_dim=z.latent_dim, generator=generator, **kwargs).run(
        num_queries=z.queries, eval_data=_eval(data), eval_every=z.eval_every)


def run_dfme(cfg, data: dict, victim: Victim, clone: nn.Module, seed: int) -> ExtractionResult:
    return _zeroth_order(DFME, cfg.dfme, cfg, data, victim, clone, seed)


def run_maze(cfg, data: dict, victim: Victim, clone: nn.Module, seed: int) -> ExtractionResult:
    return _zeroth_order(MAZE, cfg.maze, cfg, data, victim, clone, seed, replay_steps=cfg.maze.replay_steps)


EXTRACTION_ATTACKS: dict[str, ExtractionAttack] = {
    "knockoff": ExtractionAttack("KnockoffNets", run_knockoff, lambda cfg: cfg.knockoff.queries),
    "knockoff-hard": ExtractionAttack("KnockoffNets (hard label)", run_knockoff_hard,
                                      lambda cfg: cfg.knockoff.queries, output="top1", label_only=True),
    "knockoff-adaptive": ExtractionAttack("KnockoffNets (defense-aware)", run_knockoff_adaptive,
                                          lambda cfg: cfg.knockoff.queries, defended_only=True),
    "dfme": ExtractionAttack("DFME", run_dfme, lambda cfg: cfg.dfme.queries, zeroth_order=True),
    "maze": ExtractionAttack("MAZE", run_maze, lambda cfg: cfg.maze.queries, zeroth_order=True),
    "noise": ExtractionAttack("noise floor", run_noise_floor, lambda cfg: cfg.knockoff.queries, label_only=True,
                              reference=True),
}
ATTACK_LABELS = {name: attack.label for name, attack in EXTRACTION_ATTACKS.items()}
