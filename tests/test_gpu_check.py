"""benchmarks/gpu_check.py, the GPU check in one command, run in its CPU mode (--device cpu --quick).

The real check needs a CUDA machine; here the same steps run on CPU with tiny epochs and a tiny
synthetic MNIST, one of them broken on purpose, to show that every section gets real values, that a
failing step is recorded (status, one-line error, log tail) without stopping the steps after it,
and that the exit status says a step failed.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
IDX = {"train-images-idx3-ubyte": 400, "train-labels-idx1-ubyte": 400,
       "t10k-images-idx3-ubyte": 100, "t10k-labels-idx1-ubyte": 100}


def tiny_mnist(d: Path) -> Path:
    """Four gzipped IDX files of random 28x28 images (the curve carries the label, as in MNIST)."""
    rng = np.random.default_rng(0)
    d.mkdir()
    for stem, n in IDX.items():
        arr = (rng.integers(0, 256, (n, 28, 28)) if "images" in stem else np.arange(n) % 10).astype(np.uint8)
        head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (d / f"{stem}.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    return d


def gpu_check(tmp_path: Path, *args, timeout: float = 300):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_quick_cpu_check_records_every_section_and_goes_on_after_a_failure(tmp_path):
    idx = tiny_mnist(tmp_path / "idx")
    proc, r = gpu_check(tmp_path, "--idx-dir", idx, "--mnist-h5", tmp_path / "mnist.h5",
                        "--fail-step", "precision_bf16")
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 1, log  # one step failed
    assert r["summary"]["failed"] == ["precision.bf16"], (r["summary"], log)
    assert r["finished"] and r["device"] == "cpu" and r["quick"] is True

    env = r["environment"]["probe"]
    assert env["status"] == "passed", env
    assert env["torch"] and env["python"] and env["cuda_available"] is False and env["gpu_name"] is None
    assert env["missing_required"] == [] and env["dependencies"]["omegaconf"]

    paths = r["cuda_paths"]
    one, two, cmp = paths["train_1proc"], paths["train_2proc_gloo"], paths["compare_1proc_2proc_gloo"]
    assert one["status"] == "passed" and 0.0 <= one["accuracy"] <= 1.0 and one["samples_per_s"] > 0, one
    assert one["device_used"] == "cpu" and one["metrics_world_size"] == 1
    assert two["status"] == "passed" and two["world_size"] == 2 and two["backend_used"] == "gloo", two
    assert 0.0 <= two["accuracy"] <= 1.0 and two["metrics_world_size"] == 2
    assert cmp["status"] == "passed" and all(cmp["checks"].values()), cmp
    assert cmp["multimodal_accuracy"]["abs_diff"] == pytest.approx(abs(one["accuracy"] - two["accuracy"]))
    assert cmp["compare_metrics"]["identical"] is False  # 1 and 2 ranks differ in the last digits, as expected
    assert paths["train_2proc_nccl"]["status"] == "skipped"

    prec = r["precision"]
    assert prec["fp32"]["status"] == "passed" and prec["fp32"]["accuracy"] == one["accuracy"]
    bf16 = prec["bf16"]
    assert bf16["status"] == "failed" and "no_such_key" in bf16["error"], bf16
    assert "\n" not in bf16["error"] and "no_such_key" in bf16["log_tail"]
    assert prec["tf32"]["status"] == "skipped" and "CUDA" in prec["tf32"]["reason"]

    # the steps after the broken one still ran
    mnist = r["mnist"]
    assert mnist["data"]["status"] == "passed" and (tmp_path / "mnist.h5").is_file(), mnist["data"]
    fp32 = mnist["fp32"]
    assert fp32["status"] == "passed", fp32
    assert fp32["epochs"] == 1 and 0.0 <= fp32["seeds"][0]["final_test_accuracy"] <= 1.0
    assert fp32["reached_99"] in ("0/1", "1/1") and fp32["median_samples_per_s"] > 0


def test_mnist_without_idx_files_is_skipped_not_failed(tmp_path):
    proc, r = gpu_check(tmp_path, "--steps", "mnist", "--no-idx-search", timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert r["mnist"]["data"]["status"] == "skipped"
    assert r["mnist"]["data"]["reason"] == r["mnist"]["note"] == "mnist: skipped (no --idx-dir)"
    assert r["summary"] == {**r["summary"], "failed": [], "ok": True}
    assert r["cuda_paths"] == {"not_run": "left out by --steps"}
