"""Entry points that tie launcher, data, model, trainer and reports together (used by the CLI,
Slurm scripts and Ray Tune)."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from pima_hpc.config import Config, load_config
from pima_hpc.errors import RankLostError
from pima_hpc.runtime import Context

log = logging.getLogger("pima")


def make_context(cfg: Config) -> Context:
    """The run context from the launcher's environment (one process when not launched); close it at the end."""
    from pima_hpc.distributed import setup_distributed
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        _stop_with_parent()
    return setup_distributed(backend=cfg.dist.backend, collective=cfg.dist.collective,
                             timeout_s=cfg.dist.timeout_s, device=cfg.device)


def _stop_with_parent() -> None:
    """Under torchrun's agent: its death becomes a SIGTERM to this worker (Linux ``PR_SET_PDEATHSIG``).

    torchrun does not relay SIGUSR1 by default (it dies of it) and relays nothing when SIGKILLed;
    its orphaned workers would otherwise train on unsupervised. The SIGTERM makes them checkpoint
    after the current step and exit 75, like any other stop request (docs/reliability.md).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warning("could not ask to be stopped with torchrun's agent; if it dies, stop this worker by hand")


def train_from_config(cfg: Config, report=None, select_k: tuple[list[int], str] | None = None) -> int:
    """Train the configured stages; returns the process exit code (75 = checkpointed on a signal).

    ``select_k`` = (cluster counts, criterion): choose ``model.n_clusters`` first, without labels
    (pima_hpc/train/select_k.py), in the same context, then train with it.
    """
    from pima_hpc.distributed.failures import peer_failure
    from pima_hpc.train.signals import EXIT_REQUEUE, StopRequested
    from pima_hpc.train.trainer import Trainer, summary_line

    ctx = make_context(cfg)
    trainer = None
    try:
        if select_k is not None:
            from pima_hpc.train.select_k import chosen_k_for_run
            k = chosen_k_for_run(cfg, *select_k, ctx)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_clusters=k))
        trainer = Trainer(cfg, ctx, report=report)
        metrics = trainer.run()
        if ctx.rank == 0:
            print(f"run directory: {cfg.run_dir}")
            print(summary_line(metrics) or "done")
        return 0
    except StopRequested as stop:
        log.warning("stopped at %s after a signal; exiting with %d so the job can be requeued",
                    stop, EXIT_REQUEUE)
        return EXIT_REQUEUE
    except RuntimeError as exc:
        cause = peer_failure(exc)
        if cause is None:
            raise
        where = f" in the {trainer.state.stage} stage, epoch {trainer.state.epoch + 1}" if trainer else ""
        raise RankLostError(
            f"rank {ctx.rank} of {ctx.world_size} lost another rank{where} ({cause}): its process or node died "
            f"or the network failed; every finished epoch is in {cfg.run_dir}: run the same command again to "
            "resume (Slurm requeues a --requeue job after a node failure)") from exc
    finally:
        if trainer is not None:
            trainer.close()
        # Drop the last reference to the networks too, so close()'s gc.collect() frees DDP's
        # communication hooks before its barrier and destroy_process_group().
        trainer = None
        ctx.close()


def select_k_from_config(cfg: Config, ks: list[int], criterion: str = "icl") -> dict:
    """``pima select-k``: choose the number of clusters without labels (pima_hpc/train/select_k.py)."""
    from pima_hpc.train.select_k import select_k

    ctx = make_context(cfg)
    try:
        return select_k(cfg, ks, criterion, ctx)
    finally:
        ctx.close()


def evaluate_run(run_dir: str, overrides: list[str] | None = None) -> dict:
    """Reload a run's config and newest checkpoint, recompute metrics.json and the figures."""
    from pima_hpc.train.trainer import Trainer, summary_line

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml", list(overrides or []) + [f"run_dir={run}"])
    trainer = Trainer(cfg)
    if not trainer.try_resume():
        raise FileNotFoundError(f"run directory {str(run)!r} has no checkpoint to evaluate")
    if trainer.state.stage == "multimodal":
        log.warning("the run stopped during the multimodal stage; evaluating its latest checkpoint")
    metrics = trainer.evaluate()
    metrics["history"] = trainer.state.history
    from pima_hpc.atomic import atomic_write_text
    import json
    atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=1))
    figures = []
    if cfg.figures:
        from pima_hpc.evaluation.figures import write_figures
        with torch.no_grad():
            figures = write_figures(trainer.evaluator, metrics, run)
    from pima_hpc.evaluation.report import spec_units, write_report
    write_report(run, metrics, (run / "config.yaml").read_text(), figures, spec_units(trainer.spec))
    print(summary_line(metrics) or "evaluated")
    return metrics
