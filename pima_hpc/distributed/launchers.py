"""How this process was launched: one small detector per launcher, from environment variables only.

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
See docs/distributed.md, "Launchers and collectives"; joining the workers is :mod:`.setup`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

from pima_hpc.distributed.collectives import DistributedSetupError

log = logging.getLogger("pima_hpc.distributed")

LAUNCHERS = ("torchrun", "srun", "mpirun", "none")
MPI_FLAVOURS = ("mpich", "openmpi", "pmix")
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


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


class Launcher:
    """One launcher's reading of the environment: whether it started this process, and what it said.

    A small class per launcher, in the spirit of PyTorch Lightning's ``ClusterEnvironment``:
    :meth:`detected` looks for the launcher's own variables, :meth:`info` reads rank, world and the
    rendezvous from them (raising :class:`DistributedSetupError` naming a bad variable).
    """

    name: str = "none"
    who: str = "a single process"

    def __init__(self, env: Mapping[str, str], use_scontrol: bool = True):
        self.env = env
        self.use_scontrol = use_scontrol

    def detected(self) -> bool:
        raise NotImplementedError

    def info(self) -> LaunchInfo:
        raise NotImplementedError


class Torchrun(Launcher):
    """torchrun, or the plain ``env://`` convention (RANK/WORLD_SIZE/LOCAL_RANK, MASTER_ADDR/PORT)."""

    name = "torchrun"
    who = "torchrun (RANK/WORLD_SIZE/LOCAL_RANK)"

    def detected(self) -> bool:
        env = self.env
        return "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env)

    def info(self) -> LaunchInfo:
        env, who = self.env, self.who
        for name in ("RANK", "WORLD_SIZE"):
            if name not in env:
                raise DistributedSetupError(f"TORCHELASTIC_RUN_ID is set but {name} is not; start workers with "
                                            "torchrun")
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


class MPIRun(Launcher):
    """mpirun/mpiexec: Open MPI (OMPI_COMM_WORLD_*), MPICH/Hydra and other PMI-1/2 launchers, bare PMIx."""

    name = "mpirun"
    WHO = {"openmpi": "Open MPI's mpirun (OMPI_COMM_WORLD_*)", "mpich": "mpiexec (PMI_RANK/PMI_SIZE)",
           "pmix": "a PMIx launcher (PMIX_RANK)"}

    def variables(self) -> Optional[tuple[str, int, Optional[int], Optional[int], Optional[int]]]:
        """(flavour, rank, size, local_rank, local_size) from an MPI launcher's variables, or None."""
        env = self.env
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

    def detected(self) -> bool:
        return self.variables() is not None

    def info(self) -> LaunchInfo:
        flavour, rank, size, local_rank, local_size = self.variables()
        who = self.WHO[flavour]
        if size is None:
            raise DistributedSetupError(f"{who} gave this process rank {rank} but no world size; "
                                        "set WORLD_SIZE, or launch with mpirun/mpiexec/srun")
        addr, port = _env_master(self.env, who)
        return _check_ranks(LaunchInfo(
            "mpirun", rank=rank, local_rank=local_rank or 0, world_size=size,
            local_world_size=local_size if local_size is not None else size,
            master_addr=addr, master_port=port, mpi=flavour), who)


class Srun(Launcher):
    """srun, one task per rank: SLURM_PROCID inside a job step (not the batch script of sbatch).

    MPI variables that agree with Slurm's rank and size (``srun --mpi=pmix|pmi2``) make it srun with
    an MPI flavour; ones that disagree came from an ``mpirun`` inside the allocation, which wins.
    """

    name = "srun"
    who = "srun (SLURM_PROCID/SLURM_NTASKS)"

    def step(self) -> Optional[dict]:
        """Rank facts of an srun job step, or None outside one (including an sbatch batch script)."""
        env, who = self.env, self.who
        if "SLURM_PROCID" not in env or not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
            return None
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
                "local_rank": _first_int(env, ("SLURM_LOCALID",), who) or 0, "local_world": local_world}

    def detected(self) -> bool:
        slurm = self.step()
        if slurm is None:
            return False
        mpi = MPIRun(self.env).variables()
        return mpi is None or (mpi[1] == slurm["rank"] and mpi[2] in (None, slurm["world"]))

    def master(self, world: int) -> tuple[str, int]:
        env, who = self.env, self.who
        addr, port = _env_master(env, who)
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if nodelist:
                try:
                    addr = first_host(nodelist, use_scontrol=self.use_scontrol)
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

    def info(self) -> LaunchInfo:
        slurm, mpi = self.step(), MPIRun(self.env).variables()
        addr, port = self.master(slurm["world"])
        local_world = slurm["local_world"] or (mpi[4] if mpi else None) or slurm["world"]
        return _check_ranks(LaunchInfo(
            "srun", rank=slurm["rank"], local_rank=slurm["local_rank"], world_size=slurm["world"],
            local_world_size=local_world, master_addr=addr, master_port=port,
            mpi=mpi[0] if mpi else None), self.who)


# First match wins (module docstring): torchrun's agents run inside srun steps, and an mpirun inside an
# allocation disagrees with Slurm's ranks, so the order is torchrun, srun, mpirun.
LAUNCHER_TYPES: tuple[type[Launcher], ...] = (Torchrun, Srun, MPIRun)


def detect_launcher(env: Optional[Mapping[str, str]] = None, *, use_scontrol: bool = True) -> LaunchInfo:
    """Work out from ``env`` (default ``os.environ``) which launcher started this process.

    See the module docstring for the precedence. Raises :class:`DistributedSetupError` naming
    the variable when the launcher's variables are inconsistent.
    """
    env = os.environ if env is None else env
    for kind in LAUNCHER_TYPES:
        launcher = kind(env, use_scontrol=use_scontrol)
        if launcher.detected():
            return launcher.info()
    return LaunchInfo("none")
