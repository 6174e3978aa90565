"""Telling a dead peer from a bug: which exceptions mean "another rank is gone".

When a rank's process or node dies, the survivors learn it inside whatever collective they are in
(DDP's gradient allreduce, an EM sum, a barrier): gloo raises a RuntimeError as soon as the peer's
socket closes ("Connection closed by peer"), NCCL and the TCP store after the collective timeout
(``dist.timeout_s``). Those messages are multi-line and carry C++ source paths; :func:`peer_failure`
reduces one to the line a user needs. Some of gloo's errors reach Python as a bare RuntimeError with
neither the backend's name nor its source path (DDP's buffer broadcast: "Application timeout caused
pair closure"); those are told by where they were raised: inside torch's distributed code.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch.distributed as dist

# Phrases of gloo, NCCL and c10d's store when a peer disappears or stops answering. A backend error
# without one of them (a shape mismatch in a collective, an unsupported dtype) is a bug, not a lost peer.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "timed out", "timeout", "socket closed", "nccl communicator was aborted", "watchdog")
_SOURCE_PREFIX = re.compile(r"^\s*\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")
# torch's own Python that calls into the backends: torch.distributed and DDP's module wrapper.
_COLLECTIVE_CODE = (os.sep + os.path.join("torch", "distributed") + os.sep,
                    os.sep + os.path.join("torch", "nn", "parallel", "distributed.py"))


def _raised_in_collective_code(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc`` is torch's distributed code (a C++ collective below it)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return any(part in filename for part in _COLLECTIVE_CODE)


def peer_failure(exc: BaseException) -> Optional[str]:
    """The one-line cause when ``exc`` says a peer rank is gone, else None (a bug: keep its traceback).

    Only while a multi-rank process group is up: on one process nothing has peers.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if not isinstance(exc, RuntimeError):  # DistError and its network/store/backend kinds are RuntimeErrors
        return None
    text = str(exc)
    lower = text.lower()
    # The network and the store are how ranks reach each other: their errors always mean a peer is
    # unreachable. Other errors qualify only when they come from a backend and name a lost connection.
    network = isinstance(exc, (dist.DistNetworkError, dist.DistStoreError))
    from_backend = (isinstance(exc, dist.DistError) or "gloo" in lower or "nccl" in lower
                    or _raised_in_collective_code(exc))
    if not (network or (from_backend and any(p in lower for p in _PEER_GONE))):
        return None
    line = _SOURCE_PREFIX.sub("", text.strip().splitlines()[0])
    line = line.split(". This is typically caused", 1)[0].rstrip(". ")
    return f"{dist.get_backend()}: {line}"
