"""How this process was launched, and joining the other workers.

:func:`detect_launcher` reads environment variables only (no MPI, no network), so it can be
tested with synthetic environments. Precedence, first match wins:

1. **torchrun** (or the plain ``env://`` convention): ``RANK`` and ``WORLD_SIZE`` with
   ``LOCAL_RANK`` or ``TORCHELASTIC_RUN_ID``. Under ``srun torchrun`` the SLURM_* variables
   describe one task per node (the torchrun agents), not the workers, so torchrun wins.
2. **srun**, one task per rank: ``SLURM_PROCID`` inside a job step (``SLURM_STEP_ID`` set).
   The batch script of ``sbatch`` also carries ``SLURM_PROCID``/``SLURM_NTASKS`` but is ONE
   process; treating it as rank 0 of N would hang, so without a step id it is "none".
   If MPI rank variables are present too (``srun --mpi=pmix|pmi2``) and agree with Slurm's rank
   and size, the launch is srun with an MPI flavour; if they disagree the ranks came from an
   ``mpirun`` started inside an allocation, and the MPI variables win.
3. **mpirun/mpiexec**: Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Hydra and other PMI-1/2 launchers
   (``PMI_RANK``/``PMI_SIZE``, ``MPI_LOCALRANKID``), or bare PMIx (``PMIX_RANK``).
4. **none**: a single process.

:func:`setup_distributed` turns a :class:`LaunchInfo` into a torch.distributed process group, a
device and a :class:`~pima_hpc.collective.Collective`; :func:`shutdown` tears them down.
See docs/distributed.md, "Launchers and collectives".
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from pima_hpc.collective import Collective
from pima_hpc.distributed.collectives import (DistributedSetupError, MPICollective, TorchCollective,
                                              import_mpi, mpi4py_available)
from pima_hpc.runtime import Context

log = logging.getLogger("pima_hpc.distributed")

LAUNCHERS = ("torchrun", "srun", "mpirun", "none")
MPI_FLAVOURS = ("mpich", "openmpi", "pmix")
# Port for an mpirun launch that has neither MASTER_PORT nor mpi4py to agree on a free one.
DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process.

    ``master_addr``/``master_port`` are the torch rendezvous; ``None`` means the environment did
    not say (an mpirun launch without MASTER_ADDR/MASTER_PORT) and :func:`setup_distributed`
    agrees on them through MPI. ``mpi`` is the MPI flavour whose variables were found: "mpich"
    (PMI-1/2: MPICH/Hydra, Intel MPI, MVAPICH, srun --mpi=pmi2), "openmpi", "pmix", or None.
    """

    launcher: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    mpi: Optional[str] = None

    def __post_init__(self):
        assert self.launcher in LAUNCHERS, self.launcher
        assert self.mpi in MPI_FLAVOURS + (None,), self.mpi

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def mpi_launched(self) -> bool:
        """Whether MPI_Init would join this process to the other workers (an MPI launcher started them)."""
        return self.launcher == "mpirun" or (self.launcher == "srun" and self.mpi is not None)


# ---------------------------------------------------------------------------------------------
# Slurm syntax


def parse_hostlist(text: str) -> list[str]:
    """Expand Slurm hostlist syntax: "node[01-04,07],gpu3" -> node01..node04, node07, gpu3 (python-hostlist,
    which follows Slurm: zero padding of the bounds, several bracket groups as a product)."""
    import hostlist
    items = [t.strip() for t in re.sub(r"\[[^\]]*\]", "[]", text).split(",")]
    if not text.strip() or not all(items):
        raise ValueError(f"bad Slurm hostlist {text!r}: empty host name")
    try:
        return [h.strip() for h in hostlist.expand_hostlist(text.strip())]
    except hostlist.BadHostlist as exc:
        raise ValueError(f"bad Slurm hostlist {text!r}: {exc}") from None


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """The first host of a Slurm nodelist: where rank 0 runs under srun's block distribution.

    ``scontrol show hostnames`` is Slurm's own expansion (local, no controller round trip) and is
    preferred where installed; our parser is the fallback and handles the usual syntax.
    """
    if "[" not in nodelist:
        return parse_hostlist(nodelist)[0]
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return parse_hostlist(nodelist)[0]


def parse_tasks_per_node(text: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE syntax: "2(x3),1" -> [2, 2, 2, 1] (python-hostlist)."""
    import hostlist
    try:
        return [int(n) for n in hostlist.parse_slurm_tasks_per_node(text.strip())]
    except (hostlist.BadHostlist, ValueError) as exc:
        raise ValueError(f"bad Slurm tasks-per-node {text!r}: {exc}; expected N or N(xM), comma-separated") from None


def slurm_master_port(job_id: int, step_id: int = 0) -> int:
    """A rendezvous port every task of a Slurm step derives alike, without communicating.

    20000 + (16 * job_id + step_id) mod 20000: distinct for up to 16 concurrent steps of a job,
    inside [20000, 40000) (above the well-known range, below Linux's ephemeral ports at 32768 for
    most of it). MASTER_PORT in the environment overrides it.
    """
    return SLURM_PORT_BASE + (16 * job_id + step_id) % SLURM_PORT_SPAN


# ---------------------------------------------------------------------------------------------
# Detection


def _int(env: Mapping[str, str], name: str, who: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={raw!r} (set by {who}) is not an integer") from None


def _first_int(env: Mapping[str, str], names: tuple[str, ...], who: str) -> Optional[int]:
    for name in names:
        if env.get(name, "") != "":
            return _int(env, name, who)
    return None


def _mpi_vars(env: Mapping[str, str]) -> Optional[tuple[str, int, Optional[int], Optional[int], Optional[int]]]:
    """(flavour, rank, size, local_rank, local_size) from an MPI launcher's variables, or None."""
    if "OMPI_COMM_WORLD_RANK" in env:  # Open MPI (v5 also sets PMIX_RANK; OMPI_* is more complete)
        who = "Open MPI's mpirun"
        return ("openmpi", _int(env, "OMPI_COMM_WORLD_RANK", who),
                _first_int(env, ("OMPI_COMM_WORLD_SIZE",), who),
                _first_int(env, ("OMPI_COMM_WORLD_LOCAL_RANK",), who),
                _first_int(env, ("OMPI_COMM_WORLD_LOCAL_SIZE",), who))
    if "PMI_RANK" in env:  # MPICH/Hydra and other PMI-1/2 launchers
        who = "an MPICH-style (PMI) launcher"
        return ("mpich", _int(env, "PMI_RANK", who), _first_int(env, ("PMI_SIZE",), who),
                _first_int(env, ("MPI_LOCALRANKID",), who), _first_int(env, ("MPI_LOCALNRANKS",), who))
    if "PMIX_RANK" in env:
        who = "a PMIx launcher"
        # PMIx publishes sizes through its API, not the environment: take the generic hints.
        return ("pmix", _int(env, "PMIX_RANK", who), _first_int(env, ("WORLD_SIZE",), who),
                _first_int(env, ("LOCAL_RANK",), who), _first_int(env, ("LOCAL_WORLD_SIZE",), who))
    return None


def _env_master(env: Mapping[str, str], who: str) -> tuple[Optional[str], Optional[int]]:
    addr = env.get("MASTER_ADDR") or None
    port = _first_int(env, ("MASTER_PORT",), who)
    return addr, port


def _check_ranks(info: LaunchInfo, who: str) -> LaunchInfo:
    if info.world_size < 1:
        raise DistributedSetupError(f"{who} gave world size {info.world_size}; it must be >= 1")
    if not 0 <= info.rank < info.world_size:
        raise DistributedSetupError(f"{who} gave rank {info.rank} outside [0, {info.world_size})")
    if not 0 <= info.local_rank < info.local_world_size:
        raise DistributedSetupError(
            f"{who} gave local rank {info.local_rank} outside [0, {info.local_world_size})")
    if info.master_port is not None and not 0 < info.master_port < 65536:
        raise DistributedSetupError(f"{who}: master port {info.master_port} is not in 1..65535 (MASTER_PORT)")
    return info


def _detect_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    who = "torchrun (RANK/WORLD_SIZE/LOCAL_RANK)"
    for name in ("RANK", "WORLD_SIZE"):
        if name not in env:
            raise DistributedSetupError(f"TORCHELASTIC_RUN_ID is set but {name} is not; start workers with torchrun")
    world = _int(env, "WORLD_SIZE", who)
    addr, port = _env_master(env, who)
    if world > 1 and (addr is None or port is None):
        raise DistributedSetupError("RANK/WORLD_SIZE are set (torchrun's env:// convention) but MASTER_ADDR/"
                                    "MASTER_PORT are not; set both, or launch with torchrun")
    local_rank = _first_int(env, ("LOCAL_RANK",), who)
    # LOCAL_WORLD_SIZE is always set by torchrun; a hand-made env:// launch may omit it.
    local_world = _first_int(env, ("LOCAL_WORLD_SIZE",), who)
    return _check_ranks(LaunchInfo(
        "torchrun", rank=_int(env, "RANK", who), local_rank=local_rank or 0, world_size=world,
        local_world_size=local_world if local_world is not None else world,
        master_addr=addr, master_port=port), who)


def _slurm_step(env: Mapping[str, str]) -> Optional[dict]:
    """Rank facts of an srun job step, or None outside one (including an sbatch batch script)."""
    if "SLURM_PROCID" not in env or not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        return None
    who = "srun (SLURM_PROCID/SLURM_NTASKS)"
    world = _first_int(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"), who)
    if world is None:
        raise DistributedSetupError("srun set SLURM_PROCID but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS")
    local_world = None
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_id = _first_int(env, ("SLURM_NODEID",), who)
    if per_node:
        try:
            counts = parse_tasks_per_node(per_node)
        except ValueError as exc:
            raise DistributedSetupError(f"srun's SLURM_[STEP_]TASKS_PER_NODE: {exc}") from None
        if node_id is not None and node_id < len(counts):
            local_world = counts[node_id]
    return {"rank": _int(env, "SLURM_PROCID", who), "world": world,
            "local_rank": _first_int(env, ("SLURM_LOCALID",), who) or 0,
            "local_world": local_world, "who": who}


def _slurm_master(env: Mapping[str, str], world: int, who: str, use_scontrol: bool) -> tuple[str, int]:
    addr, port = _env_master(env, who)
    if addr is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            try:
                addr = first_host(nodelist, use_scontrol=use_scontrol)
            except ValueError as exc:
                raise DistributedSetupError(f"srun's nodelist: {exc}; set MASTER_ADDR") from None
        elif world > 1:
            raise DistributedSetupError("srun launch without SLURM_JOB_NODELIST/SLURM_NODELIST: set MASTER_ADDR")
    if port is None:
        job = _first_int(env, ("SLURM_JOB_ID", "SLURM_JOBID"), who)
        if job is None:
            if world > 1:
                raise DistributedSetupError("srun launch without SLURM_JOB_ID: set MASTER_PORT")
        else:
            step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "0"
            port = slurm_master_port(job, int(step) if step.isdigit() else 0)
    return addr, port


def detect_launcher(env: Optional[Mapping[str, str]] = None, *, use_scontrol: bool = True) -> LaunchInfo:
    """Work out from ``env`` (default ``os.environ``) which launcher started this process.

    See the module docstring for the precedence. Raises :class:`DistributedSetupError` naming
    the variable when the launcher's variables are inconsistent.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env):
        return _detect_torchrun(env)

    slurm = _slurm_step(env)
    mpi = _mpi_vars(env)
    if slurm is not None:
        agrees = mpi is not None and mpi[1] == slurm["rank"] and mpi[2] in (None, slurm["world"])
        if mpi is None or agrees:
            who = slurm["who"]
            addr, port = _slurm_master(env, slurm["world"], who, use_scontrol)
            local_world = slurm["local_world"] or (mpi[4] if mpi else None) or slurm["world"]
            return _check_ranks(LaunchInfo(
                "srun", rank=slurm["rank"], local_rank=slurm["local_rank"], world_size=slurm["world"],
                local_world_size=local_world, master_addr=addr, master_port=port,
                mpi=mpi[0] if mpi else None), who)

    if mpi is not None:
        flavour, rank, size, local_rank, local_size = mpi
        who = {"openmpi": "Open MPI's mpirun (OMPI_COMM_WORLD_*)", "mpich": "mpiexec (PMI_RANK/PMI_SIZE)",
               "pmix": "a PMIx launcher (PMIX_RANK)"}[flavour]
        if size is None:
            raise DistributedSetupError(f"{who} gave this process rank {rank} but no world size; "
                                        "set WORLD_SIZE, or launch with mpirun/mpiexec/srun")
        addr, port = _env_master(env, who)
        return _check_ranks(LaunchInfo(
            "mpirun", rank=rank, local_rank=local_rank or 0, world_size=size,
            local_world_size=local_size if local_size is not None else size,
            master_addr=addr, master_port=port, mpi=flavour), who)

    return LaunchInfo("none")


# ---------------------------------------------------------------------------------------------
# Setup and teardown


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
