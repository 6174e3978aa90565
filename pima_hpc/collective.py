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

