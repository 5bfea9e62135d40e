"""What a study declares: its settings, the models it trains, its grid of cells and its report.

A study is a :class:`StudySpec`. The engine (:func:`qrobust.experiment.run_study`) calls, per seed:

1. ``prepare(cfg, seed, stages)`` -> ``(summary, ctx)``: a JSON summary and the context, the seed's data
   and trained models. Trained models are stages (``stages.fit``, each its own resumable run folder),
   other costly set-up is a cached JSON stage (``stages.json``). The context must pickle (it travels
   to Ray workers): tensors, modules, plain data.
2. ``cells(cfg, seed)`` -> the grid: one :class:`Cell` per (model x defense x attack ...) point.
3. ``run_cell(cfg, ctx, cell)`` -> one JSON-able result record. It must depend on nothing but its
   arguments (it seeds its own randomness from ``cell.seed`` and leaves ``ctx`` as it found it), so
   the same grid gives the same records in any order, on any executor.
4. ``seed_result(cfg, seed, summary, records)`` -> the seed's ``results.json`` (records keyed by cell key).

Then ``aggregate(cfg, per_seed)`` (mean +- std over seeds) and ``report(cfg, results, root)`` (Markdown;
may write PNGs into ``root``). The engine owns caching and resume, timings, progress, atomic writes
and the scheduling of cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrobust.experiment.aggregate import aggregate_seeds


def cell_seed(seed: int, *parts: str) -> int:
    """A stable per-cell seed from the study seed and the cell's name (Python's ``hash`` of strings
    changes between processes, so it cannot be used)."""
    value = seed * 1_000_003
    for char in "/".join(parts):
        value = (value * 31 + ord(char)) % (2**31 - 1)
    return value


@dataclass(frozen=True)
class Cell:
    """One point of a study's grid.

    ``key`` names the record (``"qat-server/dcp/dfme"``), ``params`` is what ``run_cell`` needs
    (JSON-able), ``cpus``/``gpus`` what a Ray task of it reserves.
    """

    key: str
    params: dict = field(default_factory=dict)
    cpus: float = 1.0
    gpus: float = 0.0


class StudySpec:
    """Base class of a study specification; subclasses set ``name`` and ``config_cls`` and implement
    :meth:`prepare`, :meth:`cells`, :meth:`run_cell` and :meth:`report`."""

    name: str = ""
    config_cls: type = object
    presets: tuple[str, ...] = ("smoke", "quick", "full", "paper")

    def describe(self, cfg: Any) -> dict:
        """What every trained-model stage records besides its own settings (e.g. the model and data
        sections), so that a changed setting is never resumed silently."""
        return {}

    def prepare(self, cfg: Any, seed: int, stages: Any) -> tuple[dict, Any]:
        """The seed's ``(summary, ctx)``: a JSON-able summary (e.g. the trained models' accuracies, the
        calibrated defenses) that :meth:`seed_result` receives, and the context the cells run on."""
        raise NotImplementedError

    def cells(self, cfg: Any, seed: int) -> list[Cell]:
        """The seed's grid; it follows from the settings alone (the driver may not hold the context)."""
        raise NotImplementedError

    def run_cell(self, cfg: Any, ctx: Any, cell: Cell) -> dict:
        raise NotImplementedError

    def cell_complete(self, cfg: Any, cell: Cell, record: dict) -> bool:
        """Whether a stored record answers everything ``cell`` asks today (e.g. an attack added since
        the record was written makes it incomplete: it is recomputed)."""
        return True

    def seed_result(self, cfg: Any, seed: int, summary: dict, records: dict[str, dict]) -> dict:
        """The seed's ``results.json`` from ``prepare``'s summary and the records in grid order."""
        return {"seed": seed, **summary, "cells": records}

    def aggregate(self, cfg: Any, per_seed: list[dict]) -> dict:
        return {"cells": aggregate_seeds([r["cells"] for r in per_seed])}

    def report(self, cfg: Any, results: dict, root: Path) -> str:
        raise NotImplementedError
