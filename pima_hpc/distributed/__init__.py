"""Launcher-aware distributed setup and the torch.distributed / MPI collectives.

Entry points (the CLI, Slurm scripts, Ray) call :func:`setup_distributed`, hand the returned
:class:`pima_hpc.runtime.Context` to the trainer (it wraps the networks in DDP) and close it
at the end (``ctx.close()``, or :func:`shutdown`). The model never
imports this package: it only sees :class:`pima_hpc.collective.Collective`.
"""

from pima_hpc.distributed.collectives import (DistributedSetupError, MPICollective, TorchCollective,
                                              mpi4py_available)
from pima_hpc.distributed.launchers import (LaunchInfo, detect_launcher, first_host, parse_hostlist,
                                            parse_tasks_per_node, slurm_master_port)
from pima_hpc.distributed.setup import setup_distributed, shutdown

__all__ = [
    "DistributedSetupError", "LaunchInfo", "MPICollective", "TorchCollective",
    "detect_launcher", "first_host", "mpi4py_available", "parse_hostlist",
    "parse_tasks_per_node", "setup_distributed", "shutdown", "slurm_master_port",
]
