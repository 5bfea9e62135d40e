"""The DivQAT study as a :class:`~qrobust.experiment.StudySpec`: per seed, ``prepare`` trains (or loads)
the victims and calibrates the defenses; the grid is one cell per (victim, defense, attack), each a fresh
budgeted victim and a fresh clone seeded with ``cell_seed(seed, victim, defense, attack)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from qrobust.attacks.extraction.metrics import agreement, clone_accuracy
from qrobust.attacks.extraction.victim import Victim
from qrobust.experiment import Cell, StudySpec, cell_seed, mean_std
from qrobust.experiment import run_study as run_engine
from qrobust.studies.divqat.attacks import EXTRACTION_ATTACKS
from qrobust.studies.divqat.config import StudyConfig, cell_plan, transfer_name, victim_names
from qrobust.studies.divqat.data import SeedData, build_model
from qrobust.studies.divqat.report import error_gains, report
from qrobust.studies.divqat.victims import calibrate_defenses, output_defense, train_victims
from qrobust.train.loop import resolve_device

# What a cell record holds (a stored record without one of these is recomputed).
RECORD_KEYS = ("defender_acc", "clone_acc", "agreement", "l1", "queries_used", "victim_ledger_total", "ledger",
               "budget", "stopped_early", "history", "independent_counts", "counts_agree")
DEFENSE_KEYS = ("l1_val", "l1_test", "defender_acc", "ece", "nll")  # per victim x defense, mean/std over seeds
_NUMERIC = ("defender_acc", "clone_acc", "agreement", "l1", "queries_used", "victim_ledger_total")


@contextmanager
def attacked_cell(cfg: StudyConfig, data: dict, seed: int, model: torch.nn.Module, defense,
                  attack_name: str) -> Iterator[tuple[Victim, torch.nn.Module, object]]:
    """A cell's attack, as the study runs it: under a forked RNG seeded with the cell's ``seed``, a fresh
    clone and a fresh budget, the victim ``model`` answering through ``defense`` with the attack's output;
    yields (victim, clone, attack result) for evaluation inside the same RNG state, which is restored on
    exit. ``DivQATSpec.run_cell`` and ``benchmarks/dcp_answers.py`` (a recording defense) share it."""
    attack = EXTRACTION_ATTACKS[attack_name]
    device = resolve_device(cfg.device)
    cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        clone = build_model(cfg, cfg.model.clone_arch or cfg.model.arch, data["info"]).to(device)
        victim = Victim(model, output=attack.output, budget=attack.budget(cfg), defense=defense)
        yield victim, clone, attack.run(cfg, data, victim, clone, seed)


class DivQATSpec(StudySpec):
    name = "divqat"
    config_cls = StudyConfig

    def describe(self, cfg: StudyConfig) -> dict:
        return {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data)}

    def prepare(self, cfg: StudyConfig, seed: int, stages) -> tuple[dict, dict]:
        """Splits, victims (``victims.json``), calibrated defenses (``defenses.json``, cached); the cells'
        context: the seed, the test/transfer tensors, the attacked victims and their defense parameters."""
        data = SeedData(cfg, seed, stages.device)
        models, victims, operating_point = stages.timed("victims", lambda: train_victims(cfg, stages, data))
        defenses = stages.json("defenses", lambda: calibrate_defenses(cfg, models, data, stages.device),
                               complete=lambda d: set(d) == set(victim_names(cfg)) and all(
                                   "ece" in row for per_d in d.values() for row in per_d.values()))
        summary = {"splits": data.split_sizes, "victims": victims, "defenses": defenses, **operating_point}
        attacked = victim_names(cfg)
        ctx = {"seed": seed, "data": data.for_cells(), "models": {name: models[name] for name in attacked},
               "defense_params": {name: {d: defenses[name][d]["params"] for d in cfg.defense.names}
                                  for name in attacked}}
        return summary, ctx

    def cells(self, cfg: StudyConfig, seed: int) -> list[Cell]:
        gpus = 1.0 if resolve_device(cfg.device).type == "cuda" else 0.0
        return [Cell("/".join(key), {"victim": key[0], "defense": key[1], "attack": key[2]}, gpus=gpus)
                for key in cell_plan(cfg)]

    def run_cell(self, cfg: StudyConfig, ctx: dict, cell: Cell) -> dict:
        """One attack on one defended victim with a fresh budget and a fresh clone: defender accuracy,
        clone accuracy, agreement, l1 (test), queries used, the victim's ledger, clone accuracy vs queries.
        Seeds itself; the global RNG and the context's models are left as found."""
        victim_name, defense, attack_name = cell.params["victim"], cell.params["defense"], cell.params["attack"]
        data = ctx["data"]
        seed = cell_seed(ctx["seed"], victim_name, defense, attack_name)
        answers = output_defense(defense, ctx["defense_params"][victim_name][defense])
        with attacked_cell(cfg, data, seed, ctx["models"][victim_name], answers, attack_name) as (victim, clone, result):
            budget = victim.budget
            test_x, test_y = data["test_x"], data["test_y"]
            return {
                "defender_acc": victim.accuracy(test_x, test_y),
                "clone_acc": clone_accuracy(clone, test_x, test_y),
                "agreement": agreement(clone, victim, test_x),
                "l1": victim.mean_l1(test_x),
                "queries_used": result.queries_used,
                "victim_ledger_total": sum(victim.ledger.values()),
                "ledger": victim.ledger,
                "budget": budget,
                "stopped_early": result.stopped_early,
                "history": [[q, a] for q, a in result.history],
                # counted where the rows are computed, not from the ledger: can disagree with it
                "independent_counts": victim.independent_counts,
                "counts_agree": victim.counts_agree(result.queries_used),
            }

    def cell_complete(self, cfg: StudyConfig, cell: Cell, record: dict) -> bool:
        return all(key in record for key in RECORD_KEYS)

    def seed_result(self, cfg: StudyConfig, seed: int, summary: dict, records: dict[str, dict]) -> dict:
        return {"seed": seed, **summary, "cells": nest(records)}

    def aggregate(self, cfg: StudyConfig, per_seed: list[dict]) -> dict:
        agg = aggregate(per_seed)
        out = {**agg, "error_gain_over_qat": error_gains(cfg, agg), "splits": per_seed[0]["splits"],
               "transfer_set": transfer_name(cfg)}
        for key in ("divqat", "divqat_hinge"):
            if f"{key}_operating_point" in per_seed[0]:
                for part in ("operating_point", "sweep"):
                    out[f"{key}_{part}"] = {r["seed"]: r[f"{key}_{part}"] for r in per_seed}
        return out

    def report(self, cfg: StudyConfig, results: dict, root: Path) -> str:
        return report(cfg, results, root)


SPEC = DivQATSpec()


def run_study(cfg: StudyConfig, executor=None) -> dict:
    """Run (or resume) every seed of the study on ``executor`` (default: this process); writes
    ``results.json``, ``results.md`` and the figures."""
    return run_engine(SPEC, cfg, executor)


def nest(cells: dict) -> dict:
    """``{"v/d/a": row}`` -> ``{v: {d: {a: row}}}``."""
    out: dict = {}
    for key, row in cells.items():
        victim, defense, attack = key.split("/")
        out.setdefault(victim, {}).setdefault(defense, {})[attack] = row
    return out


def _same_or_per_seed(values: list):
    """One value if every seed has it (a victim's kind, backend, the paper's alpha), else the list in seed
    order (the operating point's alpha and epoch are chosen per seed)."""
    return values[0] if all(v == values[0] for v in values) else values


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of victims, defenses and cells (histories kept per seed)."""
    first = per_seed[0]
    victims = {name: {k: (mean_std([r["victims"][name][k] for r in per_seed])
                          if k in ("test_acc", "tie_rate", "kl_to_fp")
                          else _same_or_per_seed([r["victims"][name][k] for r in per_seed]))
                      for k in meta} for name, meta in first["victims"].items()}
    defenses = {v: {d: {"params": [r["defenses"][v][d]["params"] for r in per_seed],
                        **{k: mean_std([r["defenses"][v][d][k] for r in per_seed]) for k in DEFENSE_KEYS}}
                    for d in per_d} for v, per_d in first["defenses"].items()}
    cells: dict = {}
    for v, per_d in first["cells"].items():
        for d, per_a in per_d.items():
            for a in per_a:
                rows = [r["cells"][v][d][a] for r in per_seed]
                cell = {k: mean_std([row[k] for row in rows]) for k in _NUMERIC}
                # independent counts (rows the model computed, rows the defense saw) = ledger = reported
                cell["ledger_matches_queries"] = all(row["counts_agree"] for row in rows)
                cell["stopped_early"] = any(row["stopped_early"] for row in rows)
                cell["history"] = [row["history"] for row in rows]
                cell["clone_acc_per_seed"] = [row["clone_acc"] for row in rows]  # in seed order: paired gains
                cells.setdefault(v, {}).setdefault(d, {})[a] = cell
    return {"victims": victims, "defenses": defenses, "cells": cells}
