"""What the studies share: config loading (via :mod:`qrobust.config`) and TOML-safe config sections."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qrobust.config import load_dataclass_config, preset_path
from qrobust.runs import RunDir, atomic_write_bytes, environment

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


def open_study(cfg: StudyBase) -> tuple[Path, RunDir]:
    """Apply ``threads`` and open (or resume) the study's top-level run folder ``out_root/name``."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    root = Path(cfg.out_root) / cfg.name
    return root, RunDir(root, study_toml(cfg), meta=environment(cfg.device))


class SeedStudy:
    """What every per-seed study class shares: stage JSON files in ``root`` and one run folder per
    trained model (``root/models/<stage>``) whose stored config says what was trained."""

    cfg: Any
    root: Path
    seed: int
    device: torch.device

    def _json(self, name: str) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def _write_json(self, name: str, value: Any) -> None:
        atomic_write_bytes(self.root / name, (json.dumps(value, indent=2) + "\n").encode())

    def _stage_run(self, name: str, objective: Any, train: Any, describe: dict) -> RunDir:
        """The run folder of stage ``name`` (created, or checked to hold the same run)."""
        return RunDir(self.root / "models" / name, {
            "stage": name, "seed": self.seed, "model": flat_section(dataclasses.asdict(self.cfg.model)),
            "data": flat_section(dataclasses.asdict(self.cfg.data)), "train": flat_section(dataclasses.asdict(train)),
            "objective": flat_section(objective.config() | describe),
        }, meta=environment(str(self.device)))
