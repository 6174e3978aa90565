"""Stop requests: SIGTERM/SIGUSR1 become "checkpoint after this step, then exit 75" (requeue).

docs/reliability.md: Slurm sends USR1 ahead of the time limit (--signal=B:USR1@120) and TERM on
preemption; torchrun relays TERM. The trainer polls :class:`SignalFlag` after each step, agrees
across ranks, checkpoints and raises :class:`StopRequested`; the CLI exits with EXIT_REQUEUE.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("pima")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpointed on a signal; Slurm scripts requeue on it


class StopRequested(Exception):
    """Raised after a signal-triggered checkpoint, so the CLI exits with EXIT_REQUEUE: ``where`` the run
    stopped and how a resumed run goes on (from a checkpoint written there, an older one, or the start)."""

    def __init__(self, where: str, resumes: str = "checkpointed there"):
        super().__init__(f"{where} ({resumes})")
        self.where = where


class SignalFlag:
    """SIGTERM/SIGUSR1 ask for a checkpoint at the end of the current step; a second one exits now."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    # A signal sent to a whole process group under torchrun reaches a worker twice (directly and
    # relayed by the agent) within milliseconds: that is still one request, not "exit now".
    DUPLICATE_WINDOW_S = 1.0

    def __init__(self):
        self.requested = False
        self._first = 0.0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first < self.DUPLICATE_WINDOW_S:
                return
            os._exit(128 + signum)
        self.requested = True
        self._first = time.monotonic()
        log.warning("received signal %d: will checkpoint after the current step and exit", signum)

    def install(self):
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread (e.g. inside some Ray workers): signals stay default
            pass
        return self

    def uninstall(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
