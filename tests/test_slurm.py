"""End-to-end tests of the Slurm batch scripts (slurm/*.sh) on a real Slurm cluster.

They submit the scripts exactly as a user does (``sbatch slurm/train_lattice.sh`` from the
repository root, settings through PIMA_* variables and sbatch flags) and check what a user
would: the job's final state in ``scontrol show job``, its log, and the run directory.

Needs a cluster: ``tools/ci/slurm_up.sh`` starts a single-node one and writes
``$PIMA_SLURM_DIR/env.sh`` (default /tmp/pima-slurm), which these tests read when SLURM_CONF
is not set. Without one they skip, saying why; with PIMA_REQUIRE_SLURM=1 (set by .ci/run)
they fail instead. Each job's log is in the test's tmp_path and is quoted on failure.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("PIMA_SLURM_DIR", "/tmp/pima-slurm"))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
# Small, fast training: a few seconds an epoch on two CPU cores.
QUICK = "train.epochs=1 crossmodal.epochs=1 train.progress=false"
MNIST_CANDIDATES = [os.environ.get("PIMA_MNIST_DIR", ""), ROOT.parent / "shared/data/mnist",
                    "/work/shared/data/mnist"]


# ---------------------------------------------------------------------------------------------
# The cluster


def _slurm_conf() -> str | None:
    if os.environ.get("SLURM_CONF"):
        return os.environ["SLURM_CONF"]
    env_file = SLURM_DIR / "env.sh"
    if env_file.is_file():
        m = re.search(r"^export SLURM_CONF=(\S+)$", env_file.read_text(), re.M)
        if m:
            return m.group(1)
    return None


def _unavailable_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not installed: start the test cluster with tools/ci/slurm_up.sh"
    conf = _slurm_conf()
    if conf is None or not Path(conf).is_file():
        return (f"no Slurm cluster: SLURM_CONF is unset and {SLURM_DIR}/env.sh is missing; "
                "start one with tools/ci/slurm_up.sh")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env={**os.environ, "SLURM_CONF": conf},
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 30 s (SLURM_CONF={conf}); is slurmctld running?"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*~#").startswith(("idle", "mix", "alloc")) for s in states):
        return (f"the Slurm cluster of {conf} is not up (sinfo: {(out.stdout + out.stderr).strip()!r}); "
                "restart it with tools/ci/slurm_up.sh")
    return None


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    reason = _unavailable_reason()
    if reason:
        if os.environ.get("PIMA_REQUIRE_SLURM") == "1":
            pytest.fail(f"PIMA_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    return _slurm_conf()


def _venv() -> str:
    """The venv the jobs use: the one running the tests, else the checkout's .venv."""
    return sys.prefix if sys.prefix != sys.base_prefix else str(ROOT / ".venv")


def job_env(slurm_conf: str, **settings: str) -> dict[str, str]:
    """The environment sbatch passes to the job: ours minus anything that would steer the
    scripts or the trainer (stray PIMA_*/SBATCH_*/rank variables), plus ``settings``."""
    drop = ("PIMA_", "SBATCH_", "SLURM_", "SRUN_", "SALLOC_", "TORCHELASTIC_", "PMI_", "OMPI_")
    ranks = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "OMP_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in ranks}
    env.update(SLURM_CONF=slurm_conf, PIMA_VENV=_venv(), **settings)
    return env


# ---------------------------------------------------------------------------------------------
# Jobs


def submit(args: list[str], env: dict[str, str], wait: bool = False, timeout: float = 600) -> tuple[str, int]:
    """``sbatch --parsable ARGS`` from the repository root; returns (job id, sbatch's exit code).

    With ``wait`` this is ``sbatch --wait``: it returns when the job has ended, with the job's
    exit code.
    """
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + args
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    m = re.match(r"(\d+)", out.stdout.strip())
    assert m, f"{' '.join(cmd)} did not submit (exit {out.returncode}): {out.stdout}{out.stderr}"
    return m.group(1), out.returncode


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job_id: str, env: dict[str, str], log: Path, until=None, timeout: float = 600) -> dict:
    """Poll ``scontrol show job`` (faster than sbatch --wait's growing sleeps) until the job
    ends, or until ``until(info, log_text)`` is true. Cancels the job on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id, env)
        if until is not None:
            if until(info, read(log)):
                return info
        elif info["JobState"] in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    pytest.fail(f"job {job_id} still {info['JobState']} after {timeout:.0f} s; cancelled it.\n{tail(log)}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def tail(log: Path, n: int = 60) -> str:
    lines = read(log).splitlines()
    return f"--- last {min(n, len(lines))} lines of {log} ---\n" + "\n".join(lines[-n:])


def assert_completed(job_id: str, info: dict, log: Path) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"job {job_id} ended {info['JobState']} with exit code {info['ExitCode']}\n{tail(log)}")


def assert_run_outputs(run_dir: Path, log: Path) -> dict:
    """A finished run directory: metrics.json with test results, a checkpoint, PNG figures."""
    assert (run_dir / "metrics.json").is_file(), f"no metrics.json in {run_dir}\n{tail(log)}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(isinstance(v, dict) and "test" in v for v in metrics.values()), sorted(metrics)
    assert list((run_dir / "checkpoints").glob("*.pt")), f"no checkpoint in {run_dir}/checkpoints"
    pngs = list((run_dir / "figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs), f"figures: {pngs}"
    return metrics


# ---------------------------------------------------------------------------------------------
# Always: the scripts parse


SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "slurm").rglob("*.sh"),
                                                     *(ROOT / "tools/ci").glob("*.sh"), ROOT / ".ci/run"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_scripts_refuse_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIMA_"))}
    out = subprocess.run(["bash", str(ROOT / "slurm/train_lattice.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "submit this script with sbatch" in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------
# The cluster itself (tells a broken cluster from a broken script)


def test_cluster_runs_a_two_task_step(slurm_conf, tmp_path):
    env = job_env(slurm_conf)
    log = tmp_path / "job.out"
    job, _ = submit(["-n", "2", "-o", str(log), "--wrap",
                     'srun bash -c "echo task=\\$SLURM_PROCID host=\\$(hostname -s)"'], env)
    info = wait_for(job, env, log, timeout=120)
    assert_completed(job, info, log)
    tasks = sorted(re.findall(r"task=(\d)", read(log)))
    assert tasks == ["0", "1"], tail(log)


# ---------------------------------------------------------------------------------------------
# Lattice


def _need(path: str) -> None:
    """The project's own files are never a reason to skip: a missing one is a failure."""
    assert (ROOT / path).is_file(), f"{path} is missing from this checkout"


def build_lattice_job(slurm_conf, directory: Path, *args: str) -> Path:
    """Build a lattice data set with the data job (slurm/build_data.sh) and return its path."""
    _need("configs/lattice.yaml")
    out, log = directory / "lattice.h5", directory / "build.out"
    env = job_env(slurm_conf)
    job, rc = submit(["-o", str(log), "slurm/build_data.sh", "lattice", *args, "--out", str(out), "--quiet"],
                     env, wait=True)
    info = job_info(job, env)
    assert rc == 0, f"build_data.sh job {job}: sbatch --wait exited {rc}\n{tail(log)}"
    assert_completed(job, info, log)
    assert out.is_file(), tail(log)
    return out


@pytest.fixture(scope="module")
def lattice_data(slurm_conf, tmp_path_factory) -> Path:
    """A small lattice data set for the launch, requeue and resume tests."""
    return build_lattice_job(slurm_conf, tmp_path_factory.mktemp("lattice"), "--n", "8", "--size", "48")


@pytest.fixture(scope="module")
def lattice_accuracy_data(slurm_conf, tmp_path_factory) -> Path:
    """A lattice set big enough to score topology (40 specimens: 8 held out, 96 test images), small images."""
    return build_lattice_job(slurm_conf, tmp_path_factory.mktemp("lattice_acc"), "--n", "40", "--size", "48",
                             "--seed", "1")


def test_train_lattice(slurm_conf, lattice_accuracy_data, tmp_path):
    """`sbatch --wait slurm/train_lattice.sh` with the defaults (torchrun, one worker) finds the topologies.

    The shipped config (scale-free strain-hardening expert) with fewer epochs; measured 100 / 99-100 / 100 %
    (multimodal latent read-out / image only / curve only) on 3 training seeds of this data, ~11 s each.
    """
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = job_env(slurm_conf, PIMA_DATA=str(lattice_accuracy_data), PIMA_RUN_DIR=str(run_dir),
                  PIMA_OVERRIDES="train.epochs=6 crossmodal.epochs=8 train.progress=false")
    t0 = time.monotonic()
    job, rc = submit(["-o", str(log), "slurm/train_lattice.sh"], env, wait=True)
    info = job_info(job, env)
    assert rc == 0, f"sbatch --wait exited {rc} for job {job}\n{tail(log)}"
    assert_completed(job, info, log)
    assert info["JobName"] == "pima-lattice" and info["Requeue"] == "1", info
    text = read(log)
    assert "srun torchrun: 1 node(s) x 1 worker(s)" in text, tail(log)
    assert "done (exit status 0)" in text and "Traceback" not in text, tail(log)
    metrics = assert_run_outputs(run_dir, log)
    accuracy = {k: metrics[k]["test"]["accuracy"] for k in ("multimodal", "crossmodal_image", "crossmodal_curve")}
    assert accuracy["multimodal"] >= 0.95 and accuracy["crossmodal_curve"] >= 0.95, accuracy
    assert accuracy["crossmodal_image"] >= 0.9, accuracy
    print(f"train_lattice.sh job {job}: {time.monotonic() - t0:.0f} s, test accuracy {accuracy}")


# (PIMA_LAUNCH, sbatch flags, PIMA_NPROC, what the script logs): two ranks each way.
LAUNCHES = {
    "torchrun": ("torchrun", [], "2", "1 node(s) x 2 worker(s)"),
    "srun": ("srun", ["--ntasks-per-node=2", "--cpus-per-task=1"], None, "srun: 2 rank(s) on 1 node(s)"),
    "mpi": ("mpi", ["--ntasks-per-node=2", "--cpus-per-task=1"], None, "mpiexec: 2 rank(s) on 1 node(s)"),
}


@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_train_lattice_two_ranks(slurm_conf, lattice_data, tmp_path, launch):
    mode, flags, nproc, banner = LAUNCHES[launch]
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    settings = dict(PIMA_LAUNCH=mode, PIMA_DATA=str(lattice_data), PIMA_RUN_DIR=str(run_dir),
                    PIMA_OVERRIDES=QUICK)
    if nproc:
        settings["PIMA_NPROC"] = nproc
    env = job_env(slurm_conf, **settings)
    job, _ = submit(flags + ["-o", str(log), "slurm/train_lattice.sh", "figures=false"], env)
    info = wait_for(job, env, log, timeout=600)
    assert_completed(job, info, log)
    text = read(log)
    assert banner in text, tail(log)
    assert re.search(r"world=2\b", text), f"the trainer did not run on 2 ranks\n{tail(log)}"
    assert (run_dir / "metrics.json").is_file(), tail(log)


# A run long enough to be signalled mid-way (tenths of a second an epoch), on the bundled
# digits (no data to build).
LONG_EPOCHS = 60
LONG = f"train.epochs={LONG_EPOCHS} crossmodal.epochs=1 train.progress=false figures=false"


def _start_long_run(slurm_conf, tmp_path, flags, **settings):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = job_env(slurm_conf, PIMA_CONFIG="configs/digits.yaml", PIMA_RUN_DIR=str(run_dir),
                  PIMA_OVERRIDES=LONG, **settings)
    job, _ = submit(flags + ["-o", str(log), "slurm/train_lattice.sh"], env)
    info = wait_for(job, env, log, timeout=300,
                    until=lambda info, text: f"epoch 2/{LONG_EPOCHS}" in text or info["JobState"] in TERMINAL)
    assert info["JobState"] == "RUNNING", f"job {job} is {info['JobState']}, not training\n{tail(log)}"
    return job, env, run_dir, log


@pytest.mark.parametrize("launch", ["torchrun", "srun"])
def test_requeue_resumes(slurm_conf, tmp_path, launch):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit):
    the ranks checkpoint and exit 75, the job requeues itself, and the second run resumes
    from the run directory and finishes. torchrun reports its workers' 75 as a failure (the
    script requeues on the forwarded signal); srun passes the 75 through."""
    if launch == "torchrun":
        flags, settings = [], {"PIMA_NPROC": "2"}
    else:
        flags, settings = ["--ntasks-per-node=2", "--cpus-per-task=1"], {"PIMA_LAUNCH": "srun"}
    job, env, run_dir, log = _start_long_run(slurm_conf, tmp_path, flags, **settings)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
    info = wait_for(job, env, log, timeout=600)
    text = read(log)
    assert "received SIGUSR1" in text and "requeueing job" in text, tail(log, 120)
    assert info["Restarts"] == "1", f"job {job} restarted {info['Restarts']} times\n{tail(log, 120)}"
    assert_completed(job, info, log)
    second = text[text.index("(restart 1)"):]
    assert "resumed from" in second, f"the requeued run did not resume\n{tail(log, 120)}"
    assert f"epoch 1/{LONG_EPOCHS} " not in second, f"the requeued run started over\n{tail(log, 120)}"
    assert (run_dir / "metrics.json").is_file(), tail(log, 120)


def test_scancel_is_not_undone_by_a_requeue(slurm_conf, tmp_path):
    """scancel sends SIGTERM: the trainer checkpoints and exits 75, but the job stays cancelled
    (`scontrol requeue` would succeed on a job being cancelled, so the script must not call it)."""
    job, env, run_dir, log = _start_long_run(slurm_conf, tmp_path, [])
    subprocess.run(["scancel", job], env=env, check=True, timeout=30)
    info = wait_for(job, env, log, timeout=120)
    time.sleep(3)  # a wrongly requeued job would show up as PENDING again by now
    info = job_info(job, env)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), f"{info}\n{tail(log)}"
    assert "does not requeue it" in read(log), tail(log)
    assert list((run_dir / "checkpoints").glob("*.pt")), "no checkpoint kept for a resubmission"


def test_bad_config_fails_fast_and_clearly(slurm_conf, tmp_path):
    log = tmp_path / "job.out"
    env = job_env(slurm_conf, PIMA_CONFIG="configs/no-such.yaml", PIMA_RUN_DIR=str(tmp_path / "run"))
    job, _ = submit(["-o", str(log), "slurm/train_lattice.sh"], env)
    info = wait_for(job, env, log, timeout=120)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    assert "config 'configs/no-such.yaml' not found" in read(log), tail(log)


# ---------------------------------------------------------------------------------------------
# MNIST (the real IDX files, where the machine has them)


def idx_head(src: Path, dst: Path, n: int) -> None:
    """Write the first ``n`` records of a gzipped IDX file to ``dst`` (uncompressed), with the
    record count in its header corrected: a small but real slice of MNIST."""
    with gzip.open(src, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        ndim = magic & 0xFF
        dims = f.read(4 * (ndim - 1))
        record = math.prod(struct.unpack(f">{ndim - 1}I", dims)) if ndim > 1 else 1
        assert magic >> 8 == 0x08, f"{src}: not an unsigned-byte IDX file"
        body = f.read(min(n, count) * record)
    dst.write_bytes(struct.pack(">II", magic, min(n, count)) + dims + body)


@pytest.fixture(scope="module")
def mnist_idx(tmp_path_factory) -> Path:
    """The first 3000 training and 600 test digits of the real MNIST files.

    The whole set trains for minutes per epoch on two cores and the trainer has no subset
    option, so the test slices the files instead."""
    for c in MNIST_CANDIDATES:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").is_file():
            src, dst = Path(c), tmp_path_factory.mktemp("mnist-idx")
            for stem, n in [("train-images-idx3-ubyte", 3000), ("train-labels-idx1-ubyte", 3000),
                            ("t10k-images-idx3-ubyte", 600), ("t10k-labels-idx1-ubyte", 600)]:
                idx_head(src / f"{stem}.gz", dst / stem, n)
            return dst
    pytest.skip("no MNIST IDX files (set PIMA_MNIST_DIR; looked in "
                + ", ".join(str(c) for c in MNIST_CANDIDATES if c) + ")")


def test_train_mnist(slurm_conf, mnist_idx, tmp_path):
    """build_data.sh mnist, then train_mnist.sh on it, chained with --dependency=afterok."""
    _need("configs/mnist.yaml")
    data, run_dir = tmp_path / "mnist.h5", tmp_path / "run"
    build_log, log = tmp_path / "build.out", tmp_path / "job.out"
    env = job_env(slurm_conf)
    build, _ = submit(["-o", str(build_log), "slurm/build_data.sh", "mnist", "--idx-dir", str(mnist_idx),
                       "--out", str(data), "--quiet"], env)
    env = job_env(slurm_conf, PIMA_DATA=str(data), PIMA_RUN_DIR=str(run_dir), PIMA_OVERRIDES=QUICK)
    job, rc = submit([f"--dependency=afterok:{build}", "-o", str(log), "slurm/train_mnist.sh"], env,
                     wait=True, timeout=1200)
    assert_completed(build, job_info(build, env), build_log)
    info = job_info(job, env)
    assert rc == 0, f"sbatch --wait exited {rc} for job {job}\n{tail(log)}"
    assert_completed(job, info, log)
    assert info["JobName"] == "pima-mnist", info
    assert_run_outputs(run_dir, log)


# ---------------------------------------------------------------------------------------------
# Ray Tune


def test_tune_starts_ray_and_runs_pima_tune(slurm_conf, tmp_path):
    """tune.sh brings up Ray inside the allocation and `pima tune` sweeps on it (two tiny trials
    on the bundled digits)."""
    _need("configs/tune_digits.yaml")
    log, sweep = tmp_path / "job.out", tmp_path / "sweeps"
    env = job_env(slurm_conf, PIMA_CONFIG="configs/tune_digits.yaml",
                  PIMA_OVERRIDES=f"num_samples=2 train.epochs=1 storage_path={sweep} name=ci")
    job, _ = submit(["-o", str(log), "slurm/tune.sh"], env)
    info = wait_for(job, env, log, timeout=900)
    text = read(log)
    assert "Ray cluster up: 1 node(s)" in text, tail(log)
    assert "connecting to the Ray cluster at" in text, f"pima tune did not use the job's Ray cluster\n{tail(log)}"
    assert_completed(job, info, log)
    assert (sweep / "ci" / "results.csv").is_file() and (sweep / "ci" / "best_config.yaml").is_file(), tail(log)
