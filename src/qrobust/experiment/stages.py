"""One seed's folder: cached JSON stages, trained-model stages (resumable run folders) and timings.

Layout of ``<study root>/seed-<s>/``::

    models/<stage>/     one run folder per trained model (config.toml, metrics.jsonl, checkpoint.pt, ...)
    <stage>.json        the stored result of a cached stage (e.g. calibrated defenses)
    cells.json          the grid's records, written after every cell (:class:`CellStore`)
    timings.json        seconds per stage and per cell, summed over calls
    results.json        the seed's result
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust.experiment.settings import flat_section
from qrobust.runs import DATA_LOCATION_KEYS, RunDir, atomic_write_text, environment
from qrobust.train.loop import fit, resolve_device

_LOOP_KEYS = ("epoch", "train_loss", "train_acc", "lr", "epoch_seconds")  # what fit's rows hold besides evaluate's


class Stages:
    """The stages of one seed of a study in folder ``root``.

    ``describe`` (e.g. the study's model and data sections) goes into every trained model's stored
    config, so a run folder says what was trained and a changed setting is never resumed silently.
    """

    def __init__(self, root: str | Path, seed: int, *, device: str = "cpu", progress: bool = False,
                 describe: dict | None = None):
        self.root, self.seed = Path(root), seed
        self.device = resolve_device(device)
        self.progress = progress
        self.describe = {k: flat_section(v) if isinstance(v, dict) else v for k, v in (describe or {}).items()}
        self.timings: dict[str, float] = {}  # seconds per stage in this call
        self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- files
    def read_json(self, name: str) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, name: str, value: Any) -> None:
        atomic_write_text(self.root / name, json.dumps(value, indent=2) + "\n")

    def add_seconds(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to ``name`` in this call's timings and in ``timings.json`` (summed over calls)."""
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        total = self.read_json("timings.json") or {}
        total[name] = total.get(name, 0.0) + seconds
        self.write_json("timings.json", total)

    # ---------------------------------------------------------------- stages
    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` and count its seconds under ``name`` (a resumed stage adds little)."""
        t0 = time.perf_counter()
        out = fn()
        self.add_seconds(name, time.perf_counter() - t0)
        return out

    def json(self, name: str, fn: Callable[[], Any], complete: Callable[[Any], bool] | None = None) -> Any:
        """The stored result of stage ``name`` (``<name>.json``), or ``fn()`` computed, stored and timed.
        A stored result that ``complete`` rejects (e.g. written before a setting existed) is recomputed."""
        done = self.read_json(f"{name}.json")
        if done is not None and (complete is None or complete(done)):
            return done
        out = self.timed(name, fn)
        self.write_json(f"{name}.json", out)
        return out

    def fit(self, name: str, model: nn.Module, objective: Any, train: Any, describe: dict,
            loader: Callable[[], Any], evaluate: Callable[[nn.Module], dict],
            extra_state: dict | None = None) -> tuple[nn.Module, dict]:
        """Train ``model`` in its own run folder ``models/<name>`` with the one training loop, or load it
        when that run is complete. Returns the model in eval mode and the run's ``results.json``:
        ``complete``, the last epoch's ``evaluate`` metrics and the training seconds."""
        run = self.model_run(name, objective, train, describe)
        done = run.read_json("results.json")
        if done is not None and done.get("complete"):
            model.load_state_dict(run.load_checkpoint()["model"])
            # the device and memory format fit() leaves, so that a resumed study computes what an
            # uninterrupted one does (channels-last kernels differ from contiguous ones in the last bits)
            memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
            return model.to(device=self.device, memory_format=memory_format).eval(), done
        t0 = time.perf_counter()
        rows = fit(model, loader(), objective, train, run=run, evaluate=evaluate, device=self.device,
                   progress=self.progress, extra_state=extra_state)
        result = {"complete": True, **{k: v for k, v in rows[-1].items() if k not in _LOOP_KEYS},
                  "train_seconds_this_call": time.perf_counter() - t0,
                  "train_seconds_total": sum(r["epoch_seconds"] for r in rows)}
        run.write_json("results.json", result)
        return model.eval(), result

    def model_run(self, name: str, objective: Any, train: Any, describe: dict) -> RunDir:
        """The run folder of trained-model stage ``name`` (created, or checked to hold the same run)."""
        return RunDir(self.root / "models" / name, {
            "stage": name, "seed": self.seed, **self.describe,
            "train": flat_section(dataclasses.asdict(train)),
            "objective": flat_section(objective.config() | describe),
        }, meta=environment(str(self.device)), ignore=DATA_LOCATION_KEYS)


class CellStore:
    """The records of a seed's grid in ``cells.json`` (``{key: record}``), written after every cell, so a
    crash loses at most the cells that were running."""

    def __init__(self, stages: Stages, name: str = "cells.json"):
        self.stages, self.name = stages, name
        self.records: dict[str, dict] = stages.read_json(name) or {}

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, key: str, record: dict) -> None:
        self.records[key] = record
        self.stages.write_json(self.name, self.records)
