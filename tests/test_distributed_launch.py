"""Launcher detection from synthetic environments, Slurm syntax, and single-process setup.

Everything here runs in this process without a process group; the multi-process launches are in
tests/test_collectives.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch

from pima_hpc.collective import Collective
from pima_hpc.distributed import (DistributedSetupError, LaunchInfo, detect_launcher, first_host,
                                  mpi4py_available, parse_hostlist, parse_tasks_per_node, setup_distributed,
                                  slurm_master_port)
from pima_hpc.distributed import setup as launch_mod


@pytest.fixture(autouse=True)
def _restore_logging():
    """setup_distributed configures the root logger; leave it as the test found it."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


def detect(env: dict) -> LaunchInfo:
    return detect_launcher(env, use_scontrol=False)


TORCHRUN = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node03", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "abc", "GROUP_RANK": "1"}

# Task 5 of an 8-task srun step inside a 16-task allocation, on the third of the step's nodes.
SRUN = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "2", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_TASKS_PER_NODE": "3(x2),2", "SLURM_TASKS_PER_NODE": "4(x4)",
        "SLURM_JOB_NODELIST": "node[01-04,07],gpu3", "SLURM_STEP_NODELIST": "node[03-05]"}

MPICH = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
         "PMI_FD": "9", "PMI_HOSTNAME": "vm"}

OPENMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "3", "PMIX_NAMESPACE": "prterun-vm-1@1"}


# ----------------------------------------------------------------------------------------------- detection

def test_no_launcher_is_one_process():
    info = detect({"HOME": "/root"})
    assert info == LaunchInfo("none")
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (0, 1, 0, 1)
    assert not info.is_distributed and not info.mpi_launched


def test_torchrun():
    info = detect(TORCHRUN)
    assert info == LaunchInfo("torchrun", rank=5, local_rank=1, world_size=8, local_world_size=4,
                              master_addr="node03", master_port=29400, mpi=None)
    assert info.is_distributed and not info.mpi_launched


def test_env_convention_without_torchelastic_is_torchrun_style():
    env = {k: TORCHRUN[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size) == ("torchrun", 5, 8)
    assert info.local_world_size == 8  # LOCAL_WORLD_SIZE absent: assumed one node


def test_torchrun_without_master_is_a_clear_error():
    env = {k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR/MASTER_PORT"):
        detect(env)


def test_srun_one_task_per_rank():
    info = detect(SRUN)
    # Step values beat allocation values: 8 tasks, node 2 of the step runs 2 of them.
    assert (info.launcher, info.rank, info.local_rank, info.world_size, info.local_world_size) == \
        ("srun", 5, 1, 8, 2)
    assert info.master_addr == "node03"  # first host of the STEP's nodes (rank 0 runs there)
    assert info.master_port == slurm_master_port(123456, 2) == 20000 + (16 * 123456 + 2) % 20000
    assert info.mpi is None and not info.mpi_launched


def test_srun_job_nodelist_and_env_overrides():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
    assert detect(env).master_addr == "node01"
    env2 = dict(SRUN, MASTER_ADDR="10.0.0.7", MASTER_PORT="31000")
    info = detect(env2)
    assert (info.master_addr, info.master_port) == ("10.0.0.7", 31000)
    env3 = {k: v for k, v in SRUN.items() if "NODELIST" not in k}
    env3["SLURM_NODELIST"] = "gpu[7-8]"
    assert detect(env3).master_addr == "gpu7"


def test_srun_without_nodelist_needs_master_addr():
    env = {k: v for k, v in SRUN.items() if "NODELIST" not in k}
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR"):
        detect(env)


def test_sbatch_batch_script_is_one_process():
    # The batch script carries SLURM_PROCID/SLURM_NTASKS but no step: it is ONE process, and
    # waiting for 15 others that will never come would hang.
    env = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    env["SLURM_PROCID"] = "0"
    assert detect(env).launcher == "none"


def test_srun_torchrun_prefers_torchrun():
    env = dict(SRUN, SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2", SLURM_NODEID="1", SLURM_LOCALID="0",
               SLURM_STEP_TASKS_PER_NODE="1(x2)", PMIX_RANK="1", **TORCHRUN)
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("torchrun", 5, 8, 1)
    assert info.master_addr == "node03" and info.master_port == 29400
    assert info.mpi is None  # the PMIx rank numbers the agents, not the workers


def test_srun_with_pmix_and_pmi2():
    info = detect(dict(SRUN, PMIX_RANK="5", PMIX_NAMESPACE="slurm.pmix.123456.2"))
    assert (info.launcher, info.mpi, info.rank, info.world_size) == ("srun", "pmix", 5, 8)
    assert info.mpi_launched
    info = detect(dict(SRUN, PMI_RANK="5", PMI_SIZE="8", PMI_FD="7"))
    assert (info.launcher, info.mpi, info.rank) == ("srun", "mpich", 5)


def test_mpirun_inside_an_allocation_uses_mpi_ranks():
    # Hydra starts one proxy per node with srun; the ranks inherit the proxy's SLURM_PROCID.
    env = dict(SRUN, SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2", PMI_RANK="7", PMI_SIZE="16",
               MPI_LOCALRANKID="3", MPI_LOCALNRANKS="8")
    info = detect(env)
    assert (info.launcher, info.mpi, info.rank, info.world_size, info.local_rank, info.local_world_size) == \
        ("mpirun", "mpich", 7, 16, 3, 8)


def test_mpiexec_mpich():
    info = detect(MPICH)
    assert info == LaunchInfo("mpirun", rank=3, local_rank=1, world_size=4, local_world_size=2, mpi="mpich")
    assert info.master_addr is None and info.master_port is None  # agreed through MPI at setup
    assert info.mpi_launched
    info = detect(dict(MPICH, MASTER_ADDR="head", MASTER_PORT="29555"))
    assert (info.master_addr, info.master_port) == ("head", 29555)


def test_mpirun_openmpi():
    info = detect(OPENMPI)
    assert info == LaunchInfo("mpirun", rank=3, local_rank=1, world_size=4, local_world_size=2, mpi="openmpi")


def test_bare_pmix():
    with pytest.raises(DistributedSetupError, match="no world size.*WORLD_SIZE"):
        detect({"PMIX_RANK": "2", "PMIX_NAMESPACE": "ns"})
    info = detect({"PMIX_RANK": "2", "WORLD_SIZE": "4", "PMIX_NAMESPACE": "ns"})
    assert (info.launcher, info.mpi, info.rank, info.world_size) == ("mpirun", "pmix", 2, 4)


@pytest.mark.parametrize("env, match", [
    (dict(TORCHRUN, RANK="five"), r"RANK='five'.*not an integer"),
    (dict(TORCHRUN, RANK="8"), r"rank 8 outside \[0, 8\)"),
    (dict(TORCHRUN, LOCAL_RANK="4"), r"local rank 4 outside \[0, 4\)"),
    (dict(TORCHRUN, MASTER_PORT="70000"), "master port 70000"),
    (dict(MPICH, PMI_SIZE="0"), "world size 0"),
    (dict(SRUN, SLURM_STEP_TASKS_PER_NODE="3x2"), "tasks-per-node"),
    (dict(SRUN, SLURM_STEP_NODELIST="node[03-"), "nodelist.*unbalanced brackets"),
])
def test_inconsistent_launcher_variables_are_named(env, match):
    with pytest.raises(DistributedSetupError, match=match):
        detect(env)


def test_launch_info_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        detect(TORCHRUN).rank = 0


def test_detect_reads_os_environ_by_default(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "PMI", "OMPI_", "TORCHELASTIC")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(k)
    for k, v in MPICH.items():
        monkeypatch.setenv(k, v)
    assert detect_launcher().rank == 3


# ----------------------------------------------------------------------------------------------- Slurm syntax

@pytest.mark.parametrize("text, hosts", [
    ("node[01-04,07],gpu3", ["node01", "node02", "node03", "node04", "node07", "gpu3"]),
    ("gpu3", ["gpu3"]),
    ("a,b , c", ["a", "b", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[5]", ["n5"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("cn[1-2]-ib,login", ["cn1-ib", "cn2-ib", "login"]),
])
def test_parse_hostlist(text, hosts):
    assert parse_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "n[1-", "n]1[", "n[3-1]", "n[a-b]", "n[1-2]]", "a,,b", "n[[1]]", "n[1,]"])
def test_parse_hostlist_rejects_malformed(text):
    with pytest.raises(ValueError, match="bad Slurm hostlist"):
        parse_hostlist(text)


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        parse_tasks_per_node("2(3)")


def test_slurm_master_port_range_and_steps():
    ports = {slurm_master_port(987654321, s) for s in range(16)}
    assert len(ports) == 16 and all(20000 <= p < 40000 for p in ports)
    assert slurm_master_port(5) == 20080


def _fake_scontrol(tmp_path, body: str) -> str:
    exe = tmp_path / "scontrol"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


def test_first_host_prefers_scontrol_and_falls_back(tmp_path, monkeypatch):
    good = tmp_path / "good"
    good.mkdir()
    monkeypatch.setenv("PATH", _fake_scontrol(good, 'echo "from-scontrol"; echo other') + os.pathsep
                       + os.environ["PATH"])
    assert first_host("node[01-02]") == "from-scontrol"
    assert first_host("node[01-02]", use_scontrol=False) == "node01"
    assert first_host("plain,other") == "plain"  # nothing to expand: no subprocess
    bad = tmp_path / "bad"
    bad.mkdir()
    monkeypatch.setenv("PATH", _fake_scontrol(bad, "exit 1") + os.pathsep + os.environ["PATH"])
    assert first_host("node[01-02]") == "node01"


# ----------------------------------------------------------------------------------------------- setup (one process)

def test_setup_single_process_has_no_process_group():
    ctx = setup_distributed(env={}, device="cpu")
    assert type(ctx.collective) is Collective
    assert (ctx.rank, ctx.world_size, ctx.launcher, ctx.is_distributed, ctx.is_root) == (0, 1, "none", False, True)
    assert ctx.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    launch_mod.shutdown(ctx)


@pytest.mark.parametrize("kwargs, match", [
    ({"collective": "nccl"}, "collective must be"),
    ({"backend": "mpi"}, "backend must be"),
    ({"device": "gpu"}, "device must be"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_setup_rejects_bad_arguments(kwargs, match):
    with pytest.raises(DistributedSetupError, match=match):
        setup_distributed(env={}, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_setup_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(DistributedSetupError, match="no CUDA device"):
        setup_distributed(env={}, device="cuda")


def test_logging_is_quiet_off_rank_zero():
    root = logging.getLogger()
    launch_mod.configure_logging(rank=3)
    assert root.level == logging.WARNING
    launch_mod.configure_logging(rank=0)
    assert root.level == logging.INFO


class _HostsComm:
    """Just enough of an MPI communicator for the rendezvous: allgather and bcast."""

    def __init__(self, rank, hosts, root_proposal=None):
        self.rank, self.hosts, self.root_proposal = rank, hosts, root_proposal

    def Get_rank(self):
        return self.rank

    def allgather(self, _):
        return self.hosts

    def bcast(self, obj, root=0):
        return obj if self.rank == root else self.root_proposal


def test_mpirun_rendezvous_through_mpi():
    info = detect(MPICH)
    addr, port = launch_mod._resolve_rendezvous(info, _HostsComm(0, ["vm", "vm", "vm", "vm"]))
    assert addr == "127.0.0.1" and 0 < port < 65536
    addr, _ = launch_mod._resolve_rendezvous(info, _HostsComm(0, ["n1", "n1", "n2", "n2"]))
    assert addr == "n1"  # several hosts: rank 0's name, not loopback
    # Non-root ranks take whatever rank 0 broadcast.
    assert launch_mod._resolve_rendezvous(info, _HostsComm(2, ["n1"] * 4, ("n1", 31337))) == ("n1", 31337)
    # MASTER_ADDR alone is kept; the port is still agreed.
    info2 = detect(dict(MPICH, MASTER_ADDR="head"))
    assert launch_mod._resolve_rendezvous(info2, _HostsComm(0, ["a", "b"]))[0] == "head"


def test_mpirun_rendezvous_without_mpi4py():
    info = LaunchInfo("mpirun", rank=1, world_size=2, local_rank=1, local_world_size=2, mpi="mpich")
    assert launch_mod._resolve_rendezvous(info, None) == ("127.0.0.1", launch_mod.DEFAULT_MASTER_PORT)
    multi = LaunchInfo("mpirun", rank=1, world_size=4, local_rank=1, local_world_size=2, mpi="mpich")
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR"):
        launch_mod._resolve_rendezvous(multi, None)


def test_gloo_interface_pinned_only_for_loopback(monkeypatch):
    info = LaunchInfo("mpirun", rank=0, world_size=2, local_world_size=2, mpi="mpich")
    # setenv then delenv: monkeypatch then restores the variable's absence after the test.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "placeholder")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    launch_mod._use_loopback_interface("node03", info)
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    launch_mod._use_loopback_interface("127.0.0.1", info)
    if os.path.exists("/sys/class/net/lo"):
        assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    launch_mod._use_loopback_interface("localhost", info)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"  # the user's choice wins


def test_tcp_url_brackets_ipv6():
    assert launch_mod._tcp_url("::1", 29500) == "tcp://[::1]:29500"
    assert launch_mod._tcp_url("node1", 29500) == "tcp://node1:29500"


def _run_python(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PMI", "OMPI_", "MPI_LOCAL", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)


def test_mpi4py_is_not_imported_without_an_mpi_launcher():
    # Importing mpi4py initialises MPI; outside an MPI launcher that is a private world of size 1.
    proc = _run_python(
        "import sys\n"
        "from pima_hpc.distributed import setup_distributed, shutdown\n"
        "ctx = setup_distributed(device='cpu')\n"
        "shutdown(ctx)\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n"
        "print('ok', type(ctx.collective).__name__)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "Collective"]


@pytest.mark.skipif(not mpi4py_available(), reason="mpi4py not installed")
def test_forced_mpi_on_one_process_is_a_consistent_world():
    proc = _run_python(
        "import numpy as np\n"
        "from pima_hpc.distributed import setup_distributed, shutdown\n"
        "ctx = setup_distributed(device='cpu', collective='mpi')\n"
        "out = ctx.collective.allreduce_sum([np.arange(3), np.float32(2.5)])\n"
        "print(type(ctx.collective).__name__, out[0].tolist(), float(out[1]), ctx.collective.broadcast_object('b'))\n"
        "shutdown(ctx)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["MPICollective", "[0.0,", "1.0,", "2.0]", "2.5", "b"]
