"""Experiment tracking of a run, on rank 0: ``history.csv`` always, TensorBoard event files by default
(``logging.tensorboard``) and MLflow when configured (``logging.mlflow: URI``, optional dependency).

Each history entry (one epoch of either stage) is one step: its position in the run's history,
so the two stages share one monotone axis. A requeued run resumes into the same records:
TensorBoard purges the steps from the first one not yet certain to be logged (the last entry of the
checkpointed history is logged again, in case the kill fell between its checkpoint and its log
line), and MLflow continues the run whose id the checkpointed state holds.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from pima_hpc.config import Config, to_dict
from pima_hpc.errors import ConfigError
from pima_hpc.atomic import atomic_write_text
from pima_hpc.train.state import TrainingState

log = logging.getLogger("pima")

HISTORY_CSV = "history.csv"
TENSORBOARD_DIR = "tensorboard"


def history_csv(history: list[dict]) -> str:
    """The run's history as CSV text: one row per epoch, a column per metric (blank where a stage lacks it)."""
    columns = ["step", "stage", "epoch"]
    for entry in history:
        columns += [k for k in entry if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="", lineterminator="\n")
    writer.writeheader()
    for step, entry in enumerate(history, 1):
        writer.writerow({"step": step, "stage": entry.get("stage", "multimodal"),
                         **{k: v for k, v in entry.items() if k != "stage"}})
    return out.getvalue()


def _scalars(entry: dict) -> dict[str, float]:
    stage = entry.get("stage", "multimodal")
    return {f"{stage}/{k}": float(v) for k, v in entry.items()
            if k != "stage" and isinstance(v, (int, float)) and math.isfinite(float(v))}


def _flat_params(cfg: Config) -> dict[str, str]:
    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", str(v)[:250]
    return dict(walk(to_dict(cfg)))


class Tracker:
    """Rank 0's records of a run. ``state`` is the trainer's :class:`TrainingState` (MLflow keeps its run id there)."""

    def __init__(self, cfg: Config, run_dir: Path, state: TrainingState):
        self.cfg, self.run_dir, self.state = cfg, Path(run_dir), state
        self.tb = None
        self.mlflow = None
        history = state.history
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=len(history) or None)
        if cfg.logging.mlflow:
            self._start_mlflow()
        if history:  # the last checkpointed epoch, again (see the module docstring)
            self._log_scalars(len(history), history[-1])

    def _start_mlflow(self) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("config key 'logging.mlflow': MLflow is not installed; pip install mlflow "
                              "(or mlflow-skinny), or set logging.mlflow=null") from None
        mlflow.set_tracking_uri(self.cfg.logging.mlflow)
        run_id = self.state.mlflow_run_id
        if run_id is None:
            experiment = mlflow.set_experiment(self.cfg.logging.mlflow_experiment)
            run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=self.run_dir.name)
            self.state.mlflow_run_id = run.info.run_id
            mlflow.log_params(_flat_params(self.cfg))
        else:
            mlflow.start_run(run_id=run_id)
            log.info("MLflow: resuming run %s", run_id)
        self.mlflow = mlflow

    def _log_scalars(self, step: int, entry: dict) -> None:
        scalars = _scalars(entry)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.mlflow is not None:
            # MLflow's metric names allow "/", so the tags are the same in both.
            self.mlflow.log_metrics(scalars, step=step)

    def epoch(self, history: list[dict]) -> None:
        """After an epoch was appended to ``history`` (and checkpointed)."""
        atomic_write_text(self.run_dir / HISTORY_CSV, history_csv(history))
        self._log_scalars(len(history), history[-1])

    def finish(self, metrics: dict, figures: list[str]) -> None:
        """At the end: history.csv, the headline test scores and every figure."""
        history = metrics.get("history", [])
        atomic_write_text(self.run_dir / HISTORY_CSV, history_csv(history))
        final = {f"test/{k}": float(v["test"]["accuracy"]) for k, v in metrics.items()
                 if isinstance(v, dict) and isinstance(v.get("test"), dict) and "accuracy" in v["test"]}
        step = max(len(history), 1)
        if self.tb is not None:
            for tag, value in final.items():
                self.tb.add_scalar(tag, value, step)
            if figures:
                import matplotlib.image as mpimg
                for path in figures:
                    img = mpimg.imread(path)[..., :3]
                    self.tb.add_image(f"figures/{Path(path).stem}", img, step, dataformats="HWC")
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(final, step=step)
            for path in figures:
                self.mlflow.log_artifact(path, artifact_path="figures")
            for name in ("metrics.json", "report.html", HISTORY_CSV):
                if (self.run_dir / name).is_file():
                    self.mlflow.log_artifact(str(self.run_dir / name))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None
