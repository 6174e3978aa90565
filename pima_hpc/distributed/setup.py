"""Joining the other workers: a :class:`~pima_hpc.distributed.launchers.LaunchInfo` becomes a
torch.distributed process group, a device and a :class:`~pima_hpc.collective.Collective`
(:func:`setup_distributed`); :func:`shutdown` tears them down. See docs/distributed.md,
"Launchers and collectives".
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import sys
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from pima_hpc.collective import Collective
from pima_hpc.distributed.collectives import (DistributedSetupError, MPICollective, TorchCollective,
                                              import_mpi, mpi4py_available)
from pima_hpc.runtime import Context

from pima_hpc.distributed.launchers import LaunchInfo, detect_launcher

log = logging.getLogger("pima_hpc.distributed")

# Port for an mpirun launch that has neither MASTER_PORT nor mpi4py to agree on a free one.
DEFAULT_MASTER_PORT = 29500
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def configure_logging(rank: int) -> None:
    """INFO on rank 0 and WARNING elsewhere, so N ranks do not print N copies of every line.

    Adds a handler only when the application has not configured logging yet.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _pick_device(device: str, info: LaunchInfo) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise DistributedSetupError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedSetupError("device='cuda' but torch sees no CUDA device; use device=auto or cpu")
    count = torch.cuda.device_count()
    if count >= info.local_world_size:
        return torch.device("cuda", info.local_rank)
    if count == 1:  # one GPU bound per task (srun --gpus-per-task=1 / CUDA_VISIBLE_DEVICES per rank)
        return torch.device("cuda", 0)
    raise DistributedSetupError(
        f"{info.local_world_size} ranks on this node but {count} visible GPUs; run one rank per GPU "
        "(fewer tasks per node) or bind one GPU per task")


def _pick_backend(backend: str, dev: torch.device) -> str:
    if backend == "auto":
        return "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise DistributedSetupError("backend='nccl' needs a CUDA device; use backend=gloo (or auto) on CPU")
    return backend


def _pick_collective(collective: str, info: LaunchInfo) -> str:
    if collective not in ("auto", "torch", "mpi"):
        raise DistributedSetupError(f"collective must be 'auto', 'torch' or 'mpi', got {collective!r}")
    if collective == "auto":
        # Never import mpi4py unless an MPI launcher started us: elsewhere it would make a
        # private world of size 1 (see MPICollective).
        return "mpi" if info.mpi_launched and mpi4py_available() else "torch"
    return collective


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _resolve_rendezvous(info: LaunchInfo, comm) -> tuple[str, int]:
    """Master address and port for an mpirun launch whose environment named none.

    With mpi4py (``comm``): rank 0 picks a free port and, if all ranks share its host, the
    loopback address, otherwise its host name; MPI broadcasts them. Without mpi4py all ranks
    must be on one node and use 127.0.0.1:29500 (set MASTER_ADDR/MASTER_PORT to choose).
    """
    addr, port = info.master_addr, info.master_port
    if addr is not None and port is not None:
        return addr, port
    if comm is not None:
        hosts = comm.allgather(socket.gethostname())
        if comm.Get_rank() == 0:
            proposal = (addr or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0]),
                        port or _free_port())
        else:
            proposal = None
        return comm.bcast(proposal, root=0)
    if info.local_world_size != info.world_size and addr is None:
        raise DistributedSetupError(
            "mpirun launch across several nodes without MASTER_ADDR and without mpi4py to agree on one: "
            "export MASTER_ADDR (rank 0's host) and MASTER_PORT, or install mpi4py (pip install 'pima-hpc[mpi]')")
    return addr or "127.0.0.1", port or DEFAULT_MASTER_PORT


def _use_loopback_interface(addr: str, info: LaunchInfo) -> None:
    """Pin gloo to the loopback interface when the rendezvous is on this host.

    Gloo otherwise picks the interface its host name resolves to, which on some machines (a
    hostname mapped to an unconfigured address) cannot reach itself. Only safe when every rank
    is on this node, which a loopback master address implies. A user's GLOO_SOCKET_IFNAME wins.
    """
    if (addr in _LOOPBACK and "GLOO_SOCKET_IFNAME" not in os.environ and sys.platform.startswith("linux")
            and os.path.exists("/sys/class/net/lo")):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def _tcp_url(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
    return f"tcp://{host}:{port}"


def setup_distributed(backend: str = "auto", collective: str = "auto", timeout_s: float = 300,
                      device: str = "auto", *, exact: bool = True,
                      env: Optional[Mapping[str, str]] = None) -> Context:
    """Join the other workers: process group, device and collective for this launch.

    backend: "auto" (NCCL on a CUDA device, gloo on CPU), "gloo" or "nccl". With NCCL an extra
        gloo group carries the float64 statistics (NCCL only reduces GPU tensors).
    collective: "auto" (MPI when an MPI launcher started us and mpi4py is importable, else
        torch.distributed), "torch", or "mpi" (forced; fails clearly when the MPI world is not
        the torch world, e.g. under torchrun).
    timeout_s: bound on the rendezvous and on every collective, so a dead rank makes the others
        fail instead of hanging forever.
    device: "auto" (cuda:local_rank when CUDA is available, else cpu), "cpu" or "cuda".
    exact: the reproducible all-gather-and-sum-in-rank-order reduction (collectives module).
    env: the environment to read (default ``os.environ``).

    One process gets no process group and the identity :class:`Collective`.
    """
    if timeout_s <= 0:
        raise DistributedSetupError(f"timeout_s must be > 0, got {timeout_s}")
    if backend not in ("auto", "gloo", "nccl"):
        raise DistributedSetupError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    info = detect_launcher(env)
    configure_logging(info.rank)
    dev = _pick_device(device, info)
    kind = _pick_collective(collective, info)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if not info.is_distributed:
        # One process needs no communication; MPI only when explicitly forced (then it must agree).
        coll = (MPICollective(expected_world_size=1, expected_rank=0, launcher=info.launcher, exact=exact)
                if collective == "mpi" else Collective())
        log.info("single process (launcher %s) on %s", info.launcher, dev)
        return Context(rank=0, local_rank=info.local_rank, world_size=1, device=dev, launcher=info.launcher,
                           collective=coll, is_distributed=False, launch=info)

    if dist.is_initialized():
        raise DistributedSetupError("torch.distributed is already initialised; call shutdown(ctx) first")
    backend = _pick_backend(backend, dev)
    timeout = timedelta(seconds=timeout_s)

    mpi_coll, comm = None, None
    if kind == "mpi":
        # Before torch: the size check must fire before anyone waits at a rendezvous.
        mpi_coll = MPICollective(expected_world_size=info.world_size, expected_rank=info.rank,
                                 launcher=info.launcher, exact=exact)
        comm = mpi_coll.comm
    elif info.mpi_launched and (info.master_addr is None or info.master_port is None) and mpi4py_available():
        comm = import_mpi().COMM_WORLD  # only to agree on the rendezvous

    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if info.launcher == "torchrun" and env is None:
        # env:// lets torchrun's agent store serve the rendezvous (TORCHELASTIC_USE_AGENT_STORE):
        # the agent already listens on MASTER_PORT, so rank 0 must not open a store there itself.
        addr = info.master_addr
        kwargs["init_method"] = "env://"
    else:
        if info.launcher == "mpirun":
            addr, port = _resolve_rendezvous(info, comm)
        else:
            addr, port = info.master_addr, info.master_port
        kwargs.update(init_method=_tcp_url(addr, port), rank=info.rank, world_size=info.world_size)
    _use_loopback_interface(addr, info)
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = dev  # binds the communicator to this GPU up front
    # No cleanup on failure: freeing the MPI communicator is itself collective and could hang.
    dist.init_process_group(**kwargs)

    stats_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    coll = mpi_coll if mpi_coll is not None else TorchCollective(group=stats_group, exact=exact)
    log.info("distributed: launcher=%s world=%d backend=%s collective=%r device=%s master=%s",
             info.launcher + (f"/{info.mpi}" if info.mpi else ""), info.world_size, backend, coll, dev,
             kwargs["init_method"])
    return Context(rank=info.rank, local_rank=info.local_rank, world_size=info.world_size, device=dev,
                       launcher=info.launcher, collective=coll, is_distributed=True, launch=info,
                       backend=backend, stats_group=stats_group)


def shutdown(ctx: Context, wait: Optional[bool] = None) -> None:
    """``ctx.close(wait)``: leave the process group cleanly (:meth:`pima_hpc.runtime.Context.close`)."""
    ctx.close(wait)
