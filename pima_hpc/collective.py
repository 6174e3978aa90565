"""The one collective interface: "sum these float64 arrays over all workers".

Every cross-worker reduction in pima-hpc (streaming-EM sufficient statistics, the expert
least-squares normal equations, evaluation counts) goes through :class:`Collective`.
On one process it is the identity; :mod:`pima_hpc.distributed` supplies torch.distributed
and MPI implementations chosen from the launcher, without the model code knowing.

Sufficient statistics add across batches and across workers (ERRATA 6), which is what makes
the distributed EM and least squares exact rather than approximate.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class Collective:
    """Sum float64 arrays over all workers. The base class is the single-process identity."""

    rank: int = 0
    world_size: int = 1

    def allreduce_sum(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return the element-wise sums of ``arrays`` over all workers, as new float64 arrays.

        Every worker must call this with arrays of the same shapes in the same order.
        """
        return [np.array(a, dtype=np.float64, copy=True) for a in arrays]

    def barrier(self) -> None:
        """Wait for every worker (a no-op on one process)."""

    def broadcast_object(self, obj, root: int = 0):
        """Return rank ``root``'s ``obj`` on every worker (identity on one process)."""
        return obj

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Release communication resources (a no-op on one process)."""


def allreduce_groups(collective, groups: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Sum several groups of arrays over workers in ONE collective call; the sums come back grouped."""
    summed = collective.allreduce_sum([a for g in groups for a in g])
    out, i = [], 0
    for g in groups:
        out.append(summed[i:i + len(g)])
        i += len(g)
    return out


def gather_subsample(collective, rows: np.ndarray, max_rows: int | None = None) -> np.ndarray:
    """Every rank's rows in rank order (or evenly spaced ones, at most ``max_rows`` in total), the same
    array on every rank.

    A sum of zero-padded per-rank slots through the one collective; slots are as large as the
    fullest rank's share, not ``max_rows``.
    """
    world, rank = collective.world_size, collective.rank
    share = len(rows) if max_rows is None else max(1, max_rows // world)
    take = np.linspace(0, len(rows) - 1, min(share, len(rows))).astype(int) if len(rows) else np.zeros(0, int)
    counts = collective.allreduce_sum([np.eye(world)[rank] * len(take)])[0].astype(int)
    slots = np.zeros((world, int(counts.max()), rows.shape[1]))
    slots[rank, :len(take)] = rows[take]
    summed = collective.allreduce_sum([slots])[0]
    return np.concatenate([summed[r, :counts[r]] for r in range(world)])
