"""The torch.distributed and MPI collectives: in-process with a simulated communicator, then for
real under torchrun and mpiexec (tests/dist_workers/sum_worker.py is the worker).

The multi-process tests check what the EM and least-squares sums rely on: the result equals
the sum of every rank's data added in rank order, bitwise, on every rank; a misconfigured MPI
world is refused; a dead rank makes the others fail within a bounded time instead of hanging.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pima_hpc.distributed import DistributedSetupError, MPICollective, mpi4py_available
from pima_hpc.distributed.collectives import _pack

WORKERS = Path(__file__).parent / "dist_workers"
SUM_WORKER = WORKERS / "sum_worker.py"
sys.path.insert(0, str(WORKERS))
from sum_worker import expected_sums, rank_data  # noqa: E402

BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"
MPIEXEC = BIN / "mpiexec"
LAUNCH_TIMEOUT = 90  # seconds: generous for a loaded 2-core machine; a hang fails, not blocks

needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun not installed beside {sys.executable}")
needs_mpi = pytest.mark.skipif(not (MPIEXEC.exists() and mpi4py_available()),
                               reason=f"mpiexec (beside {sys.executable}) or mpi4py not installed")


# ----------------------------------------------------------------------------------------------- in process

class SimulatedComm:
    """Rank ``rank`` of a world whose other ranks send ``rank_data``: Allgather fills their rows."""

    def __init__(self, rank: int, size: int, other_arrays=None):
        self.rank, self.size = rank, size
        self.other_arrays = other_arrays or (lambda r: rank_data(r))

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Allgather(self, send, recv):
        for r in range(self.size):
            recv[r] = send if r == self.rank else _pack(self.other_arrays(r))[0]


@pytest.mark.parametrize("world", [1, 3, 5])
def test_mpi_collective_sums_in_rank_order(world):
    for rank in range(world):
        coll = MPICollective(SimulatedComm(rank, world))
        data = rank_data(rank)
        out = coll.allreduce_sum(data)
        for got, want, given in zip(out, expected_sums(world), data):
            assert got.dtype == np.float64 and got.shape == np.shape(given)
            assert got.tobytes() == want.tobytes()
            assert not np.shares_memory(got, given)
    if world == 3:
        # The planted array: rank order gives 0, another order would give 1.
        assert expected_sums(3)[-1].tolist() == [0.0, 0.0, 0.0]


def test_mismatched_shapes_name_the_ranks():
    coll = MPICollective(SimulatedComm(0, 3, lambda r: [np.ones((3, 2)) if r == 2 else np.ones((2, 3))]))
    with pytest.raises(RuntimeError, match=r"rank 0 passed arrays of shapes \[\(2, 3\)\] but rank\(s\) \[2\]"):
        coll.allreduce_sum([np.ones((2, 3))])


def test_bad_inputs():
    coll = MPICollective(SimulatedComm(0, 2))
    assert coll.allreduce_sum([]) == []
    with pytest.raises(TypeError, match="array 1 has dtype complex128"):
        coll.allreduce_sum([np.ones(2), np.ones(2, dtype=complex)])
    with pytest.raises(TypeError, match="dtype object"):
        coll.allreduce_sum([np.array(["a", None], dtype=object)])
    with pytest.raises(ValueError, match="root must be in"):
        coll.broadcast_object(1, root=2)


def test_mpi_world_size_mismatch_is_refused_in_process():
    with pytest.raises(DistributedSetupError) as err:
        MPICollective(SimulatedComm(0, 1), expected_world_size=2, expected_rank=1, launcher="torchrun")
    msg = str(err.value)
    assert "MPI.COMM_WORLD has size 1" in msg and "torch world has size 2" in msg
    assert "torchrun" in msg and "mpiexec -n 2" in msg and "collective=torch" in msg


# ----------------------------------------------------------------------------------------------- multi-process

def clean_env() -> dict:
    """This environment minus any launcher's variables (pytest itself may run under srun)."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "GLOO_SOCKET_IFNAME")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "TORCHELASTIC_",
                                                  "HYDRA_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list, timeout=LAUNCH_TIMEOUT, env=None) -> tuple[subprocess.CompletedProcess, float]:
    """Run a launcher in its own session so a hang kills the launcher AND its workers."""
    start = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], env=env or clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start


def check_sums(out: Path, world: int, collective: str, launcher: str) -> None:
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    results = [np.load(out / f"rank{r}.npz") for r in range(world)]
    want = expected_sums(world)
    for r, info in enumerate(infos):
        assert (info["rank"], info["world_size"], info["launcher"], info["collective"]) == \
            (r, world, launcher, collective)
        assert (info["coll_rank"], info["coll_world"], info["is_root"]) == (r, world, r == 0)
        assert info["broadcast"] == {"from": world - 1, "payload": [1, 2.5, "x"]}
        # Rank 0 passed (2, 3), the others (3, 2): each names the ranks that disagree with it.
        disagree = list(range(1, world)) if r == 0 else [0]
        assert f"but rank(s) {disagree} passed different shapes" in info["mismatch"]["exact"]
        assert "another rank passed different shapes" in info["mismatch"]["fast"]
    for i, w in enumerate(want):
        for r in range(world):
            got = results[r][f"exact_{i}"]
            # Exact mode: the rank-order sum, bitwise, on every rank.
            assert got.shape == w.shape and got.tobytes() == w.tobytes(), (i, r)
            fast = results[r][f"fast_{i}"]
            if i == len(want) - 1:  # planted cancellation: any order is within 2 ulp(1e16)-ish
                np.testing.assert_allclose(fast, w, atol=2.0)
            else:
                np.testing.assert_allclose(fast, w, rtol=1e-12, atol=0)


def fail_message(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@needs_torchrun
def test_torchrun_two_ranks(tmp_path):
    proc, _ = launch([TORCHRUN, "--standalone", "--nproc_per_node=2", SUM_WORKER, "--out", tmp_path])
    assert proc.returncode == 0, fail_message(proc)
    check_sums(tmp_path, 2, "TorchCollective", "torchrun")


@needs_mpi
@pytest.mark.parametrize("ranks, collective, expect", [(3, "auto", "MPICollective"),
                                                       (2, "torch", "TorchCollective")])
def test_mpiexec(tmp_path, ranks, collective, expect):
    # Three ranks under MPI make the planted sum order-dependent; torch over an MPI-agreed rendezvous
    # checks the mpirun path without MASTER_ADDR/MASTER_PORT.
    proc, _ = launch([MPIEXEC, "-n", ranks, sys.executable, SUM_WORKER, "--out", tmp_path,
                      "--collective", collective])
    assert proc.returncode == 0, fail_message(proc)
    check_sums(tmp_path, ranks, expect, "mpirun")


@needs_torchrun
@needs_mpi
def test_forced_mpi_under_torchrun_is_refused(tmp_path):
    # mpi4py under torchrun initialises a singleton world per process: size 1 against torch's 2.
    proc, elapsed = launch([TORCHRUN, "--standalone", "--nproc_per_node=2", SUM_WORKER, "--out", tmp_path,
                            "--collective", "mpi", "--timeout", "60"])
    assert proc.returncode != 0
    err = proc.stderr
    assert "DistributedSetupError: MPI world size mismatch" in err, fail_message(proc)
    assert "MPI.COMM_WORLD has size 1" in err and "torch world has size 2" in err
    assert "launcher detected: torchrun" in err and "mpiexec -n 2" in err
    assert not list(tmp_path.glob("rank*.npz"))  # no sum was ever produced
    assert elapsed < 50  # refused before the rendezvous, which would wait up to the 60 s timeout


def slurm_env() -> dict:
    env = clean_env()
    if "SLURM_CONF" in os.environ:  # a private cluster's config (e.g. tools/ci/slurm_up.sh)
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return env


@functools.lru_cache(maxsize=None)
def slurm_skip_reason() -> str:
    """'' when a Slurm cluster with this host as a node answers, else why the srun tests skip."""
    if not shutil.which("srun"):
        return "srun not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %a"], env=slurm_env(), capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "sinfo did not answer"
    if proc.returncode != 0:
        return f"no reachable Slurm cluster (sinfo: {(proc.stderr.strip().splitlines() or ['?'])[-1]})"
    # The workers write into this host's tmp_path: run only where this host is itself a node.
    if not any(line.split() == [socket.gethostname(), "up"] for line in proc.stdout.splitlines()):
        return f"this host ({socket.gethostname()}) is not an up Slurm node"
    return ""


@pytest.mark.parametrize("mpi, expect", [("none", "TorchCollective"), ("pmi2", "MPICollective")])
def test_srun_two_ranks(tmp_path, mpi, expect):
    """Real srun: one task per rank; with --mpi=pmi2 the MPI collective is chosen and its world matches."""
    if slurm_skip_reason():
        pytest.skip(slurm_skip_reason())
    if mpi == "pmi2" and not mpi4py_available():
        pytest.skip("mpi4py not installed")
    proc, _ = launch(["srun", "--immediate=60", f"--nodelist={socket.gethostname()}", "-n", 2,
                      "--cpus-per-task=1", f"--mpi={mpi}", sys.executable, SUM_WORKER, "--out", tmp_path],
                     env=slurm_env())
    if proc.returncode != 0 and "Unable to allocate resources" in proc.stderr:
        pytest.skip(f"Slurm cluster busy: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode != 0 and f"Invalid MPI type '{mpi}'" in proc.stderr:
        pytest.skip(f"this Slurm has no --mpi={mpi} plugin")
    assert proc.returncode == 0, fail_message(proc)
    check_sums(tmp_path, 2, expect, "srun")


def spawn_ranks(rank_envs: list[dict], args: list[str]) -> tuple[list[int], list[str], float]:
    """Start one worker per environment ourselves (no launcher to clean up after a failure)."""
    procs, start = [], time.monotonic()
    for env in rank_envs:
        procs.append(subprocess.Popen([sys.executable, str(SUM_WORKER), *map(str, args)], env=dict(clean_env(), **env),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=LAUNCH_TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], errs, time.monotonic() - start


def test_srun_style_two_ranks(tmp_path):
    """The srun path (tcp:// rendezvous on the nodelist's first host) with Slurm's variables faked."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "0",
             "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "127.0.0.1", "MASTER_PORT": str(free_port())}
    codes, errs, _ = spawn_ranks([dict(slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)) for r in range(2)],
                                 ["--out", tmp_path])
    assert codes == [0, 0], errs
    check_sums(tmp_path, 2, "TorchCollective", "srun")


@pytest.mark.parametrize("die_at, timeout_s, bound", [("collective", 20, 60), ("setup", 8, 60)])
def test_dead_rank_fails_the_survivor(tmp_path, die_at, timeout_s, bound):
    """No launcher to kill the survivor: it must fail by itself (peer reset or timeout_s)."""
    port = free_port()
    envs = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for r in range(2)]
    codes, errs, elapsed = spawn_ranks(envs, ["--out", tmp_path, "--die-rank", 1, "--die-at", die_at,
                                              "--timeout", timeout_s])
    assert codes[1] == 1
    # The survivor raised (exit 1): it was not killed by a signal (negative) and did not hang.
    assert codes[0] == 1, errs[0][-3000:]
    assert elapsed < bound
    if die_at == "setup":
        assert "timed out" in errs[0].lower(), errs[0][-3000:]
        assert elapsed >= timeout_s - 1  # it really waited for the peer, up to the timeout
    else:
        assert "distributed: launcher=torchrun" in errs[0]  # joined, then failed in the collective
        assert "all_gather" in errs[0], errs[0][-3000:]
    assert not list(tmp_path.glob("rank*.npz"))


def test_raising_rank_exits_promptly_through_finally(tmp_path):
    """A rank that raises runs shutdown() from ``finally``: it must not wait at the barrier for
    peers stuck in another collective (that would hide its error until the timeout)."""
    port = free_port()
    envs = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for r in range(2)]
    codes, errs, elapsed = spawn_ranks(envs, ["--out", tmp_path, "--raise-rank", 1, "--timeout", 60])
    assert codes == [1, 1], errs
    assert "RuntimeError: planted failure on rank 1" in errs[1]
    assert elapsed < 45  # well under the 60 s collective timeout (loaded machines import slowly)


@needs_mpi
def test_dead_rank_under_mpiexec(tmp_path):
    proc, elapsed = launch([MPIEXEC, "-n", 2, sys.executable, SUM_WORKER, "--out", tmp_path,
                            "--die-rank", "1", "--timeout", "20"])
    assert proc.returncode != 0
    assert "distributed: launcher=mpirun" in proc.stderr, fail_message(proc)  # joined before rank 1 died
    assert elapsed < 60
    assert not list(tmp_path.glob("rank*.npz"))
