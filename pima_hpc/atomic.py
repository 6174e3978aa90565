"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Write to a temp file beside the target, fsync, rename over it (``os.replace`` is atomic on POSIX
within one file system). Used for checkpoints, metrics, reports and sweep tables alike.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
