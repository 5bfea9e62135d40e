"""The study engine: one implementation of caching, resume, scheduling, timings, progress, seed
aggregation and atomic writes for every study (the specifications are in ``qrobust.studies``).

``run_study(spec, cfg, executor)``:

1. opens (or resumes) the study folder ``out_root/name`` after validating everything;
2. runs every seed's ``prepare`` (data + trained models; finished stages are loaded, not retrained);
3. runs every cell of every seed that has no complete stored record, in any order the executor likes
   (after its own seed's ``prepare``; the Ray executor does not wait for the other seeds),
   writing each record into the seed's ``cells.json`` as it arrives (a crash loses only running cells);
4. writes each seed's ``results.json`` as soon as its last cell is in (a crash or a failing cell of
   another seed keeps it), then the study's ``results.json`` (mean +- std over seeds),
   ``results.md`` and figures.

Every call is logged in the folder's ``calls.json`` (:mod:`.calls`): its environment, and each cell it
finished with the CPU that ran it; ``results.json`` holds the calls (``calls``) and ``results.md`` ends
with where the cells ran, warning when a resumed study mixed CPUs.

Cell records do not hold timings (they differ between runs and executors); seconds per cell and per
stage go to each seed's ``timings.json`` and into the study's ``results.json`` under ``seconds``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qrobust.experiment.calls import CallLog, calls_summary, cells_by_cpu, provenance_markdown
from qrobust.experiment.executors import LocalExecutor
from qrobust.experiment.settings import open_study
from qrobust.experiment.spec import Cell, StudySpec
from qrobust.experiment.stages import CellStore, Stages
from qrobust.runs import cpu_name, environment

# The keys of a study's results.json that say how, where and how fast it ran, not what it computed: two runs
# of one study (local vs Ray, one call vs resumed) differ in these by design.
RUN_KEYS = ("seconds", "executor", "wall_seconds_this_call", "environment", "calls", "cells_by_cpu")

CELL_SECONDS = "cell "  # timings.json: "cell <key>" holds a cell's seconds, "prepare" the seed's preparation


def work_seconds(timings: dict) -> float:
    """Seconds of one seed's work in its ``timings.json``: ``prepare`` and every cell (a spec's own stages
    run inside ``prepare`` and are not added again)."""
    return sum(v for k, v in timings.items() if k == "prepare" or k.startswith(CELL_SECONDS))


def compute_seconds(results: dict) -> float:
    """Seconds of every seed's ``prepare`` and cells (``results["seconds"]``), summed over calls and seeds."""
    return sum(work_seconds(timings) for timings in results.get("seconds", {}).values())


def seed_stages(spec: StudySpec, cfg: Any, root: Path, seed: int) -> Stages:
    """The :class:`Stages` of one seed (``root/seed-<s>``)."""
    return Stages(Path(root) / f"seed-{seed}", seed, device=cfg.device, progress=cfg.progress,
                  describe=spec.describe(cfg))


def _prepare(spec: StudySpec, cfg: Any, root: Path, seed: int) -> tuple[dict, Any]:
    """One seed's context; ``info`` = the spec's summary (JSON) and the stage seconds of this call."""
    stages = seed_stages(spec, cfg, root, seed)
    summary, ctx = stages.timed("prepare", lambda: spec.prepare(cfg, seed, stages))
    return {"summary": summary, "seconds": dict(stages.timings)}, ctx


def _run_cell(spec: StudySpec, cfg: Any, ctx: Any, cell: Cell) -> dict:
    t0 = time.perf_counter()
    record = spec.run_cell(cfg, ctx, cell)
    return {"record": record, "seconds": time.perf_counter() - t0, "cpu": cpu_name()}  # the worker's CPU


class _Bound:
    """``fn(*args, x...)`` with the leading arguments bound; pickles for Ray (unlike a lambda)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self, *rest):
        return self.fn(*self.args, *rest)


def run_study(spec: StudySpec, cfg: Any, executor: Any = None) -> dict:
    """Run (or resume) every seed of study ``spec`` configured by ``cfg``; returns ``results.json``."""
    executor = executor or LocalExecutor()
    root, run = open_study(cfg)
    t0 = time.perf_counter()
    started_with = environment(str(cfg.device))  # the code this call ran (HEAD may move while it runs)
    log = CallLog(run, started_with, executor.name)
    prepared = executor.prepare(_Bound(_prepare, spec, cfg, root), list(cfg.seeds))
    stages = {seed: seed_stages(spec, cfg, root, seed) for seed in cfg.seeds}
    stores = {seed: CellStore(stages[seed]) for seed in cfg.seeds}
    grids = {seed: spec.cells(cfg, seed) for seed in cfg.seeds}
    for grid in grids.values():
        keys = [c.key for c in grid]
        if len(set(keys)) != len(keys):
            raise ValueError(f"study '{spec.name}' declares a cell key twice: {sorted(k for k in keys if keys.count(k) > 1)}")
    work = [(seed, prepared[seed][1], cell) for seed, grid in grids.items() for cell in grid
            if not cell_done(spec, cfg, stores[seed], cell)]
    left = {seed: sum(1 for s, _, _ in work if s == seed) for seed in cfg.seeds}
    finished: dict[int, dict] = {}

    def finish(seed: int) -> None:
        """The seed's ``results.json``, written as soon as its last cell is in (a later crash keeps it)."""
        records = {c.key: stores[seed].get(c.key) for c in grids[seed]}
        finished[seed] = spec.seed_result(cfg, seed, executor.fetch(prepared[seed][0])["summary"], records)
        stages[seed].write_json("results.json", finished[seed])

    bar = tqdm(total=len(work), desc=f"{spec.name}: cells", disable=not cfg.progress or not work, unit="cell")
    try:
        for seed, cell, out in executor.run_cells(_Bound(_run_cell, spec, cfg), work):
            stores[seed].put(cell.key, out["record"])
            stages[seed].add_seconds(CELL_SECONDS + cell.key, out["seconds"])
            log.cell_done(seed, cell.key, out["cpu"])
            left[seed] -= 1
            if left[seed] == 0:
                finish(seed)
            bar.update(1)
            bar.set_postfix_str(f"seed {seed}: {cell.key}"[:60])
    finally:
        bar.close()
    for seed in cfg.seeds:
        if seed not in finished:
            finish(seed)
    log.finish()
    per_seed = [finished[seed] for seed in cfg.seeds]
    results = {"complete": True, "name": cfg.name, "seeds": list(cfg.seeds), **spec.aggregate(cfg, per_seed),
               "seconds": {str(seed): stages[seed].read_json("timings.json") or {} for seed in cfg.seeds},
               "executor": executor.name, "wall_seconds_this_call": time.perf_counter() - t0,
               "environment": started_with, "calls": calls_summary(log.calls),
               "cells_by_cpu": cells_by_cpu(log.calls)}
    run.write_json("results.json", results)
    run.write_text("results.md", spec.report(cfg, results, root) + provenance_markdown(log.calls))
    return results


def cell_done(spec: StudySpec, cfg: Any, store: CellStore | dict, cell: Cell) -> bool:
    """Whether ``cell`` has a complete record in ``store`` (a seed's :class:`CellStore`, or its ``cells.json``)."""
    record = store.get(cell.key)
    return record is not None and spec.cell_complete(cfg, cell, record)
