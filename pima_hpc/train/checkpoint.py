"""Atomic, rotating checkpoints loaded without arbitrary pickles.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over its final name, so a process killed mid-write never leaves a truncated checkpoint that looks
whole. ``latest.json`` (also replaced atomically) names the newest complete checkpoint; on resume a
corrupt newest checkpoint falls back to the previous good one with a warning, never to a silent
restart from scratch. Loading uses ``torch.load(weights_only=True)``: tensors and plain Python
containers only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from pima_hpc.atomic import atomic_write_bytes, atomic_write_text
from pima_hpc.errors import CheckpointError

log = logging.getLogger(__name__)


# "pretrain": the epochs of train.init=pretrain's pre-training, before the multimodal stage's first checkpoint
STAGE_ORDER = {"pretrain": 0, "multimodal": 1, "crossmodal": 2, "done": 3}


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist", "missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = f"unreadable: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        raise CheckpointError(f"checkpoint {str(path)!r} is {reason}; delete it to fall back to an older one",
                              reason) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, not a pima-hpc "
                              "checkpoint; delete it to fall back to an older one", "not a pima-hpc checkpoint")
    return payload


class CheckpointManager:
    """Checkpoints of one run directory: ``checkpoints/ckpt-<stage>-e<epoch>-s<step>.pt``, the last K kept."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.pointer = self.dir / "latest.json"

    def _history(self) -> list[str]:
        if not self.pointer.is_file():
            return []
        try:
            return list(json.loads(self.pointer.read_text())["history"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{str(self.pointer)!r} is corrupt; delete it (the .pt files stay usable) "
                                  "or remove the run directory to start over") from None

    def save(self, payload: dict, name: str, best: bool = False) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.pt"
        try:
            save_checkpoint(path, payload)
        except OSError as exc:  # disk full, quota, permissions: the temp file is gone, older checkpoints stay
            raise CheckpointError(f"cannot write checkpoint {str(path)!r} ({exc.strerror or exc}); the previous "
                                  "checkpoints are kept: free space or fix permissions, then run again to resume",
                                  "not written") from None
        history = ([h for h in self._history() if h != path.name] + [path.name])[-self.keep:]
        # The pointer first, then the deletions: a kill in between leaves only extra files.
        atomic_write_text(self.pointer, json.dumps({"latest": path.name, "history": history}, indent=1))
        for old in self.dir.glob("ckpt-*.pt"):  # rotated ones, and any a kill orphaned before its pointer
            if old.name not in history:
                old.unlink(missing_ok=True)
        for tmp in self.dir.glob(".*.tmp-*"):  # temp files of writers killed mid-write (only one writer per run)
            if not tmp.name.endswith(f".tmp-{os.getpid()}"):
                tmp.unlink(missing_ok=True)
        if best:
            save_checkpoint(self.dir / "best.pt", payload)
        return path

    def exists(self) -> bool:
        return self.pointer.is_file() or any(self.dir.glob("ckpt-*.pt"))

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest readable checkpoint (falling back to older ones, with a warning), or None if none."""
        names = self._history()
        if not names and self.dir.is_dir():  # no pointer (lost, or a kill before the first one): by progress
            names = sorted((p.name for p in self.dir.glob("ckpt-*.pt")), key=_progress_key)
        errors = []
        for name in reversed(names):
            path = self.dir / name
            try:
                payload = load_checkpoint(path)
            except CheckpointError as exc:
                errors.append(f"{name}: {exc.reason}")
                log.warning("%s; trying the previous checkpoint", exc)
                continue
            return payload, path
        if errors:
            # Never a silent restart from scratch: the run directory says training happened.
            raise CheckpointError(f"no usable checkpoint in {str(self.dir)!r} ({'; '.join(errors)}); restore one, "
                                  "or delete the checkpoints directory to start this run over")
        return None


def _progress_key(name: str) -> tuple:
    """Sort key of ``ckpt-<stage>-e<epoch>-s<step>.pt`` names in training order."""
    m = re.fullmatch(r"ckpt-(\w+)-e(\d+)-s(\d+)\.pt", name)
    if m is None:
        return (-1, 0, 0)
    return (STAGE_ORDER.get(m[1], -1), int(m[2]), int(m[3]))
