"""Atomic file writes: readers see the old file or the new one, never a mix (temp file + ``os.replace``).

The lowest layer but ``errors``: run folders (:mod:`qrobust.runs`) and figures (:mod:`qrobust.plotstyle`)
both write through it. New files get the permissions a plain ``open(path, "wb")`` would give them
(``0o666`` minus the umask), not the ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _plain_file_mode() -> int:
    umask = os.umask(0)  # reading the umask means setting it; restore at once
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _plain_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["atomic_write_bytes"]
