"""The errors a user can cause, under one base the CLI catches once (one line, exit status 2).

Every message is a single line that names what is wrong (the key, file, run directory or rank) and
the fix. Internal invariants use ``assert`` or plain exceptions instead: they are bugs, not user errors.
The classes also derive from the built-in type a caller would expect (ValueError for bad values,
RuntimeError for a run that cannot go on), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every user-facing error: ``pima`` prints ``pima: error: <message>`` and exits 2."""


class ConfigError(UserError, ValueError):
    """A configuration problem: one line naming the key and the fix."""


class DataError(UserError, ValueError):
    """A data problem: one line naming the file, the dataset and the fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix (``reason``: what is wrong)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class ResumeError(UserError, RuntimeError):
    """A run directory that cannot be resumed with this config (names the changed keys)."""


class NonFiniteError(UserError, RuntimeError):
    """A loss or statistic became NaN/inf: names the stage, epoch, step and the terms involved."""


class DistributedSetupError(UserError, RuntimeError):
    """The launcher's environment or the process group cannot be set up (names the variable or rank)."""


EXIT_RANK_LOST = 69  # EX_UNAVAILABLE: a peer rank is gone; the run directory can be resumed


class RankLostError(RuntimeError):
    """Another rank stopped answering mid-run (its process or node died, or the network failed).

    Not a user error, and not a bug of this rank: ``pima`` prints the one-line message (the rank,
    the backend's own one-line cause, the run directory to resume from) instead of the backend's
    traceback, and exits EXIT_RANK_LOST. Slurm requeues a ``--requeue`` job after a node failure.
    """
