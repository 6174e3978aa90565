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
import tempfile
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


def node_pids(i: int) -> list[int]:
    """Every process of simulated node i (all that runs in its network namespace)."""
    out = subprocess.run(["ip", "netns", "pids", f"pima-node{i}"], capture_output=True, text=True, check=True)
    return [int(p) for p in out.stdout.split()]


def kill_node(i: int) -> None:
    """Node i dies: SIGKILL to everything on it (slurmd, job steps, ranks, torchrun agents)."""
    for pid in node_pids(i):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


LOST = "pima: error: rank 0 of 2 lost another rank"


def test_a_dead_node_stops_the_survivor_with_one_line(nodes, tmp_path):
    """Kill node 1 mid-epoch: rank 0 on node 0 exits at once (gloo sees the socket close) with one
    line naming the lost rank and the run directory, not the backend's traceback."""
    port, env = free_port(), clean_env()
    args = [*TRAIN, "train.epochs=200", f"run_dir={tmp_path / 'run'}"]
    procs = [start_on_node(i, torchrun_on_node(i, NODES, port, args), tmp_path, env) for i in range(NODES)]
    log0 = tmp_path / "node0.log"
    deadline = time.monotonic() + TIMEOUT
    while " epoch 2/200 " not in log0.read_text() and time.monotonic() < deadline:
        assert all(p.poll() is None for p, _ in procs), _wait_all(procs, tmp_path, 1)[1]
        time.sleep(0.2)
    killed = time.monotonic()
    kill_node(1)
    codes, logs = _wait_all(procs[:1], tmp_path, 60)
    _wait_all(procs[1:], tmp_path, 5)
    text = log0.read_text()
    assert codes[0] is not None and codes[0] != 0, logs
    assert time.monotonic() - killed < 30, "the survivor waited for the collective timeout"
    assert f"{LOST} in the multimodal stage" in text and "(gloo: " in text, text[-3000:]
    assert "[rank0]: Traceback" not in text and "[rank0]: RuntimeError" not in text, text[-3000:]


# ---------------------------------------------------------------------------------------------
# Slurm with a slurmd on each simulated node: sbatch -N 2 as on a real cluster.

SLURM_PORTS = {"PIMA_SLURMCTLD_PORT": "16837", "PIMA_SLURMD_PORT": "16838"}  # CI's 1-node cluster: 16817/8


@pytest.fixture(scope="module")
def slurm_two_nodes(nodes) -> str:
    """A 2-node cluster (tools/ci/slurm_up.sh with PIMA_SLURM_NODES=2); its SLURM_CONF. A node that
    stops answering is DOWN after 10 s and a requeued job may start again 10 s later. Each node has
    2 CPUs (the Ray test counts on it)."""
    if shutil.which("sbatch") is None and os.environ.get("PIMA_REQUIRE_SLURM") != "1":
        pytest.skip("Slurm is not installed: tools/ci/slurm_up.sh installs it")
    # munged wants every directory above its socket searchable by all: not pytest's tmp_path (0700).
    state = tempfile.mkdtemp(prefix="pima-slurm-2nodes-")
    os.chmod(state, 0o755)
    env = {**clean_env(), **SLURM_PORTS, "PIMA_SLURM_DIR": state,
           "PIMA_SLURM_NODES": str(NODES), "PIMA_SLURM_CPUS": "2", "PIMA_SLURMD_TIMEOUT": "10",
           "PIMA_SLURM_CRED_EXPIRE": "10"}
    up = subprocess.run([REPO / "tools/ci/slurm_up.sh"], env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield f"{env['PIMA_SLURM_DIR']}/slurm.conf"
    finally:
        subprocess.run([REPO / "tools/ci/slurm_down.sh", "--quiet"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


from test_slurm import TERMINAL, assert_completed, job_env, read, submit, tail, wait_for  # noqa: E402

# One thread a rank, as torchrun --standalone gives: thread count changes float sums (1e-8).
TWO_NODES = ["-N", str(NODES), "--ntasks-per-node=1", "--cpus-per-task=1"]
TRAIN_OVERRIDES = " ".join(map(str, TRAIN[4:]))


@pytest.mark.parametrize("launch", ["torchrun", "srun", "mpi"])
def test_sbatch_on_two_nodes_equals_one_node(slurm_two_nodes, tmp_path, two_ranks_one_node, launch):
    """`sbatch -N 2 slurm/train_lattice.sh` with each launch mode: one rank per node, and the run is
    bitwise the 2-rank run of one node."""
    if launch == "mpi" and not MPIEXEC.exists():
        pytest.skip("mpiexec not installed beside the interpreter (pip install mpich mpi4py)")
    log = tmp_path / "job.out"
    env = job_env(slurm_two_nodes, PIMA_CONFIG="configs/digits.yaml", PIMA_RUN_DIR=str(tmp_path / "run"),
                  PIMA_LAUNCH=launch, PIMA_OVERRIDES=TRAIN_OVERRIDES)
    job, _ = submit([*TWO_NODES, "-o", str(log), "slurm/train_lattice.sh"], env)
    info = wait_for(job, env, log, timeout=300)
    assert_completed(job, info, log)
    assert info["NodeList"] == "pima-node[0-1]" and " on pima-node0 pima-node1; " in read(log), tail(log)
    check_same_training(tmp_path / "run", two_ranks_one_node)


LONG = ["train.epochs=12", "crossmodal.epochs=1", "train.progress=false", "figures=false",
        "logging.tensorboard=false"]


def test_a_node_failure_requeues_the_job_and_it_resumes_exactly(slurm_two_nodes, tmp_path):
    """Node 1 dies mid-run (every process on it, slurmd too): rank 0 stops with one line, slurmctld
    sets the node DOWN and requeues the job (NODE_FAIL, --requeue); once the node is back the job
    runs again, resumes from the last finished epoch, and ends exactly as a run never interrupted."""
    reference = tmp_path / "uninterrupted"
    single = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "pima_hpc", "train",
                             str(REPO / "configs/digits.yaml"), *LONG, f"run_dir={reference}"],
                            env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, fail_message(single)

    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    env = job_env(slurm_two_nodes, PIMA_CONFIG="configs/digits.yaml", PIMA_RUN_DIR=str(run_dir),
                  PIMA_LAUNCH="srun", PIMA_OVERRIDES=" ".join(LONG))
    job, _ = submit([*TWO_NODES, "-o", str(log), "slurm/train_lattice.sh"], env)
    info = wait_for(job, env, log, timeout=300,
                    until=lambda info, text: " epoch 3/12 " in text or info["JobState"] in TERMINAL)
    assert info["JobState"] == "RUNNING", tail(log)
    kill_node(1)
    info = wait_for(job, env, log, timeout=120, until=lambda info, text: info["Restarts"] == "1")
    first = read(log)
    assert f"{LOST} in the multimodal stage" in first and "[rank0]: Traceback" not in first, tail(log, 120)
    assert "DUE TO NODE FAILURE" in first, tail(log, 120)

    restart = subprocess.run([ON_NODE, "1", "slurmd", "-f", slurm_two_nodes], capture_output=True, text=True)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    info = wait_for(job, env, log, timeout=300)
    assert_completed(job, info, log)
    second = read(log)[len(first):]
    assert "(restart 1) on pima-node0 pima-node1" in second and "resumed from" in second, tail(log, 120)
    assert " epoch 1/12 " not in second, f"the requeued run started over\n{tail(log, 120)}"
    assert untimed_metrics(run_dir) == untimed_metrics(reference)


def test_tune_runs_a_trial_across_two_nodes(slurm_two_nodes, tmp_path):
    """`sbatch -N 2 slurm/tune.sh`: a Ray head on node 0 and a worker on node 1, and `pima tune`
    runs a DDP trial of 2 workers x 2 CPUs, which only fits on both nodes (2 CPUs each)."""
    log, sweep = tmp_path / "job.out", tmp_path / "sweeps"
    env = job_env(slurm_two_nodes, PIMA_CONFIG="configs/tune_digits.yaml",
                  PIMA_OVERRIDES=f"num_samples=1 workers_per_trial=2 cpus_per_worker=2 train.epochs=1 "
                                 f"storage_path={sweep} name=ci")
    job, _ = submit(["-N", str(NODES), "--cpus-per-task=2", "-o", str(log), "slurm/tune.sh"], env)
    info = wait_for(job, env, log, timeout=600)
    text = read(log)
    assert "Ray cluster up: 2 node(s)" in text and "starting a Ray worker on pima-node1" in text, tail(log)
    assert "connecting to the Ray cluster at 10.77.0.1:" in text, tail(log)
    assert_completed(job, info, log)
    rows = (sweep / "ci" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and ",done," in rows[1], rows
    assert "world_size                          2" in text or "'world_size': 2" in text, tail(log)
