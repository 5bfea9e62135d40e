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
import pickle
import pickletools
import platform
import re
import subprocess
import tomllib
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from qrobust.config import to_toml
from qrobust.errors import CheckpointError, RunFolderError
from qrobust.fileio import atomic_write_bytes


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code runs.

    A file torch cannot read is reported as corrupt or truncated; a readable pickle that holds other
    Python objects is refused, naming them. Neither message suggests lifting the protection.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError / EOFError / KeyError ...
        refused = isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)
        names = _pickle_globals(path) if refused else None
        if names is None:  # torch could not read it, or its pickle does not even parse
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated ({_unreadable_reason(path, err)}); delete it (a run "
                "folder then restarts that run from scratch) or copy the file again"
            ) from None
        what = f"the Python object(s) {', '.join(names[:3])}" if names else "pickle instructions beyond plain data"
        raise CheckpointError(
            f"refused to load {path}: it holds {what}, not just tensors and plain containers, and unpickling it "
            "could run code; qrobust loads weights only (re-save them with torch.save(model.state_dict(), path) "
            "or use a checkpoint written by qrobust)"
        ) from None


def _pickle_globals(path: Path) -> list[str] | None:
    """The names a checkpoint's pickle imports (read with ``pickletools``, never executed), or None when
    the file holds no complete pickle (a corrupt or truncated file)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(pkl) if pkl else b""
        else:
            data = path.read_bytes()
        ops = list(pickletools.genops(data))
    except Exception:  # zipfile / pickletools errors: the bytes are damaged
        return None
    names, strings = [], []
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return [n for n in dict.fromkeys(names) if not n.startswith(("torch.", "collections.OrderedDict"))]


def _unreadable_reason(path: Path, err: Exception) -> str:
    """A few words on why torch could not read ``path`` (never torch's own advice)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        return f"{size} bytes, a damaged or incomplete PyTorch zip archive"
    return f"{size} bytes, not a PyTorch checkpoint ({type(err).__name__})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """This machine's CPU model (``/proc/cpuinfo``'s "model name"; else what :mod:`platform` knows): results
    that time or compare machines name the CPU they ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: str) -> dict:
    return {
        "git_commit": git_commit(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


# Files that record how and where a run ran, not what it computed: a folder holding only these (and folders)
# holds no results, so a corrected command may take it over.
PROVENANCE_FILES = ("config.toml", "calls.json")

# Settings that say where a run reads its data, not what it computes: stored in config.toml, not compared,
# so `--data-dir` / `--download` on one call and not on the next resume the same run.
DATA_LOCATION_KEYS = ("data.dir", "data.download")

_STRAY_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what a killed atomic_write_bytes leaves behind


def is_stray_tmp(path: Path) -> bool:
    """True for a temporary file of :func:`atomic_write_bytes` whose write never finished."""
    return path.is_file() and _STRAY_TMP.match(path.name) is not None


def remove_stray_tmp(folder: Path) -> int:
    """Delete the temporary files a killed atomic write left anywhere under ``folder``; returns how many."""
    stray = [p for p in folder.rglob("*.tmp") if is_stray_tmp(p)]
    for p in stray:
        p.unlink(missing_ok=True)
    return len(stray)


def holds_no_results(folder: Path) -> bool:
    """True when nothing under ``folder`` would be lost by starting another run there: it holds only
    folders, :data:`PROVENANCE_FILES` (a start that failed before its first result) and stray temporary files."""
    return all(p.is_dir() or p.name in PROVENANCE_FILES or is_stray_tmp(p) for p in folder.rglob("*"))


class RunDir:
    """One run's folder. ``RunDir(path, config_dict)`` creates it or checks that it holds the same run.

    A folder that holds a different config but no results yet (only ``config.toml``: a start that failed
    before its first checkpoint or result) is taken over by the new config, so the corrected command runs;
    an empty folder, or one holding only the temporary files of a killed write, counts as new. Stray
    temporary files are removed whenever a folder is opened.

    ``defaults`` (same nesting as ``config``) makes folders written by an older qrobust resumable: a
    setting the stored config lacks counts as equal when the new config holds its default (the value
    that reproduces the old behaviour). ``ignore`` lists dotted keys that say how a run reads its inputs,
    not what it computes (e.g. ``data.dir``): they are stored but not compared. Any other difference
    refuses the folder.
    """

    def __init__(self, path: str | Path, config: dict, meta: dict | None = None, defaults: dict | None = None,
                 ignore: tuple[str, ...] = ()):
        self.path = Path(path)
        self.config = config
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"output folder {self.path} is a file, not a folder; choose another --out")
        existing = self.path / "config.toml"
        fresh = not self.path.exists() or holds_no_results(self.path)  # nothing here would be lost
        previous = None
        if existing.is_file():
            try:
                previous = tomllib.loads(existing.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError):
                if not fresh:
                    raise RunFolderError(f"{existing} is corrupt; delete the folder {self.path} or choose another "
                                         "--out") from None
        if previous is not None:
            previous.pop("meta", None)
            if defaults is not None:
                previous = _with_missing_defaults(previous, json.loads(json.dumps(config)),
                                                  json.loads(json.dumps(defaults)))
            previous, compared = without_keys(previous, ignore), without_keys(config, ignore)
            if previous != compared and not fresh:
                raise RunFolderError(
                    f"output folder {self.path} already holds a different run (differs in: "
                    f"{_diff(previous, compared)}); choose another --out, or delete the folder to start over"
                )
            if previous != compared:
                self._write_config(meta)  # another config's start failed before any result: nothing to lose
        elif fresh:
            self._write_config(meta)
        else:
            raise RunFolderError(
                f"output folder {self.path} is not empty and holds no qrobust run; choose another --out"
            )
        remove_stray_tmp(self.path)

    def _write_config(self, meta: dict | None) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"cannot create the output folder {self.path} ({err.strerror or err}); "
                                 "choose another --out") from None
        remove_stray_tmp(self.path)
        body = dict(self.config)
        body["meta"] = meta or {}
        atomic_write_text(self.path / "config.toml", to_toml(body))

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


def without_keys(values: dict, dotted_keys: tuple[str, ...]) -> dict:
    """A copy of nested ``values`` without the ``section.key`` entries named in ``dotted_keys``."""
    out = json.loads(json.dumps(values))
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


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
