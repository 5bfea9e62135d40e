"""Run folders: what ran (resolved config + seed, git commit, torch version, device), per-epoch metrics,
final results and checkpoints, all written atomically (temp file + ``os.replace``) so a crash never
leaves a half-written file. Re-running the same config into the same folder resumes it; a folder that
holds a different run is refused rather than overwritten.

Layout::

    runs/<name>/config.toml     resolved config, plus a [meta] table
                metrics.jsonl   one JSON row per epoch
                results.json    final numbers (floats)
                checkpoint.pt   model/optimizer/scheduler/RNG state at the last finished epoch
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch

from qrobust.config import to_toml
from qrobust.errors import CheckpointError, RunFolderError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError with long texts
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refused to load {path}: it is not a plain weights file ({first[:200]}). qrobust only loads "
            "tensors and plain containers (torch.load(weights_only=True)); never load untrusted pickles."
        ) from None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict:
    return {
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


class RunDir:
    """One run's folder. ``RunDir(path, config_dict)`` creates it or checks that it holds the same run.

    ``defaults`` (same nesting as ``config``) makes folders written by an older qrobust resumable: a
    setting the stored config lacks counts as equal when the new config holds its default (the value
    that reproduces the old behaviour). Any other difference refuses the folder.
    """

    def __init__(self, path: str | Path, config: dict, meta: dict | None = None, defaults: dict | None = None):
        self.path = Path(path)
        self.config = config
        existing = self.path / "config.toml"
        if existing.exists():
            try:
                previous = tomllib.loads(existing.read_text())
            except tomllib.TOMLDecodeError:
                raise RunFolderError(f"{existing} is corrupt; delete the folder {self.path} or choose another --out") from None
            previous.pop("meta", None)
            if defaults is not None:
                previous = _with_missing_defaults(previous, json.loads(json.dumps(config)), json.loads(json.dumps(defaults)))
            if previous != json.loads(json.dumps(config)):
                diff = _diff(previous, config)
                raise RunFolderError(
                    f"output folder {self.path} already holds a different run (differs in: {diff}); "
                    "choose another --out, or delete the folder to start over"
                )
        elif self.path.exists() and any(self.path.iterdir()):
            raise RunFolderError(
                f"output folder {self.path} is not empty and holds no qrobust run; choose another --out"
            )
        else:
            body = dict(config)
            body["meta"] = meta or {}
            atomic_write_text(existing, to_toml(body))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def file(self, name: str) -> Path:
        return self.path / name

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def save_checkpoint(self, state: dict) -> None:
        atomic_torch_save(state, self.checkpoint_path)

    def load_checkpoint(self) -> dict:
        return safe_load(self.checkpoint_path)

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict) -> None:
        self.write_metrics(self.metrics() + [row])

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")

    def read_json(self, name: str) -> Any:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)


def _with_missing_defaults(stored: dict, config: dict, defaults: dict) -> dict:
    """``stored`` plus each key it lacks whose value in ``config`` equals the default (recursively)."""
    out = dict(stored)
    for key, value in config.items():
        if key not in out:
            if key in defaults and defaults[key] == value:
                out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict) and isinstance(defaults.get(key), dict):
            out[key] = _with_missing_defaults(out[key], value, defaults[key])
    return out


def _diff(a: dict, b: dict, prefix: str = "") -> str:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _diff(va, vb, f"{prefix}{key}.")
            if sub:
                keys.append(sub)
        elif va != vb:
            keys.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return ", ".join(keys)
