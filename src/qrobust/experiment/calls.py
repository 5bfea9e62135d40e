"""Which call of ``qrobust run`` ran which cells, on which CPU and code: ``calls.json`` in a study folder.

A ``full`` study runs for CPU-hours and resumes per cell, often over several sessions, and the machine may
change between them (the same folder resumed on an AVX-512 Intel and an AVX2 AMD gives cells whose
seconds are not comparable, and whose last bits may differ). ``results.json`` records the environment of
the call that wrote it; this log records every call: when it started, its environment (git commit, CPU,
torch, threads) and executor, and each cell it finished with the CPU of the process that ran it (on a
multi-node Ray cluster a worker's, not the driver's). The report says how many cells each CPU ran and
warns when more than one did: compare timings within one CPU only.

The log records provenance, not results: a corrupt ``calls.json`` is reported as corrupt and the study
stops before any work (delete it to go on; the cells are in each seed's ``cells.json``).
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path
from typing import Any

from qrobust.errors import ConfigError
from qrobust.runs import RunDir

CALLS_FILE = "calls.json"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def read_calls(folder: str | Path) -> list[dict]:
    """The calls recorded in study folder ``folder`` (empty for a new folder or one written before the log
    existed); ConfigError naming the fix when the file is corrupt."""
    path = Path(folder) / CALLS_FILE
    if not path.is_file():
        return []
    fix = ("it only records which machine ran which cells; delete it and run the same command again (the "
           "cells are kept in each seed's cells.json)")
    try:
        calls = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is corrupt ({err}): {fix}") from None
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise ConfigError(f"{path} is corrupt (not a list of calls): {fix}")
    return calls


class CallLog:
    """This call's entry in ``calls.json``, appended at the start and rewritten (atomically) as each cell
    finishes, so a crash keeps what the call did."""

    def __init__(self, run: RunDir, environment: dict, executor: str):
        self.run = run
        self.calls = read_calls(run.path)
        self.entry: dict[str, Any] = {"started": _now(), "environment": environment, "executor": executor,
                                      "cells": []}
        self.calls.append(self.entry)
        self._write()

    def cell_done(self, seed: int, key: str, cpu: str) -> None:
        self.entry["cells"].append({"seed": seed, "cell": key, "cpu": cpu})
        self._write()

    def finish(self) -> None:
        self.entry["finished"] = _now()
        self._write()

    def _write(self) -> None:
        self.run.write_json(CALLS_FILE, self.calls)


def cells_by_cpu(calls: list[dict]) -> dict[str, int]:
    """How many cells each CPU ran, over every call (a cell run twice, e.g. after a crash, counts twice)."""
    return dict(Counter(cell.get("cpu", "unknown") for call in calls for cell in call.get("cells", [])))


def calls_summary(calls: list[dict]) -> list[dict]:
    """Per call, for ``results.json``: start, end, environment, executor and cells run (the keys stay in
    ``calls.json``)."""
    return [{k: v for k, v in call.items() if k != "cells"} | {"cells_run": len(call.get("cells", []))}
            for call in calls]


def provenance_markdown(calls: list[dict]) -> str:
    """A short ``## Where it ran`` section for ``results.md``: one line per call and a warning when the
    cells ran on more than one CPU."""
    if not calls:
        return ""
    lines = ["", "## Where it ran", "",
             f"{len(calls)} call(s) of `qrobust run` (`calls.json` lists every cell with the CPU that ran it):", ""]
    for i, call in enumerate(calls, 1):
        env = call.get("environment", {})
        lines.append(f"- call {i}: started {call.get('started', '?')}, {len(call.get('cells', []))} cells, "
                     f"{call.get('executor', '?')} executor, CPU {env.get('cpu', 'unknown')}, commit "
                     f"{env.get('git_commit', 'unknown')}, torch {env.get('torch', '?')}")
    per_cpu = cells_by_cpu(calls)
    if len(per_cpu) > 1:
        counts = ", ".join(f"{cpu}: {n}" for cpu, n in sorted(per_cpu.items()))
        lines += ["", f"**The cells ran on {len(per_cpu)} different CPUs** ({counts}): compare seconds within "
                  "one CPU only; numbers may differ in the last bits between them."]
    return "\n".join(lines) + "\n"
