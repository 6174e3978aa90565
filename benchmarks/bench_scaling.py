"""Strong scaling of the multimodal training epoch on one machine: 1 rank x N threads against
N ranks x 1 thread on the same global batch, and the share of epoch time spent in the EM /
least-squares collectives. Numbers and the exact command: docs/benchmarks.md ("Scaling").

    python benchmarks/bench_scaling.py                      # MNIST clean if data/mnist_clean.h5 exists, else digits
    python benchmarks/bench_scaling.py --data digits --steps 50 --epochs 3 --json scaling.json

Each configuration runs in fresh processes (torchrun for several ranks; ``--mpi`` adds mpiexec with
the MPI collective). A worker builds the real Trainer, runs the expert initialisation, then
``--epochs`` epochs of Algorithm 1 (the EM pass with its one reduction, then at most ``--steps``
optimizer steps via ``train.max_steps_per_epoch``), timing:

* throughput: global samples of the training steps / wall time of ``train_epoch`` (DDP gradient
  averaging included, since it happens inside backward);
* communication: wall time inside ``Collective.allreduce_sum``, measured by a timing proxy that
  this script wraps around ``ctx.collective`` (the library is not instrumented), split by caller:
  the EM / least-squares reductions (em_pass, initialisation), the per-step stop / non-finite
  agreement, and the epoch metrics. Shares are of the epoch's wall time (EM pass + training steps).

The first epoch is a warm-up (allocator, thread pools); medians are over the others. The numbers
are wall-clock times on whatever else the machine is doing: run it on an otherwise idle node to
compare configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST_H5 = REPO / "data" / "mnist_clean.h5"
BIN = Path(sys.executable).parent

# Caller of allreduce_sum -> what it reduces.
KINDS = {"reduce_all": "em", "initialise_from_experts": "em", "agree": "step_flags",
         "broadcast_batchnorm_stats": "bn_sync", "precise_batchnorm": "bn_sync", "train_epoch": "metrics",
         "validation_elbo": "metrics", "cluster_table": "metrics"}


class TimingCollective:
    """Forwards everything to the wrapped collective; times allreduce_sum and barrier by caller."""

    def __init__(self, inner):
        self._inner = inner
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @staticmethod
    def _kind(depth: int = 4) -> str:
        """What is being reduced: the nearest caller named in KINDS, a few frames up (the library's
        helpers such as collective.allreduce_groups sit between it and allreduce_sum)."""
        frame = sys._getframe(2)
        for _ in range(depth):
            if frame is None:
                break
            if frame.f_code.co_name in KINDS:
                return KINDS[frame.f_code.co_name]
            frame = frame.f_back
        return "other"

    def allreduce_sum(self, arrays):
        kind = self._kind()
        tic = time.perf_counter()
        out = self._inner.allreduce_sum(arrays)
        self.seconds[kind] += time.perf_counter() - tic
        self.calls[kind] += 1
        return out

    def barrier(self):
        tic = time.perf_counter()
        self._inner.barrier()
        self.seconds["barrier"] += time.perf_counter() - tic

    def snapshot(self) -> dict:
        return dict(self.seconds)


def _config(args, run_dir: str, batch_per_rank: int, threads: int):
    from pima_hpc.config import load_config

    overrides = [f"run_dir={run_dir}", f"train.batch_size={batch_per_rank}", f"threads={threads}",
                 f"train.max_steps_per_epoch={args.steps}", f"train.epochs={args.epochs}", "stages=[multimodal]",
                 "figures=false", "train.progress=false", "device=cpu"]
    if args.data == "mnist":
        return load_config(REPO / "configs" / "mnist.yaml", overrides + [f"data.path={MNIST_H5}"])
    return load_config(REPO / "configs" / "digits.yaml", overrides)


def worker(args) -> None:
    from pima_hpc.train.run import make_context
    from pima_hpc.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        cfg = _config(args, os.environ.get("BENCH_RUN_DIR", tmp), args.batch_per_rank, args.threads)
        ctx = make_context(cfg)
        timer = TimingCollective(ctx.collective)
        ctx.collective = timer
        trainer = None
        try:
            trainer = Trainer(cfg, ctx)
            tic = time.perf_counter()
            trainer.multimodal.initialise()
            init_s = time.perf_counter() - tic
            counts = trainer.train_data.global_counts(cfg.train.batch_size)
            epochs = []
            for epoch in range(args.epochs):
                trainer.state.epoch, trainer.state.step = epoch, 0
                before = timer.snapshot()
                tic = time.perf_counter()
                if epoch > 0:  # as MultimodalStage.fit: the initialisation stands in for epoch 0's pass
                    trainer.multimodal.closed_form_updates()
                em_s = time.perf_counter() - tic
                tic = time.perf_counter()
                trainer.multimodal.train_epoch(epoch)
                train_s = time.perf_counter() - tic
                after = timer.snapshot()
                steps = trainer.state.step
                epochs.append({"em_s": em_s, "train_s": train_s, "steps": steps,
                               "samples": int(counts[:steps].sum()),
                               "comm": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}})
            result = {"rank": ctx.rank, "world_size": ctx.world_size, "threads": args.threads,
                      "batch_per_rank": args.batch_per_rank, "collective": type(timer._inner).__name__,
                      "init_s": init_s, "train_samples": trainer.train_data.num_global, "epochs": epochs}
            # Every rank's numbers to rank 0, outside the timed region.
            results = _gather(ctx, timer, result)
            if ctx.rank == 0:
                Path(args.out).write_text(json.dumps(results))
        finally:
            if trainer is not None:
                trainer.close()
            trainer = None
            ctx.close()


def _gather(ctx, timer, result) -> list:
    """All ranks' result dicts on every rank, through broadcast_object (one root at a time)."""
    return [timer._inner.broadcast_object(result, root=r) for r in range(ctx.world_size)]


def summarise(name: str, results: list) -> dict:
    """Medians over the epochs after the first; communication from the slowest rank."""
    def med(values):
        return statistics.median(values) if values else float("nan")

    r0 = results[0]
    keep = r0["epochs"][1:] or r0["epochs"]
    idx = range(len(r0["epochs"]))[1:] or range(len(r0["epochs"]))
    epoch_s = [e["em_s"] + e["train_s"] for e in keep]
    comm = defaultdict(list)
    for i in idx:
        for kind in ("em", "step_flags", "bn_sync", "metrics", "barrier", "other"):
            # The slowest rank's time in this kind of call, as a share of rank 0's epoch.
            worst = max(r["epochs"][i]["comm"].get(kind, 0.0) for r in results)
            comm[kind].append(worst / (r0["epochs"][i]["em_s"] + r0["epochs"][i]["train_s"]))
    total = [sum(comm[k][j] for k in comm) for j in range(len(idx))]
    return {
        "config": name, "ranks": r0["world_size"], "threads": r0["threads"],
        "global_batch": r0["batch_per_rank"] * r0["world_size"], "collective": r0["collective"],
        "steps": keep[0]["steps"], "train_samples": r0["train_samples"],
        "samples_per_s": med([e["samples"] / e["train_s"] for e in keep]),
        "train_epoch_s": med([e["train_s"] for e in keep]), "em_pass_s": med([e["em_s"] for e in keep]),
        "epoch_s": med(epoch_s), "init_s": r0["init_s"],
        "comm_em_share": med(comm["em"]), "comm_step_flags_share": med(comm["step_flags"]),
        "comm_total_share": med(total),
        "comm_em_ms": 1e3 * med([max(r["epochs"][i]["comm"].get("em", 0.0) for r in results) for i in idx]),
    }


def _env(threads: int) -> dict:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def run_config(args, name: str, launcher: list, ranks: int, threads: int) -> dict:
    batch = args.global_batch // ranks
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [*launcher, str(Path(__file__).resolve()), "--worker", "--out", str(out), "--threads", str(threads),
               "--batch-per-rank", str(batch), "--data", args.data, "--steps", str(args.steps),
               "--epochs", str(args.epochs)]
        env = dict(_env(threads), BENCH_RUN_DIR=str(Path(tmp) / "run"))
        tic = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        row = summarise(name, json.loads(out.read_text()))
        row["wall_s"] = time.perf_counter() - tic
        return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("auto", "mnist", "digits"), default="auto")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per epoch (train.max_steps_per_epoch)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per configuration; the first is a warm-up")
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="N in 1 x N threads and N x 1 ranks")
    p.add_argument("--mpi", action="store_true", help="also run N ranks under mpiexec (MPI collective)")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-per-rank", type=int, default=128, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.data == "auto":
        args.data = "mnist" if MNIST_H5.is_file() else "digits"
    if args.worker:
        worker(args)
        return 0

    n = args.cores
    python = [sys.executable]
    configs = [(f"1 rank x {n} threads", python, 1, n), ("1 rank x 1 thread", python, 1, 1),
               (f"{n} ranks x 1 thread (torchrun, gloo)",
                [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={n}"], n, 1)]
    if args.mpi:
        configs.append((f"{n} ranks x 1 thread (mpiexec, MPI)", [str(BIN / "mpiexec"), "-n", str(n), sys.executable],
                        n, 1))
    rows = []
    for name, launcher, ranks, threads in configs:
        row = run_config(args, name, launcher, ranks, threads)
        rows.append(row)
        print(f"{name}: {row['samples_per_s']:.0f} samples/s", file=sys.stderr, flush=True)
    best_single = max(r["samples_per_s"] for r in rows if r["ranks"] == 1)
    for r in rows:
        r["vs_best_single"] = r["samples_per_s"] / best_single

    print(f"data: {args.data}, global batch {args.global_batch}, {args.steps} steps per epoch, "
          f"{args.epochs} epochs (medians over epochs 2..{args.epochs})\n")
    print("| configuration | samples/s | x best 1-rank | train epoch s | EM pass s | EM/LS comm ms | "
          "EM/LS comm share | all collectives share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['samples_per_s']:.0f} | {r['vs_best_single']:.2f} | {r['train_epoch_s']:.2f} | "
              f"{r['em_pass_s']:.2f} | {r['comm_em_ms']:.2f} | {100 * r['comm_em_share']:.3f}% | "
              f"{100 * r['comm_total_share']:.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
