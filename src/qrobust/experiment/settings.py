"""The settings every study has, how a study config is read (defaults < TOML preset < ``key=value``),
and the study's top-level folder."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qrobust.config import apply_values, load_dataclass_config, preset_path, read_toml
from qrobust.errors import ConfigError
from qrobust.registry import DATASETS, MODELS
from qrobust.runs import DATA_LOCATION_KEYS, RunDir, environment
from qrobust.train.loop import resolve_device

PRESETS = ("smoke", "quick", "full", "paper")

# What a QAT stage's run folder records about its edges: the input quantizer and the logits stay 8-bit at
# every body width (QuantConfig.edge_bits, issue 10). Folders trained before that lack the key and are
# refused rather than resumed with another quantizer layout.
QAT_EDGES = {"edge_bits": 8}


def act_range_tag(act_range: str) -> dict:
    """What a QAT stage's run folder records about activation ranges: nothing for the default ``ema``,
    so folders written before the setting existed stay valid."""
    return {} if act_range == "ema" else {"act_range": act_range}


@dataclass
class DataSection:
    """Where a study's images come from (every study's ``[data]`` starts with these keys)."""

    name: str = "fashion-mnist"
    dir: str = ""  # empty = $QROBUST_DATA or the data set's default place
    download: bool = False
    augment: bool = True


@dataclass
class FloatSection:
    """How a study trains its float model (``[fp]``): Nesterov SGD at peak ``lr``, warm-up then cosine."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05


@dataclass
class StudyBase:
    """The settings every study has; a study's config adds its own sections."""

    name: str = "study"
    out_root: str = "runs"
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch threads; 0 = leave as is (OMP_NUM_THREADS)
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_study(config: Any, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults (the dataclass ``config``) < TOML file < ``key=value`` overrides, then ``validate()``.

    The TOML file may be a study folder's own ``config.toml``: what the engine writes beside the settings
    (``[meta]``, ``quant_edges``) is dropped, so ``--config runs/<study>/config.toml`` repeats that run."""
    if path:
        apply_values(config, settings_only(read_toml(path)))
    return load_dataclass_config(config, None, overrides)


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


def study_toml(cfg: StudyBase) -> dict:
    """The config as one-level TOML sections (what RunDir stores and compares on re-runs)."""
    values = cfg.to_dict()
    out = {k: v for k, v in values.items() if not isinstance(v, dict)}
    out |= {k: flat_section(v) for k, v in values.items() if isinstance(v, dict)}
    for key in ("progress", "threads"):  # how it runs, not what: a re-run may change them
        out.pop(key, None)
    return out


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
    config = study_toml(cfg) | {EDGES_KEY: QAT_EDGES["edge_bits"]}
    where = ("name", "out_root", *DATA_LOCATION_KEYS)  # where the study and its data are, not what it computes
    return root, RunDir(root, config, meta=environment(cfg.device), defaults=defaults, ignore=where)


EDGES_KEY = "quant_edges"  # what open_study stores beside the settings (RunDir adds a [meta] table)


def settings_only(values: dict) -> dict:
    """A study folder's ``config.toml`` values without what the engine adds (``meta``, ``quant_edges``)."""
    return {k: v for k, v in values.items() if k not in ("meta", EDGES_KEY)}


def stored_study_values(root: str | Path) -> dict:
    """The settings a study folder ran with: its ``config.toml`` as written by :func:`open_study`, without
    what the engine adds (``meta``, ``quant_edges``). ConfigError if the file is missing or corrupt."""
    path = Path(root) / "config.toml"
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is corrupt (not UTF-8 TOML); the folder cannot be read") from None
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror or err}); give the folder of a study run") from None
    return settings_only(values)


def stored_study_config(config: Any, root: str | Path) -> Any:
    """``config`` (a study's config dataclass, e.g. its defaults) filled from :func:`stored_study_values`."""
    apply_values(config, stored_study_values(root))
    return config
