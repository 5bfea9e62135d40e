"""What the studies share: config loading (via :mod:`qrobust.config`) and TOML-safe config sections."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust.config import load_dataclass_config, preset_path
from qrobust.registry import DATASETS, MODELS
from qrobust.runs import DATA_LOCATION_KEYS, RunDir, atomic_write_bytes, environment
from qrobust.train.loop import fit, resolve_device

PRESETS = ("quick", "full", "paper")


def load_study(config: Any, study: str, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults (the dataclass ``config``) < TOML file < ``key=value`` overrides, then ``validate()``."""
    return load_dataclass_config(config, path, overrides)


def study_preset(study: str, preset: str) -> Path:
    """``configs/<study>-<preset>.toml`` in the working directory, else in the source checkout."""
    return preset_path(study, preset, PRESETS)


def flat_section(values: dict) -> dict:
    """A dict TOML can hold in one section (run folders compare configs after a TOML round trip)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = json.dumps(value, sort_keys=True)
    return out


@dataclass
class StudyBase:
    """The settings every study has; a study's ``StudyConfig`` adds its own sections."""

    name: str = "study"
    out_root: str = "runs"
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch threads; 0 = leave as is (OMP_NUM_THREADS)
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def study_toml(cfg: StudyBase) -> dict:
    """The config as one-level TOML sections (what RunDir stores and compares on re-runs)."""
    values = cfg.to_dict()
    out = {k: v for k, v in values.items() if not isinstance(v, dict)}
    out |= {k: flat_section(v) for k, v in values.items() if isinstance(v, dict)}
    for key in ("progress", "threads"):  # how it runs, not what: a re-run may change them
        out.pop(key, None)
    return out


# What a QAT stage's run folder records about its edges: the input quantizer and the logits stay 8-bit at
# every body width (QuantConfig.edge_bits, issue 10). Folders trained before that lack the key and are
# refused rather than resumed with another quantizer layout.
QAT_EDGES = {"edge_bits": 8}


def act_range_tag(act_range: str) -> dict:
    """What a QAT stage's run folder records about activation ranges: nothing for the default ``ema``,
    so folders written before the setting existed stay valid."""
    return {} if act_range == "ema" else {"act_range": act_range}


def check_names(cfg: Any) -> None:
    """ConfigError for an unknown data set, architecture or device in a study config, before any folder
    is made (the study itself checks the rest when it loads its data)."""
    data, model = getattr(cfg, "data", None), getattr(cfg, "model", None)
    if data is not None and hasattr(data, "name"):
        DATASETS.get(str(data.name).strip().lower().replace("_", "-"))
    for key in ("arch", "clone_arch"):
        if model is not None and getattr(model, key, ""):
            MODELS.get(getattr(model, key))
    resolve_device(cfg.device)


def open_study(cfg: StudyBase) -> tuple[Path, RunDir]:
    """Apply ``threads`` and open (or resume) the study's top-level run folder ``out_root/name``."""
    check_names(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    root = Path(cfg.out_root) / cfg.name
    defaults = study_toml(type(cfg)())  # settings added since a folder was written resume at their defaults
    # ... but not across a change of what the quantized models are: a folder without this key holds models
    # whose input and logits followed the body's width, and its stage files would be reused.
    config = study_toml(cfg) | {"quant_edges": QAT_EDGES["edge_bits"]}
    where = ("name", "out_root", *DATA_LOCATION_KEYS)  # where the study and its data are, not what it computes
    return root, RunDir(root, config, meta=environment(cfg.device), defaults=defaults, ignore=where)


_LOOP_KEYS = ("epoch", "train_loss", "train_acc", "lr", "epoch_seconds")  # what fit's rows hold besides evaluate's


class SeedStudy:
    """What every per-seed study class shares: stage JSON files in ``root`` and one run folder per
    trained model (``root/models/<stage>``) whose stored config says what was trained."""

    def __init__(self, cfg: Any, root: str | Path, seed: int):
        self.cfg, self.root, self.seed = cfg, Path(root), seed
        self.device = resolve_device(cfg.device)
        self.progress = cfg.progress
        self.models: dict[str, Any] = {}
        self.timings: dict[str, float] = {}  # seconds per stage in this call

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        """Run a stage; its seconds add up in ``timings.json`` over calls (a resumed stage adds little)."""
        t0 = time.perf_counter()
        out = fn()
        self.timings[stage] = time.perf_counter() - t0
        total = self._json("timings.json") or {}
        total[stage] = total.get(stage, 0.0) + self.timings[stage]
        self._write_json("timings.json", total)
        return out

    def _json(self, name: str) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def _write_json(self, name: str, value: Any) -> None:
        atomic_write_bytes(self.root / name, (json.dumps(value, indent=2) + "\n").encode())

    def _fit_stage(self, name: str, model: nn.Module, objective: Any, train: Any, describe: dict,
                   loader: Callable[[], Any], evaluate: Callable[[nn.Module], dict],
                   extra_state: dict | None = None) -> tuple[nn.Module, dict]:
        """Train ``model`` in its own run folder (:meth:`_stage_run`) with the one training loop, or load
        it when that run is complete. Returns the model in eval mode and the run's ``results.json``:
        ``complete``, the last epoch's ``evaluate`` metrics and the training seconds."""
        run = self._stage_run(name, objective, train, describe)
        done = run.read_json("results.json")
        if done is not None and done.get("complete"):
            model.load_state_dict(run.load_checkpoint()["model"])
            return model.to(self.device).eval(), done
        t0 = time.perf_counter()
        rows = fit(model, loader(), objective, train, run=run, evaluate=evaluate, device=self.device,
                   progress=self.progress, extra_state=extra_state)
        result = {"complete": True, **{k: v for k, v in rows[-1].items() if k not in _LOOP_KEYS},
                  "train_seconds_this_call": time.perf_counter() - t0,
                  "train_seconds_total": sum(r["epoch_seconds"] for r in rows)}
        run.write_json("results.json", result)
        return model.eval(), result

    def _stage_run(self, name: str, objective: Any, train: Any, describe: dict) -> RunDir:
        """The run folder of stage ``name`` (created, or checked to hold the same run)."""
        return RunDir(self.root / "models" / name, {
            "stage": name, "seed": self.seed, "model": flat_section(dataclasses.asdict(self.cfg.model)),
            "data": flat_section(dataclasses.asdict(self.cfg.data)), "train": flat_section(dataclasses.asdict(train)),
            "objective": flat_section(objective.config() | describe),
        }, meta=environment(str(self.device)), ignore=DATA_LOCATION_KEYS)


# --------------------------------------------------------------------------------------------------
# Aggregation over seeds (one implementation for every study)
# --------------------------------------------------------------------------------------------------


def mean_std(values: list[Any]) -> dict:
    """``{"mean", "std", "n"}`` over the finite values: sample std (n - 1), 0 for one value, NaN for none.

    A seed whose value is NaN (e.g. an ASR with no clean-correct image) is left out of the mean and std;
    ``n`` says how many seeds the cell rests on, so a table can say when it is fewer than asked."""
    good = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not good:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(good) / len(good)
    std = math.sqrt(sum((v - mean) ** 2 for v in good) / (len(good) - 1)) if len(good) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(good)}


def aggregate_seeds(values: list[Any], average_lists: bool = True) -> Any:
    """Per-seed results (same nesting) -> that nesting with every number replaced by :func:`mean_std`.

    Dicts recurse over the first seed's keys (a key missing in some seeds is averaged over the rest);
    lists of equal length recurse element-wise when ``average_lists`` (else the first seed's list is kept,
    as for lists that describe the run rather than measure it); anything else (str, bool, None, lists of
    different lengths) is taken from the first seed."""
    first = values[0]
    if isinstance(first, dict):
        return {k: aggregate_seeds([v[k] for v in values if k in v], average_lists) for k in first}
    if (isinstance(first, list) and average_lists and all(isinstance(v, list) for v in values)
            and len({len(v) for v in values}) == 1):
        return [aggregate_seeds([v[i] for v in values], average_lists) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return mean_std(values)
    return first


def is_stat(cell: Any) -> bool:
    """True for a :func:`mean_std` leaf."""
    return isinstance(cell, dict) and "mean" in cell and "std" in cell
