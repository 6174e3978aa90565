"""Launcher-aware distributed setup and the torch.distributed / MPI collectives.

Entry points (the CLI, Slurm scripts, Ray) call :func:`setup_distributed`, hand the returned
:class:`DistContext` to the trainer (with :func:`pima_hpc.distributed.ddp.wrap_ddp` for the
networks) and call :func:`shutdown` at the end. The model never
imports this package: it only sees :class:`pima_hpc.collective.Collective`.
"""

from pima_hpc.distributed.collectives import (DistributedSetupError, MPICollective, TorchCollective,
                                              mpi4py_available)
from pima_hpc.distributed.launch import (DistContext, LaunchInfo, detect_launcher, first_host, parse_hostlist,
                                         parse_tasks_per_node, setup_distributed, shutdown, slurm_master_port)

__all__ = [
    "DistContext", "DistributedSetupError", "LaunchInfo", "MPICollective", "TorchCollective",
    "detect_launcher", "first_host", "mpi4py_available", "parse_hostlist",
    "parse_tasks_per_node", "setup_distributed", "shutdown", "slurm_master_port",
]
