#!/usr/bin/env python
"""The GPU check in one command (issue 13 item 4): environment, CUDA paths, precision, MNIST.

    bash benchmarks/gpu_check.sh [--out gpu_check.json] [--idx-dir DIR]      # on a GPU machine
    bash benchmarks/gpu_check.sh --device cpu --quick                         # its logic, on CPU

(benchmarks/gpu_check.sh picks the interpreter and installs carried wheels, then runs this file;
``python benchmarks/gpu_check.py ...`` with the repository on PYTHONPATH works as well.)

Steps, in this order, each in its own process with its own time limit, each recorded in the one
JSON file (``--out``) after it ends, so a step that fails or hangs is recorded (status, one-line
error, the tail of its log) and the next step still runs:

1. ``environment``: GPU name (torch.cuda.get_device_name), torch / CUDA / cuDNN / NCCL versions,
   driver and memory (nvidia-smi when present), the versions of pima-hpc's dependencies.
2. ``cuda_paths``: ``pima train configs/digits.yaml device=...`` on 1 process, then the same on 2
   processes through ``torchrun --standalone --nproc_per_node 2 -m pima_hpc train`` with half the
   per-rank batch (the same global batch). With one GPU both ranks share it, which NCCL refuses
   ("Duplicate GPU detected"), so that run uses ``dist.backend=gloo`` on CUDA tensors; an NCCL
   2-process run follows only when >= 2 GPUs are visible. Each 2-process run is compared with the
   1-process one: the project's own assertions for 2-rank CLI runs (tests/test_distributed_training.py,
   ``check_cli_run``: world_size 2, multimodal test accuracy >= 0.5, bayes_curve >= 0.99, expert
   slopes within 0.05 of 0..9) on both runs, and the multimodal test accuracies within
   ``--tolerance`` of each other (per-rank BatchNorm makes 2 ranks a slightly different model, so
   exact agreement is not expected; tools/compare_metrics.py's differences are recorded as well).
3. ``precision``: the 1-process digits run again with ``train.precision=bf16`` and ``=tf32``
   (tf32 is CUDA-only: skipped on CPU), against fp32 (the 1-process run of step 2): accuracy
   (the ``multimodal`` read-out), wall time and training samples/s of each.
4. ``mnist``: ``pima data mnist --idx-dir DIR --noise clean --out ...`` builds the HDF5 file, then
   benchmarks/bench_mnist.py measures the time to 99 % test accuracy and samples/s, once per
   ``--mnist-precisions`` entry. Without IDX files: ``mnist: skipped (no --idx-dir)``.

The exit status is 0 when no step failed, 1 otherwise. ``--budget-s`` bounds the whole check: a
step gets at most the time left, and one that cannot get ``MIN_STEP_S`` is skipped as out of time.
``--fail-step NAME`` makes one step fail on purpose (an unknown config key or argument), to show
that the others go on (tests/test_gpu_check.py uses it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_STEP_S = 20  # a step is not started with less time left than this
TAIL_LINES = 25
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_SKIPPED = "mnist: skipped (no --idx-dir)"

# What the environment step reports, run in a child so that a hanging CUDA initialisation is
# bounded by its timeout and this process never holds a CUDA context.
ENV_PROBE = r"""
import importlib, json, os, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
       "cpu_count": os.cpu_count()}
import torch
out["torch"] = torch.__version__
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
try:
    v = torch.cuda.nccl.version()
    out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else v
except Exception as e:
    out["nccl"] = None
    out["nccl_error"] = f"{type(e).__name__}: {e}"[:200]
out["distributed"] = {"available": torch.distributed.is_available(),
                      "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
                      "nccl": torch.distributed.is_available() and torch.distributed.is_nccl_available()}
if out["cuda_available"]:
    try:
        out["device_count"] = torch.cuda.device_count()
        out["gpus"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 2),
                                "multiprocessors": p.multi_processor_count})
        out["gpu_name"] = out["gpus"][0]["name"]
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
        x = torch.ones(256, 256, device="cuda")
        out["matmul_ok"] = float((x @ x).sum().item()) == 256.0 ** 3
    except Exception as e:
        out["cuda_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
else:
    out["device_count"] = 0
    out["gpu_name"] = None
deps = {}
for name in ("numpy", "scipy", "h5py", "omegaconf", "yaml", "sklearn", "matplotlib", "tqdm", "tensorboard",
             "hostlist", "mpi4py"):
    try:
        deps[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:
        deps[name] = None
out["dependencies"] = deps
out["missing_required"] = [n for n in ("numpy", "scipy", "h5py", "omegaconf", "yaml", "sklearn", "matplotlib", "tqdm")
                           if deps[n] is None]
try:
    import pima_hpc.config
    out["pima_hpc"] = os.path.dirname(pima_hpc.__file__)
except Exception as e:
    out["pima_hpc"] = None
    out["pima_hpc_error"] = f"{type(e).__name__}: {e}"[:300]
print("GPU_CHECK_ENV " + json.dumps(out))
"""


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (torchrun and its ranks), SIGKILL 10 s later if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def error_line(text: str, rc) -> str:
    """The one line that says why a command failed: pima's own error line, else the last exception line."""
    # torchrun's own ChildFailedError only says that a rank failed; the rank's exception says why
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "ChildFailedError" not in ln]
    for pattern in (r"^pima: error: ", r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b.*?:", r"\berror\b"):
        hits = [ln for ln in lines if re.search(pattern, ln, flags=re.I if pattern == r"\berror\b" else 0)]
        if hits:
            return hits[-1][:300]
    return f"exit status {rc}" + (f" ({lines[-1][:200]})" if lines else "")


class Check:
    """Runs the steps, keeps the results and writes the JSON after every step."""

    def __init__(self, args):
        self.args = args
        self.py = args.python or sys.executable
        self.device = args.device
        self.work = Path(args.workdir).resolve()
        self.logs = self.work / "logs"
        self.out = Path(args.out).resolve()
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [self.env.get("PYTHONPATH")] if p])
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.pop("PIMA_DEBUG", None)
        self.current: subprocess.Popen | None = None
        self.current_step: tuple[str, str] | None = None
        self.result = {
            "schema": 1, "tool": "benchmarks/gpu_check.py", "started": now(), "finished": None,
            "device": self.device, "quick": args.quick, "argv": sys.argv[1:], "interpreter": self.py,
            "repo": str(ROOT), "workdir": str(self.work),
            "setup": os.environ.get("PIMA_GPU_CHECK_SETUP", "python benchmarks/gpu_check.py (no wrapper)"),
            "pima_command": f"{Path(self.py).name} -m pima_hpc (the `pima` entry point without installing)",
            "environment": {}, "cuda_paths": {}, "precision": {}, "mnist": {},
            "summary": {},
        }
        if self.args.quick:
            self.digits = {"epochs": 2, "crossmodal_epochs": 1}
        else:
            self.digits = {"epochs": args.digits_epochs, "crossmodal_epochs": args.digits_crossmodal_epochs}
        self.result["settings"] = {"digits": self.digits, "budget_s": args.budget_s, "tolerance": args.tolerance,
                                   "threads": self.threads}

    # ------------------------------------------------------------------------------------- plumbing

    @property
    def threads(self) -> int:
        return 1 if self.device == "cpu" and self.args.quick else self.args.threads

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        steps = [(sec, name, rec) for sec in ("environment", "cuda_paths", "precision", "mnist")
                 for name, rec in self.result[sec].items() if isinstance(rec, dict) and "status" in rec]
        by = {s: [f"{sec}.{name}" for sec, name, rec in steps if rec["status"] == s]
              for s in ("passed", "failed", "skipped")}
        self.result["summary"] = {**by, "ok": not by["failed"] and "interrupted" not in self.result, "seconds": round(time.monotonic() - self.start, 1)}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, self.out)

    def broken(self, name: str) -> bool:
        return name in self.args.fail_step

    def command(self, name: str, cmd: list, timeout: float, extra_env: dict | None = None,
                shown: str | None = None) -> dict:
        """Run ``cmd`` in its own process group, output to logs/NAME.log; a record of how it went.

        ``shown``: what the record gives as the command (instead of the whole argument list)."""
        left = self.remaining()
        if left < MIN_STEP_S:
            return {"status": "skipped", "reason": f"out of time: {left:.0f} s of --budget-s {self.args.budget_s} left"}
        limit = max(1.0, min(timeout, left))
        log = self.logs / f"{name}.log"
        env = dict(self.env, **(extra_env or {}))
        rec = {"command": shown or " ".join(map(str, cmd)), "log": str(log), "timeout_s": round(limit)}
        tic = time.monotonic()
        with open(log, "w") as f:
            # its own process group (not session: what outlives us must die with the machine's command)
            group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
            proc = self.current = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **group)
            try:
                rc = proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                stop_group(proc)
                rc = proc.returncode
            finally:
                self.current = None
        rec["seconds"] = round(time.monotonic() - tic, 2)
        rec["returncode"] = rc
        text = log.read_text(errors="replace")
        if timed_out:
            rec.update(status="failed", error=f"timed out after {limit:.0f} s (step limit or --budget-s)")
        elif rc != 0:
            rec.update(status="failed", error=error_line(text, rc))
        else:
            rec["status"] = "passed"
        if rec["status"] != "passed":
            rec["log_tail"] = tail(log)
        return rec

    def step(self, section: str, name: str, fn) -> dict:
        """Run one step; whatever it raises becomes a failed record. Saved at once."""
        print(f"[gpu_check] {section}.{name} ...", flush=True)
        self.current_step = (section, name)
        tic = time.monotonic()
        try:
            rec = fn()
        except Exception as e:  # a step's own bug must not stop the others either
            rec = {"status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            self.result.setdefault("step_exceptions", {})[f"{section}.{name}"] = traceback.format_exc()[-3000:]
        rec.setdefault("seconds", round(time.monotonic() - tic, 2))
        self.result[section][name] = rec
        self.save()
        extra = rec.get("error") or rec.get("reason") or ""
        print(f"[gpu_check] {section}.{name}: {rec['status']} ({rec['seconds']} s) {extra}".rstrip(), flush=True)
        return rec

    # ------------------------------------------------------------------------------------- steps

    def environment(self) -> dict:
        code = ENV_PROBE + ("\nraise SystemExit('deliberate failure (--fail-step environment)')"
                            if self.broken("environment") else "")
        rec = self.command("environment", [self.py, "-c", code], timeout=120,
                           shown=f"{self.py} -c ENV_PROBE (benchmarks/gpu_check.py)")
        text = Path(rec["log"]).read_text(errors="replace") if "log" in rec else ""
        found = [ln for ln in text.splitlines() if ln.startswith("GPU_CHECK_ENV ")]
        if found:
            rec.update(json.loads(found[-1][len("GPU_CHECK_ENV "):]))
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
                rec["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
                rec["driver"] = q.stdout.split(",")[1].strip() if q.returncode == 0 and "," in q.stdout else None
            except (OSError, subprocess.TimeoutExpired) as e:
                rec["nvidia_smi"] = f"failed: {e}"
        else:
            rec["nvidia_smi"] = "not found"
            rec["driver"] = None
        if rec["status"] == "passed" and self.device == "cuda" and not rec.get("cuda_available"):
            rec.update(status="failed", error="device=cuda asked for but this torch sees no CUDA device "
                                              f"(torch {rec.get('torch')}, built for CUDA {rec.get('torch_cuda')})")
        if rec["status"] == "passed" and (rec.get("cuda_error") or rec.get("matmul_ok") is False):
            rec.update(status="failed", error=f"CUDA probe: {rec.get('cuda_error') or 'a 256x256 matmul was wrong'}")
        if rec["status"] == "passed" and rec.get("pima_hpc_error"):
            rec.update(status="failed", error=f"import pima_hpc.config: {rec['pima_hpc_error']}")
        if rec["status"] == "passed" and rec.get("missing_required"):
            rec.update(status="failed", error="missing Python packages: " + ", ".join(rec["missing_required"])
                       + " (carry wheels: see the header of benchmarks/gpu_check.sh)")
        self.env_info = rec
        return rec

    def digits_cmd(self, run: str, world: int, overrides: list, name: str) -> list:
        run_dir = self.work / run
        shutil.rmtree(run_dir, ignore_errors=True)  # a run left there would be resumed, not trained
        batch, xbatch = (64, 32) if world == 1 else (32, 16)  # the config's, split over the ranks
        over = [f"device={self.device}", f"run_dir={run_dir}", f"train.epochs={self.digits['epochs']}",
                f"crossmodal.epochs={self.digits['crossmodal_epochs']}", f"train.batch_size={batch}",
                f"crossmodal.batch_size={xbatch}", "figures=false", "logging.tensorboard=false",
                "train.progress=false", f"threads={self.threads}", *overrides]
        if self.broken(name):
            over.append("no_such_key=1")  # one-line ConfigError, exit 2
        launcher = ([self.py, "-m", "pima_hpc"] if world == 1 else
                    [self.py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                     "-m", "pima_hpc"])
        return [*launcher, "train", "configs/digits.yaml", *over]

    def digits_run(self, name: str, run: str, world: int = 1, overrides=(), timeout=None,
                   extra_env=None) -> dict:
        timeout = timeout or (self.args.step_timeout_s)
        rec = self.command(name, self.digits_cmd(run, world, list(overrides), name), timeout, extra_env)
        rec["run_dir"] = str(self.work / run)
        text = Path(rec["log"]).read_text(errors="replace") if "log" in rec else ""
        m = re.findall(r"single process \(launcher \S+\) on (\S+)", text)
        d = re.findall(r"distributed: launcher=\S+ world=(\d+) backend=(\w+) collective=.*? device=(\S+)", text)
        if m:
            rec["device_used"], rec["backend_used"] = m[-1], None
        if d:
            rec["world_size"], rec["backend_used"], rec["device_used"] = int(d[-1][0]), d[-1][1], d[-1][2]
        metrics_path = self.work / run / "metrics.json"
        if rec["status"] == "passed":
            if not metrics_path.is_file():
                rec.update(status="failed", error=f"exit 0 but no {metrics_path}")
            else:
                rec.update(self.digits_summary(json.loads(metrics_path.read_text())))
                if self.device == "cuda" and not str(rec.get("device_used", "")).startswith("cuda"):
                    rec.update(status="failed", error=f"ran on {rec.get('device_used')!r}, not on CUDA")
        return rec

    @staticmethod
    def digits_summary(m: dict) -> dict:
        hist = [h for h in m.get("history", []) if "stage" not in h]  # the multimodal epochs
        xhist = [h for h in m.get("history", []) if h.get("stage") == "crossmodal"]
        secs = [h["seconds"] for h in hist]
        steady = secs[1:] or secs  # the first epoch warms up (CUDA kernels, allocator)
        n = m["multimodal"]["train"]["n"]
        acc = {k: v["test"]["accuracy"] for k, v in m.items() if isinstance(v, dict) and "test" in v
               and isinstance(v["test"], dict) and "accuracy" in v["test"]}
        return {"accuracy": m["multimodal"]["test"]["accuracy"], "test_accuracy": acc,
                "metrics_world_size": m.get("world_size"),
                "train_seconds": (round(m["wall_seconds_this_process"], 3)
                                  if m.get("wall_seconds_this_process") is not None else None),
                "multimodal_epoch_seconds": [round(s, 4) for s in secs],
                "crossmodal_epoch_seconds_median": round(statistics.median(h["seconds"] for h in xhist), 4)
                if xhist else None,
                "samples_per_s": round(n / statistics.median(steady), 1) if steady else None,
                "n_train": n, "final_train_elbo": hist[-1]["train_elbo"] if hist else None,
                "expert_slopes": sorted(m.get("experts", {}).get("curve", {}).get("slope", []))}

    def compare(self, one: dict, two: dict, name: str) -> dict:
        """2 ranks against 1: the project's 2-rank CLI assertions on both, and agreement within --tolerance."""
        for tag, rec in (("1-process", one), ("2-process", two)):
            if rec.get("status") != "passed":
                return {"status": "skipped", "reason": f"the {tag} run did not pass ({rec.get('status')})"}
        m1 = json.loads((Path(one["run_dir"]) / "metrics.json").read_text())
        m2 = json.loads((Path(two["run_dir"]) / "metrics.json").read_text())
        checks = {}
        for tag, m in (("one", m1), ("two", m2)):
            slopes = sorted(m["experts"]["curve"]["slope"])
            checks[f"{tag}_multimodal_ge_0.5"] = m["multimodal"]["test"]["accuracy"] >= 0.5
            checks[f"{tag}_bayes_curve_ge_0.99"] = m["bayes_curve"]["test"]["accuracy"] >= 0.99
            checks[f"{tag}_slopes_within_0.05"] = max(abs(s - i) for i, s in enumerate(slopes)) <= 0.05
        checks["two_world_size_2"] = m2.get("world_size") == 2
        delta = abs(m2["multimodal"]["test"]["accuracy"] - m1["multimodal"]["test"]["accuracy"])
        checks[f"multimodal_within_{self.args.tolerance}"] = delta <= self.args.tolerance
        if self.broken(name):
            checks["deliberate_failure"] = False
        cmp = subprocess.run([self.py, str(ROOT / "tools" / "compare_metrics.py"),
                              str(Path(one["run_dir"]) / "metrics.json"), str(Path(two["run_dir"]) / "metrics.json")],
                             capture_output=True, text=True, timeout=60)
        diffs = [ln for ln in cmp.stdout.splitlines() if ln.strip()]
        e1, e2 = one.get("final_train_elbo"), two.get("final_train_elbo")
        rec = {"status": "passed" if all(checks.values()) else "failed", "checks": checks,
               "multimodal_accuracy": {"one": m1["multimodal"]["test"]["accuracy"],
                                       "two": m2["multimodal"]["test"]["accuracy"], "abs_diff": delta},
               "bayes_curve_accuracy": {"one": m1["bayes_curve"]["test"]["accuracy"],
                                        "two": m2["bayes_curve"]["test"]["accuracy"]},
               "final_train_elbo": {"one": e1, "two": e2,
                                    "rel_diff": abs(e2 - e1) / max(abs(e1), 1e-3) if None not in (e1, e2) else None},
               "backend": two.get("backend_used"),
               "compare_metrics": {"returncode": cmp.returncode, "identical": cmp.returncode == 0,
                                   "n_differences_shown": len(diffs), "first": diffs[:8],
                                   "note": "1 vs 2 ranks never compare IDENTICAL (per-rank BatchNorm, other "
                                           "rounding); recorded for information, not judged"}}
        if rec["status"] == "failed":
            rec["error"] = "failed checks: " + ", ".join(k for k, v in checks.items() if not v)
        return rec

    def cuda_paths(self) -> None:
        one = self.step("cuda_paths", "train_1proc", lambda: self.digits_run("train_1proc", "digits_1proc"))
        ngpu = getattr(self, "env_info", {}).get("device_count") or 0
        why = ("CPU: gloo is the only backend" if self.device == "cpu" else
               f"{ngpu} GPU(s) visible: both ranks share cuda:0, which NCCL refuses (\"Duplicate GPU detected\"), "
               "so dist.backend=gloo carries the DDP gradients and statistics of CUDA tensors")
        two = self.step("cuda_paths", "train_2proc_gloo", lambda: dict(
            self.digits_run("train_2proc_gloo", "digits_2proc_gloo", world=2, overrides=["dist.backend=gloo"]),
            backend_reason=why))
        self.step("cuda_paths", "compare_1proc_2proc_gloo", lambda: self.compare(one, two, "compare_1proc_2proc_gloo"))
        if self.device == "cuda" and ngpu >= 2:
            nccl = self.step("cuda_paths", "train_2proc_nccl", lambda: dict(
                self.digits_run("train_2proc_nccl", "digits_2proc_nccl", world=2, overrides=["dist.backend=nccl"]),
                backend_reason=f"{ngpu} GPUs visible: one GPU per rank"))
            self.step("cuda_paths", "compare_1proc_2proc_nccl",
                      lambda: self.compare(one, nccl, "compare_1proc_2proc_nccl"))
        else:
            reason = ("device=cpu: NCCL needs CUDA" if self.device == "cpu" else
                      f"{ngpu} GPU visible: NCCL refuses two ranks on one GPU (\"Duplicate GPU detected\"); "
                      "needs >= 2 GPUs")
            self.step("cuda_paths", "train_2proc_nccl", lambda: {"status": "skipped", "reason": reason})

    def precision(self) -> None:
        one = self.result["cuda_paths"].get("train_1proc", {})
        fp32 = {"status": "skipped", "reason": "the fp32 reference is cuda_paths.train_1proc, which did not pass"}
        if one.get("status") == "passed":
            fp32 = {"status": "passed", "same_as": "cuda_paths.train_1proc", "seconds": one["seconds"],
                    **{k: one[k] for k in ("accuracy", "samples_per_s", "train_seconds", "multimodal_epoch_seconds",
                                           "crossmodal_epoch_seconds_median")}}
        self.step("precision", "fp32", lambda: fp32)
        for p in ("bf16", "tf32"):
            name = f"precision_{p}"
            if p == "tf32" and self.device != "cuda":
                self.step("precision", p, lambda: {"status": "skipped", "reason": "tf32 is CUDA-only (the project "
                                                   "raises a ConfigError for train.precision=tf32 on CPU)"})
                continue

            def run(p=p, name=name):
                rec = self.digits_run(name, f"digits_{p}", overrides=[f"train.precision={p}"])
                if rec["status"] == "passed" and fp32.get("status") == "passed":
                    rec["vs_fp32"] = {
                        "accuracy_diff": rec["accuracy"] - fp32["accuracy"],
                        "samples_per_s_ratio": (rec["samples_per_s"] / fp32["samples_per_s"]
                                                if rec.get("samples_per_s") and fp32.get("samples_per_s") else None),
                        "wall_seconds_ratio": rec["seconds"] / fp32["seconds"]}
                return rec
            self.step("precision", p, run)

    def find_idx(self) -> tuple[Path | None, list[str]]:
        if self.args.idx_dir:
            return Path(self.args.idx_dir).resolve(), [self.args.idx_dir]
        if self.args.no_idx_search:
            return None, []
        candidates = [os.environ.get("PIMA_MNIST_DIR"), str(ROOT / "data" / "mnist-idx"),
                      str(ROOT.parent / "shared" / "data" / "mnist"), str(ROOT / "shared" / "data" / "mnist")]
        looked = [c for c in candidates if c]
        for c in looked:
            if all((Path(c) / f).is_file() or (Path(c) / (f + ".gz")).is_file() for f in IDX_FILES):
                return Path(c).resolve(), looked
        return None, looked

    def mnist(self) -> None:
        idx, looked = self.find_idx()
        if idx is None:
            self.step("mnist", "data", lambda: {"status": "skipped", "reason": MNIST_SKIPPED, "looked_in": looked})
            self.result["mnist"]["note"] = MNIST_SKIPPED
            return
        h5 = Path(self.args.mnist_h5).resolve() if self.args.mnist_h5 else ROOT / "data" / "mnist_clean.h5"
        h5.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.py, "-m", "pima_hpc", "data", "mnist", "--idx-dir", idx, "--noise", "clean", "--out", h5,
               "--overwrite", "--quiet"]
        if self.broken("mnist_data"):
            cmd.append("--no-such-option")
        data = self.step("mnist", "data", lambda: dict(self.command("mnist_data", cmd, timeout=300),
                                                       idx_dir=str(idx), h5=str(h5)))
        for p in self.args.mnist_precisions:
            if p == "tf32" and self.device != "cuda":
                self.step("mnist", p, lambda: {"status": "skipped", "reason": "tf32 is CUDA-only"})
                continue
            if data["status"] != "passed":
                self.step("mnist", p, lambda: {"status": "skipped", "reason": "mnist.data did not pass"})
                continue
            self.step("mnist", p, lambda p=p: self.mnist_bench(p, h5))

    def mnist_bench(self, precision: str, h5: Path) -> dict:
        name = f"mnist_{precision}"
        out = self.work / f"{name}.json"
        out.unlink(missing_ok=True)
        sets = [f"device={self.device}", f"train.precision={precision}"]
        if self.args.quick:
            sets += ["train.max_steps_per_epoch=20", "train.precise_bn_batches=4"]
        if self.broken(name):
            sets.append("no_such_key=1")
        epochs = 1 if self.args.quick else self.args.mnist_epochs
        cmd = [self.py, ROOT / "benchmarks" / "bench_mnist.py", "--seeds", *self.args.mnist_seeds,
               "--epochs", epochs, "--threads", self.threads, "--data", h5, "--workdir", self.work / name,
               "--json", out, "--set", *sets]
        rec = self.command(name, cmd, timeout=self.args.mnist_timeout_s)
        rec["epochs"] = epochs
        if rec["status"] == "passed" and out.is_file():
            seeds = json.loads(out.read_text())
            rec["seeds"] = [{k: r[k] for k in ("seed", "epochs_to_99", "seconds_to_99", "final_test_accuracy",
                                               "samples_per_s")}
                            | {"test_accuracy_by_epoch": [e["test_accuracy"] for e in r["log"]]} for r in seeds]
            reached = [r["seconds_to_99"] for r in seeds if r["seconds_to_99"] is not None]
            rec["reached_99"] = f"{len(reached)}/{len(seeds)}"
            rec["median_seconds_to_99"] = statistics.median(reached) if reached else None
            rec["median_samples_per_s"] = statistics.median(r["samples_per_s"] for r in seeds)
            if self.args.quick:
                rec["note"] = ("--quick caps an epoch at 20 steps, but bench_mnist divides the whole split by the "
                               "epoch's time: samples_per_s is not a throughput here, and 1 epoch cannot reach 99 %")
        elif "log" in rec:  # a run cut short: the epochs it printed
            rec["epochs_seen"] = re.findall(r"seed (\d+) epoch (\d+): test ([\d.]+)%\s+\((\d+) s of training\)",
                                            Path(rec["log"]).read_text(errors="replace"))
        return rec

    def interrupted(self, signum, frame) -> None:
        """SIGTERM/SIGINT (a caller's time limit): stop the running step, keep what was measured."""
        if self.current is not None:
            stop_group(self.current)
        self.result["interrupted"] = f"signal {signum} at {now()}"
        section, name = self.current_step or (None, None)
        if section and name not in self.result[section]:
            self.result[section][name] = {"status": "failed", "error": f"interrupted by signal {signum}"}
        self.result["finished"] = now()
        self.save()
        raise SystemExit(1)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.interrupted)
        signal.signal(signal.SIGINT, self.interrupted)
        if self.work.exists():
            shutil.rmtree(self.work)
        self.logs.mkdir(parents=True)
        self.save()
        sections = {"environment": lambda: self.step("environment", "probe", self.environment),
                    "cuda_paths": self.cuda_paths, "precision": self.precision, "mnist": self.mnist}
        for section, fn in sections.items():
            if section in self.args.steps:
                fn()
            else:
                self.result[section]["not_run"] = "left out by --steps"
        self.result["finished"] = now()
        if self.args.logs_tar:
            import tarfile
            with tarfile.open(self.args.logs_tar, "w:gz") as tar:
                tar.add(self.logs, arcname="gpu_check_logs")
            self.result["logs_tar"] = str(Path(self.args.logs_tar).resolve())
        self.save()
        s = self.result["summary"]
        print(f"[gpu_check] {len(s['passed'])} passed, {len(s['failed'])} failed, {len(s['skipped'])} skipped "
              f"in {s['seconds']} s; wrote {self.out}", flush=True)
        for name in s["failed"]:
            sec, step = name.split(".", 1)
            print(f"[gpu_check] FAILED {name}: {self.result[sec][step].get('error')}", flush=True)
        return 0 if s["ok"] else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON file written (default gpu_check.json)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny epochs everywhere (the CPU test of this script)")
    p.add_argument("--logs-tar", default=None, metavar="PATH.tar.gz",
                   help="also pack every step's log into this file (e.g. $OUT/gpu_check_logs.tar.gz on the device)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "gpu_check"),
                   help="run directories and logs (emptied first; default runs/gpu_check)")
    p.add_argument("--idx-dir", default=None, help="the four MNIST IDX files (gzipped or not); default: the first of "
                   "$PIMA_MNIST_DIR, data/mnist-idx, ../shared/data/mnist that holds them")
    p.add_argument("--no-idx-search", action="store_true", help="no --idx-dir: skip MNIST instead of searching")
    p.add_argument("--mnist-h5", default=None, help="where the MNIST HDF5 file is built (default data/mnist_clean.h5)")
    p.add_argument("--mnist-seeds", nargs="+", default=["0"])
    p.add_argument("--mnist-epochs", type=int, default=6)
    p.add_argument("--mnist-precisions", nargs="+", default=None, choices=("fp32", "bf16", "tf32"),
                   help="one bench_mnist run each (default: fp32 bf16 tf32 on CUDA, fp32 on CPU)")
    p.add_argument("--mnist-timeout-s", type=float, default=240)
    p.add_argument("--digits-epochs", type=int, default=6)
    p.add_argument("--digits-crossmodal-epochs", type=int, default=10)
    p.add_argument("--step-timeout-s", type=float, default=180, help="limit of each digits run")
    p.add_argument("--budget-s", type=float, default=540, help="the whole check's limit (default 540 = 9 min)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="largest |multimodal test accuracy, 2 ranks - 1 rank| that passes (default 0.10)")
    p.add_argument("--threads", type=int, default=0, help="pima's threads= (0: torch's default)")
    p.add_argument("--steps", nargs="+", default=["environment", "cuda_paths", "precision", "mnist"],
                   choices=("environment", "cuda_paths", "precision", "mnist"),
                   help="sections to run (default all; precision needs cuda_paths for its fp32 reference)")
    p.add_argument("--python", default=None, help="interpreter for the runs (default: this one)")
    p.add_argument("--fail-step", action="append", default=[], metavar="NAME",
                   help="make this step fail on purpose (environment, train_1proc, train_2proc_gloo, "
                        "compare_1proc_2proc_gloo, precision_bf16, precision_tf32, mnist_data, mnist_fp32, ...)")
    args = p.parse_args(argv)
    if args.mnist_precisions is None:
        args.mnist_precisions = ["fp32", "bf16", "tf32"] if args.device == "cuda" else ["fp32"]
    return args


def main(argv=None) -> int:
    return Check(parse_args(argv)).run()


if __name__ == "__main__":
    raise SystemExit(main())
