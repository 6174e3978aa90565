"""torch.distributed and MPI implementations of :class:`pima_hpc.collective.Collective`.

Both sum float64 arrays over all workers for the streaming-EM sufficient statistics and the
experts' least-squares normal equations (ERRATA 6: these statistics add across batches and
workers, so the distributed update is exact provided the sum is). Two design choices follow:

* **One packed buffer per call.** A call packs every array into a single flat float64 buffer
  (plus one header element, below), so a reduction costs one collective latency however many
  arrays the EM pass hands over.
* **Exact (reproducible) mode by default.** Instead of ``allreduce(SUM)``, whose summation order
  depends on the algorithm, the message sizes and the world size, every rank all-gathers the
  packed buffers and adds them in rank order ``((x_0 + x_1) + x_2) + ...``. Every rank then holds
  bitwise the same result, and a rerun with the same data and rank count reproduces it exactly,
  so all ranks take identical EM/least-squares steps and never drift apart. The price is
  ``world_size`` times the buffer in memory and bandwidth, negligible for these statistics
  (kilobytes to a few megabytes); ``exact=False`` switches to a plain allreduce.

The header element is a checksum of the array shapes. Ranks that pass different shapes (a bug
such as a per-rank cluster count) would otherwise sum unrelated numbers; the checksum turns that
into an error on every rank.

mpi4py is imported only by :func:`import_mpi`, which :mod:`pima_hpc.distributed.setup` calls
only under an MPI launcher (or when ``collective="mpi"`` is forced): importing it elsewhere
initialises a singleton MPI world, which is at best wasted and at worst (under torchrun) a
world of size 1 that would silently sum one rank's statistics. :class:`MPICollective` refuses
to run when its world disagrees with the torch world size.
"""

from __future__ import annotations

import importlib.util
import sys
import zlib
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from pima_hpc.collective import Collective
from pima_hpc.errors import DistributedSetupError


def _shape_signature(shapes: Sequence[tuple[int, ...]]) -> float:
    # crc32 is stable across processes (unlike hash()) and < 2**32, so the float64 is exact and
    # even world_size copies of it add exactly (world_size < 2**21).
    return float(zlib.crc32(repr([tuple(s) for s in shapes]).encode()))


def _pack(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """One float64 buffer: [shape signature, a_0.ravel(), a_1.ravel(), ...]."""
    arrs = [np.asarray(a) for a in arrays]
    for i, a in enumerate(arrs):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
            raise TypeError(f"allreduce_sum: array {i} has dtype {a.dtype}; pass real numeric arrays "
                            "(they are summed as float64)")
    shapes = [a.shape for a in arrs]
    buf = np.empty(1 + sum(a.size for a in arrs), dtype=np.float64)
    buf[0] = _shape_signature(shapes)
    offset = 1
    for a in arrs:
        buf[offset:offset + a.size] = a.reshape(-1)  # casts to float64 on assignment
        offset += a.size
    return buf, shapes


def _unpack(total: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    # Views into the freshly allocated ``total``: new arrays that alias no input.
    out, offset = [], 1
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        out.append(total[offset:offset + n].reshape(shape))
        offset += n
    return out


def _sum_in_rank_order(gathered: np.ndarray) -> np.ndarray:
    """``gathered[0] + gathered[1] + ...`` left to right, the fixed order that makes results exact."""
    total = gathered[0].copy()
    for row in gathered[1:]:
        total += row
    return total


def _shape_mismatch(rank: int, shapes, others: str) -> RuntimeError:
    return RuntimeError(
        f"allreduce_sum: rank {rank} passed arrays of shapes {[tuple(s) for s in shapes]} but {others} "
        "passed different shapes; every rank must reduce the same arrays in the same order")


def _check_signatures(signatures: np.ndarray, own: float, rank: int, shapes) -> None:
    """Exact mode: every rank's header is visible, so name the ranks that disagree."""
    bad = np.flatnonzero(signatures != own)
    if bad.size:
        raise _shape_mismatch(rank, shapes, f"rank(s) {bad.tolist()}")


def _check_root(root: int, world_size: int) -> None:
    if not 0 <= root < world_size:
        raise ValueError(f"broadcast_object: root must be in [0, {world_size}), got {root}")


class PackedCollective(Collective):
    """The sum path both transports share: pack -> all-gather (exact) or all-reduce -> check -> unpack.

    Subclasses give the two transport calls on one packed float64 buffer; the shape checksum in
    slot 0 turns ranks that pass different arrays into an error on every rank.
    """

    exact: bool = True

    def _allgather(self, buf: np.ndarray) -> np.ndarray:
        """Every rank's ``buf`` as the rows of a (world_size, len(buf)) array."""
        raise NotImplementedError

    def _allreduce(self, buf: np.ndarray) -> np.ndarray:
        """The element-wise sum of every rank's ``buf`` (the transport's own order), a new array."""
        raise NotImplementedError

    def allreduce_sum(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) == 0:
            return []
        buf, shapes = _pack(arrays)
        if self.exact:
            gathered = self._allgather(buf)
            _check_signatures(gathered[:, 0], buf[0], self.rank, shapes)
            total = _sum_in_rank_order(gathered)
        else:
            total = self._allreduce(buf)
            if total[0] != buf[0] * self.world_size:
                raise _shape_mismatch(self.rank, shapes, "another rank")
        return _unpack(total, shapes)


class TorchCollective(PackedCollective):
    """Float64 sums through a torch.distributed group that can hold CPU tensors (gloo).

    ``group`` is the gloo group: the default group when the backend is gloo, or the extra gloo
    group created beside NCCL (NCCL only reduces GPU tensors, and these statistics are small
    float64 numpy arrays). Timeouts come from the group (``timeout_s`` of setup_distributed).
    """

    def __init__(self, group: Any = None, exact: bool = True):
        if not dist.is_initialized():
            raise DistributedSetupError("TorchCollective needs an initialised torch.distributed process group; "
                                        "create it with pima_hpc.distributed.setup_distributed()")
        self.group = group
        self.exact = exact
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _allgather(self, buf: np.ndarray) -> np.ndarray:
        gathered = np.empty((self.world_size, buf.size), dtype=np.float64)
        out = torch.from_numpy(gathered)
        # all_gather into row views of one buffer: no per-rank allocation or copy afterwards.
        dist.all_gather(list(out.unbind(0)), torch.from_numpy(buf), group=self.group)
        return gathered

    def _allreduce(self, buf: np.ndarray) -> np.ndarray:
        total = buf.copy()
        dist.all_reduce(torch.from_numpy(total), op=dist.ReduceOp.SUM, group=self.group)
        return total

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast_object(self, obj, root: int = 0):
        _check_root(root, self.world_size)
        box = [obj if self.rank == root else None]
        # src is a global rank; the statistics group always spans every rank, so they coincide.
        dist.broadcast_object_list(box, src=root, group=self.group)
        return box[0]

    def close(self) -> None:
        """Nothing to release: the process group is destroyed by ``shutdown``."""

    def __repr__(self) -> str:
        return f"TorchCollective(rank={self.rank}, world_size={self.world_size}, exact={self.exact})"


def mpi4py_available() -> bool:
    """Whether mpi4py can be imported, found WITHOUT importing it (importing initialises MPI)."""
    return importlib.util.find_spec("mpi4py") is not None


def import_mpi():
    """Import and return ``mpi4py.MPI``, initialising MPI at thread level "funneled".

    Only the main thread calls MPI here (torch's and the data loader's threads never do), which
    is exactly "funneled"; asking for "multiple" (mpi4py's default) makes some MPI libraries lock
    every call or fall back to slower transports. The level must be set before the first import.
    """
    if "mpi4py.MPI" not in sys.modules:
        try:
            import mpi4py
        except ImportError:
            raise DistributedSetupError(
                "the MPI collective needs mpi4py, which is not installed; install it with "
                "`pip install 'pima-hpc[mpi]'` (mpich + mpi4py) or use collective=torch") from None
        mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    return MPI


class MPICollective(PackedCollective):
    """Float64 sums through mpi4py on numpy buffers (no torch involved).

    ``comm`` defaults to a duplicate of ``MPI.COMM_WORLD`` so these collectives never match
    messages of other code using COMM_WORLD. ``expected_world_size``/``expected_rank`` are the
    torch world's: a disagreement (mpi4py started outside an MPI launcher, e.g. under torchrun,
    sees a world of its own of size 1) is a hard error, because the EM sums would otherwise
    silently cover a subset of the ranks.
    """

    def __init__(self, comm: Any = None, *, expected_world_size: int | None = None,
                 expected_rank: int | None = None, launcher: str = "unknown", exact: bool = True):
        if comm is None:
            comm = import_mpi().COMM_WORLD
            owned = True
        else:
            owned = False
        size, rank = comm.Get_size(), comm.Get_rank()
        if expected_world_size is not None and (size != expected_world_size
                                                or (expected_rank is not None and rank != expected_rank)):
            raise DistributedSetupError(
                f"MPI world size mismatch: MPI.COMM_WORLD has size {size} (this process is MPI rank {rank}) "
                f"but the torch world has size {expected_world_size} (this process is rank {expected_rank}); "
                f"launcher detected: {launcher}. MPI only sees the other workers when they are started by an "
                "MPI launcher (mpiexec/mpirun, or srun --mpi=pmix/pmi2); under torchrun each process gets its "
                "own MPI world of size 1 and the EM sums would silently cover one rank. Fix: launch with "
                f"`mpiexec -n {expected_world_size} python ...` (or srun with an MPI plugin), or use "
                "collective=torch (or auto) under torchrun.")
        self.comm = comm.Dup() if owned else comm
        self._owned = owned
        self.rank, self.world_size = rank, size
        self.exact = exact

    def _allgather(self, buf: np.ndarray) -> np.ndarray:
        gathered = np.empty((self.world_size, buf.size), dtype=np.float64)
        self.comm.Allgather(buf, gathered)
        return gathered

    def _allreduce(self, buf: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        total = np.empty_like(buf)
        self.comm.Allreduce(buf, total, op=MPI.SUM)
        return total

    def barrier(self) -> None:
        self.comm.Barrier()

    def broadcast_object(self, obj, root: int = 0):
        _check_root(root, self.world_size)
        return self.comm.bcast(obj if self.rank == root else None, root=root)

    def close(self) -> None:
        """Free the duplicated communicator (collective). MPI_Finalize is left to mpi4py at exit."""
        if self._owned and self.comm is not None:
            self.comm.Free()
            self.comm = None
            self._owned = False

    def __repr__(self) -> str:
        return f"MPICollective(rank={self.rank}, world_size={self.world_size}, exact={self.exact})"
