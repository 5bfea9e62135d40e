"""What the studies share: config loading (via :mod:`qrobust.config`) and TOML-safe config sections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qrobust.config import load_dataclass_config, preset_path

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
