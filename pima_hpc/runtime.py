"""The one run context: who this process is among the workers, its device and its collective.

Everything that runs training (the CLI, Slurm jobs, Ray trials, tests) builds a :class:`Context`,
hands it to the trainer and closes it at the end. One process gets ``Context()``;
:func:`pima_hpc.distributed.setup_distributed` builds the multi-rank one from the launcher. The
model and its math never see it: they only get a :class:`~pima_hpc.collective.Collective`.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from pima_hpc.collective import Collective


def to_device(batch: dict, device) -> dict:
    """A batch of tensors on this process's device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class Context:
    """This process among the workers: rank, world, device, collective; DDP wrapping and clean exit."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    collective: Collective = field(default_factory=Collective)
    launcher: str = "none"
    is_distributed: bool = False
    launch: Any = field(repr=False, default=None)   # the LaunchInfo it was built from, if any
    backend: Optional[str] = None
    # The gloo group for CPU float64 statistics: None means the default group (backend gloo).
    stats_group: Any = field(repr=False, default=None)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def wrap_ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP around ``module`` on this rank's device; the module itself on one process.

        Buffers set in closed form (cluster means, expert parameters) are identical on every rank
        by construction, so DDP's buffer broadcast only keeps BatchNorm running statistics in step.
        """
        if self.world_size <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def average_gradients(self, params) -> None:
        """Average ``params``' gradients over ranks (what DDP does), for a stage trained outside DDP."""
        if self.world_size <= 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def close(self, wait: Optional[bool] = None) -> None:
        """Leave the process group in the order that avoids gloo's rare abort at exit.

        Drop references to the model/optimizer (DDP holds communication hooks) before calling.
        gc.collect() frees them, the barrier keeps a fast rank from tearing down while a peer still
        talks to it, then the group is destroyed. MPI_Finalize is left to mpi4py's exit handler.

        ``wait`` decides the collective steps (the barrier, freeing the MPI communicator). The
        default waits unless an exception is propagating, as when called from ``finally`` on a
        failing rank: its peers are then stuck in some other collective, and a barrier would only
        hold this rank (and its error message) back until the timeout.
        """
        if wait is None:
            wait = sys.exc_info()[0] is None
        gc.collect()
        if dist.is_initialized():
            if wait:
                dist.barrier(group=self.stats_group)
            dist.destroy_process_group()
        if wait:
            self.collective.close()
