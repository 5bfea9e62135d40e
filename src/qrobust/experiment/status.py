"""Where a study folder stands, read without touching it: ``qrobust status <folder>``.

A ``full`` study runs for CPU-hours, often on a cluster, and resumes per stage and per cell. This
reads what the engine has written (``config.toml``, each seed's ``cells.json`` and ``timings.json``,
the ``results.json`` files, ``calls.json``) and says, per seed, which cells are done and which are left,
how much compute the rest needs, and how many cells each CPU ran (a warning when a resumed folder mixes
CPUs: its timings then mix their speeds).

The estimate of what is left: each missing cell costs the mean of the finished cells of its *kind* (the
last part of its key, e.g. ``dfme`` in ``qat-server/none/dfme``), over every seed of this folder; a
kind with no finished cell yet is counted apart (``unmeasured``), never guessed. Seconds are the
engine's per-cell timings (CPU-process wall seconds of each cell, summed over calls), so the estimate
is in the same unit: divide by the workers running in parallel for wall time.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from qrobust.errors import ConfigError
from qrobust.experiment.calls import calls_summary, cells_by_cpu, read_calls
from qrobust.experiment.engine import CELL_SECONDS, cell_done, work_seconds
from qrobust.experiment.spec import StudySpec


def _read_json(path: Path) -> Any:
    """A JSON file written by the engine, None if absent; a corrupt one says so (never a traceback)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is corrupt ({err}); the engine writes it atomically, so it was changed "
                          "by hand or by another program") from None


def kind_of(key: str) -> str:
    """The kind of a cell: the last ``/``-separated part of its key."""
    return key.rsplit("/", 1)[-1]


def study_status(spec: StudySpec, cfg: Any, root: str | Path) -> dict:
    """Per seed: started or not, cells done / left (by kind), stage and cell seconds so far, whether its
    ``results.json`` is written; for the study: the estimated seconds of the cells left."""
    root = Path(root)
    seeds: dict[int, dict] = {}
    per_kind: dict[str, list[float]] = defaultdict(list)
    left_by_seed: dict[int, list[str]] = {}
    for seed in cfg.seeds:
        folder = root / f"seed-{seed}"
        grid = spec.cells(cfg, seed)
        records = (_read_json(folder / "cells.json") or {}) if folder.is_dir() else {}
        timings = (_read_json(folder / "timings.json") or {}) if folder.is_dir() else {}
        finished = [cell_done(spec, cfg, records, c) for c in grid]
        done = [c.key for c, ok in zip(grid, finished, strict=True) if ok]
        left = [c.key for c, ok in zip(grid, finished, strict=True) if not ok]
        for key in done:
            if CELL_SECONDS + key in timings:
                per_kind[kind_of(key)].append(timings[CELL_SECONDS + key])
        left_by_seed[seed] = left
        seeds[seed] = {
            "started": folder.is_dir(),
            "cells": len(grid),
            "done": len(done),
            "left": len(left),
            "left_by_kind": dict(Counter(kind_of(k) for k in left)),
            "seconds_so_far": work_seconds(timings),
            "results_written": (folder / "results.json").is_file(),
        }
    calls = read_calls(root)
    mean_by_kind = {k: statistics.fmean(v) for k, v in per_kind.items()}
    estimate, unmeasured = 0.0, Counter()
    for left in left_by_seed.values():
        for key in left:
            if kind_of(key) in mean_by_kind:
                estimate += mean_by_kind[kind_of(key)]
            else:
                unmeasured[kind_of(key)] += 1
    return {
        "folder": str(root),
        "seeds": seeds,
        "seconds_per_cell_by_kind": mean_by_kind,
        "estimated_seconds_left": estimate,
        "unmeasured_cells_left": dict(unmeasured),
        "complete": (root / "results.json").is_file() and all(s["left"] == 0 for s in seeds.values()),
        "calls": calls_summary(calls),
        "cells_by_cpu": cells_by_cpu(calls),
    }


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def format_status(study: str, status: dict) -> str:
    """``study_status`` as a few lines of text."""
    lines = [f"{status['folder']}: study '{study}', seeds {list(status['seeds'])}"]
    for seed, s in status["seeds"].items():
        if not s["started"]:
            lines.append(f"  seed {seed}: not started ({s['cells']} cells)")
            continue
        left = ", ".join(f"{k} {n}" for k, n in sorted(s["left_by_kind"].items()))
        lines.append(f"  seed {seed}: {s['done']}/{s['cells']} cells done" + (f"; left: {left}" if left else "")
                     + f"; {_hours(s['seconds_so_far'])} of stages and cells so far"
                     + ("; results.json written" if s["results_written"] else ""))
    per_cpu = status["cells_by_cpu"]
    if status["calls"]:
        lines.append(f"calls so far: {len(status['calls'])}; cells run per CPU: "
                     + (", ".join(f"{cpu}: {n}" for cpu, n in sorted(per_cpu.items())) or "none yet"))
    if len(per_cpu) > 1:
        lines.append("warning: the cells ran on more than one CPU (calls.json says which ran where): the time "
                     "left below mixes their speeds, and compare timings within one CPU only")
    if status["complete"]:
        lines.append("complete: results.json and results.md are in the folder")
        return "\n".join(lines)
    estimate = status["estimated_seconds_left"]
    unmeasured = status["unmeasured_cells_left"]
    lines.append(f"left: ~{_hours(estimate)} of cell time (finished cells' mean per kind; divide by the "
                 "workers running in parallel for wall time)"
                 + (f", plus cells of kinds not measured yet: {dict(sorted(unmeasured.items()))}" if unmeasured
                    else ""))
    lines.append("resume or finish: run the same `qrobust run` command again (finished stages and cells are kept)")
    return "\n".join(lines)
