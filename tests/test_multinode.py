"""Several nodes for real: Linux network namespaces give each simulated node its own address on a
bridge (tools/ci/netns_up.sh), and the launchers run across them as across hosts: torchrun with a
c10d rendezvous on 2 nodes x 1 process. The runs must equal one node's.

Needs root and iproute2; CI (.ci/run) sets PIMA_REQUIRE_NETNS=1 so these tests fail instead of
skipping. The namespaces are created for this module and always removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pima_hpc.collective import Collective

sys.path.insert(0, str(Path(__file__).parent))
from test_collectives import (MPIEXEC, TORCHRUN, WORKERS, clean_env, fail_message, free_port,  # noqa: E402
                              needs_mpi)
from test_distributed_training import STATS_WORKER, check_distributed_statistics  # noqa: E402

sys.path.insert(0, str(WORKERS))
import em_stats_worker as stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NODES = 2
TIMEOUT = 180


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if not TORCHRUN.exists():
        return f"torchrun not installed beside {sys.executable}"
    return None


@pytest.fixture(scope="module")
def nodes():
    reason = _skip_reason()
    if reason:
        if os.environ.get("PIMA_REQUIRE_NETNS") == "1":
            pytest.fail(f"PIMA_REQUIRE_NETNS=1 but {reason}")
        pytest.skip(reason)
    up = subprocess.run([REPO / "tools/ci/netns_up.sh", str(NODES)], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield [f"10.77.0.{i + 1}" for i in range(NODES)]
    finally:
        subprocess.run([REPO / "tools/ci/netns_down.sh"], capture_output=True)


ON_NODE = REPO / "tools/ci/on_node"
NETNS_SSH = REPO / "tools/ci/netns_ssh"


def _wait_all(procs, tmp_path: Path, timeout: float):
    """Exit codes (None: killed at the timeout) and the logs' tails, every process group gone."""
    end = time.monotonic() + timeout
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=max(end - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
        log.close()
    for p, _ in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
    logs = "\n".join(f"--- {Path(log.name).name}\n" + Path(log.name).read_text()[-3000:] for _, log in procs)
    return codes, logs


def start_on_node(i: int, cmd: list, tmp_path: Path, env: dict, name: str | None = None):
    """Start ``cmd`` on simulated node i (its own namespace, address and hostname pima-node<i>)."""
    log = open(tmp_path / f"{name or f'node{i}'}.log", "w")
    proc = subprocess.Popen([str(c) for c in (ON_NODE, i, *cmd)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True)
    return proc, log


def torchrun_on_node(i: int, n: int, port: int, args: list, rdzv_id: str = "pima-multinode") -> list:
    """torchrun's command line for node i of n, a c10d rendezvous on node 0, as one types it on a
    real cluster: nothing names the namespace, each node is found by its hostname's address."""
    return [TORCHRUN, f"--nnodes={n}", "--nproc_per_node=1", f"--node_rank={i}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=pima-node0:{port}", f"--rdzv_id={rdzv_id}", "--max_restarts=0", *args]


def run_on_nodes(addresses: list[str], args: list, tmp_path: Path, timeout: float = TIMEOUT):
    """One torchrun agent per node, a c10d rendezvous on node 0."""
    port, env = free_port(), clean_env()
    procs = [start_on_node(i, torchrun_on_node(i, len(addresses), port, args), tmp_path, env)
             for i in range(len(addresses))]
    return _wait_all(procs, tmp_path, timeout)


def mpiexec_on_nodes(n: int, args: list, tmp_path: Path, timeout: float = TIMEOUT):
    """mpiexec started on node 0, one rank per node; Hydra reaches the other nodes through
    tools/ci/netns_ssh, the stand-in for ssh."""
    cmd = [MPIEXEC, "-launcher", "ssh", "-launcher-exec", NETNS_SSH,
           "-hosts", ",".join(f"pima-node{i}" for i in range(n)), "-n", n, "-ppn", 1, sys.executable, *args]
    return _wait_all([start_on_node(0, cmd, tmp_path, clean_env(), "mpiexec")], tmp_path, timeout)


def test_em_and_experts_across_two_nodes_equal_one_process(nodes, tmp_path):
    codes, logs = run_on_nodes(nodes, [STATS_WORKER, "--out", tmp_path], tmp_path)
    assert codes == [0, 0], logs
    check_distributed_statistics(tmp_path, stats.closed_form(Collective()), "TorchCollective", "torchrun")


@needs_mpi
def test_em_and_experts_under_mpiexec_across_two_nodes_equal_one_process(nodes, tmp_path):
    codes, logs = mpiexec_on_nodes(NODES, [STATS_WORKER, "--out", tmp_path], tmp_path)
    assert codes == [0], logs
    check_distributed_statistics(tmp_path, stats.closed_form(Collective()), "MPICollective", "mpirun")
    assert "master=tcp://pima-node0:" in logs, logs  # MPI agreed on rank 0's host, not on the loopback


TRAIN = ["-m", "pima_hpc", "train", REPO / "configs/digits.yaml", "train.epochs=2", "crossmodal.epochs=1",
         "train.progress=false", "figures=false", "logging.tensorboard=false"]


def untimed_metrics(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    m.pop("wall_seconds_this_process")
    for h in m["history"]:
        h.pop("seconds")
    return m


@pytest.fixture(scope="module")
def two_ranks_one_node(tmp_path_factory) -> dict:
    """The digits job on 2 ranks of one node: what every 2-node run must reproduce bitwise."""
    run_dir = tmp_path_factory.mktemp("one-node") / "run"
    single = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *map(str, TRAIN),
                             f"run_dir={run_dir}"], env=clean_env(), cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert single.returncode == 0, fail_message(single)
    return untimed_metrics(run_dir)


def check_same_training(run_dir: Path, reference: dict) -> None:
    """Same global batches, same rank order of every sum: the metrics are bitwise those of one node."""
    multi = untimed_metrics(run_dir)
    assert multi["world_size"] == 2
    assert multi == reference
    assert multi["multimodal"]["test"]["accuracy"] >= 0.5
    np.testing.assert_allclose(sorted(multi["experts"]["curve"]["slope"]), np.arange(10), atol=0.05)


def test_training_across_two_nodes_equals_two_ranks_on_one_node(nodes, tmp_path, two_ranks_one_node):
    """The CLI on 2 nodes x 1 process (torchrun), rank 0 alone writing the run directory."""
    codes, logs = run_on_nodes(nodes, [*TRAIN, f"run_dir={tmp_path / 'multi'}"], tmp_path)
    assert codes == [0, 0], logs
    check_same_training(tmp_path / "multi", two_ranks_one_node)


@needs_mpi
def test_training_under_mpiexec_across_two_nodes_equals_one_node(nodes, tmp_path, two_ranks_one_node):
    """The CLI under mpiexec on 2 hosts: the rendezvous is agreed through MPI (rank 0's host name),
    the EM sums go through MPI, and the run equals torchrun's on one node."""
    codes, logs = mpiexec_on_nodes(NODES, [*TRAIN[1:], f"run_dir={tmp_path / 'multi'}"], tmp_path)
    assert codes == [0], logs
    assert "launcher=mpirun/mpich" in logs and "master=tcp://pima-node0:" in logs, logs
    check_same_training(tmp_path / "multi", two_ranks_one_node)
