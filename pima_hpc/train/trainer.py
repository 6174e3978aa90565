"""The driver of a run, for one process or many: the stages in order, checkpoints, resume, signals.

Stages: :class:`~pima_hpc.train.multimodal.MultimodalStage` (Algorithm 1: streaming EM + Adam), then
:class:`~pima_hpc.train.crossmodal.CrossModalStage` (Section 2.4). They keep the run's state in the
driver's ``state`` and checkpoint through :meth:`Trainer.save`, so a run stopped anywhere resumes
from its run directory exactly. Evaluation is :class:`pima_hpc.evaluation.evaluate.Evaluator`.

Distribution enters only through ``ctx`` (:class:`pima_hpc.runtime.Context`: rank, world size,
device, the collective, and its DDP wrapping of the networks).
"""

from __future__ import annotations

import gc
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pima_hpc.config import Config, ConfigError, config_hash, save_config, to_dict
from pima_hpc.data.base import spec_to_dict
from pima_hpc.errors import NonFiniteError, ResumeError
from pima_hpc.evaluation.evaluate import Evaluator
from pima_hpc.model.pima import PIMA
from pima_hpc.runtime import Context
from pima_hpc.train import em
from pima_hpc.train.batchnorm import broadcast_batchnorm_stats, precise_batchnorm
from pima_hpc.atomic import atomic_write_text
from pima_hpc.train.checkpoint import CheckpointManager
from pima_hpc.train.crossmodal import CrossModalStage
from pima_hpc.train.multimodal import MultimodalStage
from pima_hpc.train.precision import configure_precision
from pima_hpc.train.signals import SignalFlag, StopRequested
from pima_hpc.train.splits import has_split, open_run_split
from pima_hpc.train.state import TrainingState, changed_keys, rng_state, set_rng_state

log = logging.getLogger("pima")


class Trainer:
    def __init__(self, cfg: Config, ctx: Context | None = None, report=None):
        """``ctx`` is the run context (one process by default; it wraps the networks in DDP when
        distributed); ``report(stage, epoch, metrics)`` is called on every rank after each epoch
        (Ray Tune hooks in here).
        """
        self.cfg = cfg
        self.ctx = ctx or Context()
        self.collective = self.ctx.collective
        self.device = self.ctx.device
        self.report = report
        self.run_dir = Path(cfg.run_dir)
        # Passes without gradients (EM, evaluation, statistics) hold no activations for backward,
        # so four training batches fit in the memory one training step needs.
        self.eval_batch = cfg.train.batch_size * 4
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

        rank, world = self.ctx.rank, self.ctx.world_size
        self.train_data = open_run_split(cfg.data, "train", rank, world)
        self.val_data = open_run_split(cfg.data, "val", rank, world) if has_split(cfg.data, "val") else None
        self.test_data = open_run_split(cfg.data, "test", rank, world) if has_split(cfg.data, "test") else None
        self.spec = self.train_data.spec
        self.stages = list(cfg.stages)
        if len(self.spec.names) == 1 and "crossmodal" in self.stages:
            # one modality: its cross-modal encoder would be the multimodal one again
            log.info("one modality (%s): PIMA without fusion; the cross-modal stage is skipped", self.spec.names[0])
            self.stages.remove("crossmodal")
        if not self.stages:
            raise ConfigError("config key 'stages': with one modality only the multimodal stage exists; "
                              "set stages=[multimodal]")

        configure_precision(cfg.train.precision, self.device)
        self.model = PIMA(self.spec, cfg.model).to(self.device)
        if cfg.train.sync_batchnorm and world > 1:
            if self.device.type != "cuda":
                # torch's SyncBatchNorm raises on CPU tensors, and only at the first training step.
                raise ConfigError("config key 'train.sync_batchnorm': torch's SyncBatchNorm needs CUDA devices; "
                                  "on CPU set train.sync_batchnorm=false (BatchNorm then uses each rank's "
                                  "batch statistics and rank 0's running statistics, see docs/distributed.md)")
            self.model.encoders = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.encoders)
            self.model.decoders = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.decoders)
        self.multimodal = MultimodalStage(self)
        self.crossmodal_stage = None  # built when the cross-modal stage starts or is resumed
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_checkpoints)
        self.state = TrainingState()
        self.signals = SignalFlag()
        self.tracker = None  # rank 0's history.csv / TensorBoard / MLflow, opened by run()

    @property
    def streaming(self):
        """The training pass's EM statistics (train.statistics=streaming), else None."""
        return self.multimodal.streaming

    @property
    def crossmodal(self):
        """The cross-modal encoders and cluster heads, once that stage is built (else None)."""
        return self.crossmodal_stage.encoders if self.crossmodal_stage is not None else None

    def _build_crossmodal(self) -> None:
        self.crossmodal_stage = CrossModalStage(self)

    # ----- bookkeeping -------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return self.ctx.rank == 0

    def progress(self, total, desc):
        from tqdm.auto import tqdm
        show = self.cfg.train.progress
        if show is None:  # a bar redrawn into a redirected log only floods it
            show = sys.stderr.isatty()
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not (self.is_root and show))

    def _payload(self) -> dict:
        memory = self.multimodal.curve_memory
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.multimodal.optimizer.state_dict(),
            "state": self.state.to_payload(),
            "config_hash": config_hash(self.cfg),
            "config": {k: v for k, v in to_dict(self.cfg).items() if k in ("data", "model")},  # names a mismatch
            "rng": rng_state(),
            "spec": spec_to_dict(self.spec),  # `pima predict` needs units and normalisation, not the data
            "curve_memory": ({n: {k: torch.from_numpy(v) for k, v in st.values.items()}
                              for n, st in memory.items()} if memory else None),
            "streaming": self.streaming.state(self._streaming_rows) if self.streaming is not None else None,
        }
        if self.multimodal.pretraining is not None:  # between two epochs of train.init=pretrain's pre-training
            payload["pretrain"] = self.multimodal.pretraining.state_dict()
        if self.crossmodal is not None:
            payload["crossmodal"] = self.crossmodal.state_dict()
            payload["xm_optimizer"] = self.crossmodal_stage.optimizer.state_dict()
        return payload

    def save(self, best: bool = False) -> None:
        s = self.state
        name = f"ckpt-{s.stage}-e{s.epoch:04d}-s{s.step:06d}"
        if self.multimodal.pretraining is not None:
            name = f"ckpt-pretrain-e{len(self.multimodal.pretraining.losses):04d}-s000000"
        # Never write a checkpoint a resume would choke on: non-finite weights stop the run instead.
        bad = [f"{m}.{k}" for m, module in (("model", self.model), ("crossmodal", self.crossmodal))
               if module is not None for k, v in module.state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if self.agree([float(bool(bad))])[0] > 0:
            raise NonFiniteError(f"non-finite parameters ({', '.join(bad[:4]) or 'on another rank'}) at {name}; "
                                 f"not saved, the last good checkpoint in {self.run_dir / 'checkpoints'} is kept; "
                                 "lower train.lr or check the data for NaN/Inf")
        self._streaming_rows = None
        if self.streaming is not None and self.streaming.pending:  # mid-epoch: every rank's pending sums
            rows = np.zeros((self.ctx.world_size, len(self.streaming.pending_vector())))
            rows[self.ctx.rank] = self.streaming.pending_vector()
            self._streaming_rows = self.collective.allreduce_sum([rows])[0] if self.ctx.world_size > 1 else rows
        partial = self.state.partial_sums
        if partial is not None:  # mid-epoch (a signal): rank 0 writes every rank's running sums
            rows = np.zeros((self.ctx.world_size, len(partial["values"])))
            rows[self.ctx.rank] = partial["values"]
            rows = self.collective.allreduce_sum([rows])[0] if self.ctx.world_size > 1 else rows
            partial["per_rank"] = rows.tolist()
        if self.is_root:
            self.ckpt.save(self._payload(), name, best)
        self.collective.barrier()

    def keep_partial(self, sums: dict[str, float]) -> None:
        """Record this rank's running sums of the epoch after each step, for a checkpoint mid-epoch."""
        self.state.partial_sums = {"keys": list(sums), "values": [float(v) for v in sums.values()]}

    def resume_partial(self) -> dict[str, float]:
        """This rank's running sums of an epoch resumed mid-way ({} at an epoch start), so the
        epoch's metrics come out as if it had never stopped."""
        partial = None
        if self.state.step:
            partial, self.state.partial_sums = self.state.partial_sums, None
        if not partial or "per_rank" not in partial:
            return {}
        rows = partial["per_rank"]
        if len(rows) != self.ctx.world_size:
            log.warning("resumed mid-epoch on %d ranks, checkpointed on %d: this epoch's train metrics cover "
                        "only its remaining steps", self.ctx.world_size, len(rows))
            return {}
        return dict(zip(partial["keys"], rows[self.ctx.rank]))

    def try_resume(self) -> bool:
        """Continue from the run directory's newest good checkpoint, if it has one."""
        found = self.ckpt.load_latest() if self.ckpt.exists() else None
        if found is None:
            return False
        payload, path = found
        if payload.get("config_hash") != config_hash(self.cfg):
            changed = changed_keys(payload.get("config"), to_dict(self.cfg))
            raise ResumeError(f"run directory {str(self.run_dir)!r} holds a checkpoint ({path.name}) of a different "
                              f"model or data config{' (' + changed + ')' if changed else ''}; use a new run_dir, "
                              "or restore those settings (the run's config.yaml has them)")
        try:
            self.model.load_state_dict(payload["model"])
            self.multimodal.optimizer.load_state_dict(payload["optimizer"])
            self.state = TrainingState.from_payload(payload["state"])
            set_rng_state(payload["rng"])
            if "crossmodal" in payload:
                self._build_crossmodal()
                self.crossmodal.load_state_dict(payload["crossmodal"])
                self.crossmodal_stage.optimizer.load_state_dict(payload["xm_optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:  # e.g. written by another pima-hpc version
            raise ResumeError(f"checkpoint {str(path)!r} does not fit this model ({type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0][:160]}); use a new run_dir") from None
        if payload.get("streaming") and self.streaming is not None:
            if not self.streaming.load_state(payload["streaming"], self.ctx.rank, self.ctx.world_size):
                log.warning("resumed mid-epoch on %d ranks, checkpointed on another number: the streaming "
                            "statistics are summed into the totals (equal up to rounding)", self.ctx.world_size)
        self.multimodal.pretraining_resumed = payload.get("pretrain")
        if payload.get("curve_memory"):
            memory = self.multimodal.curve_memory = em.new_curve_statistics(self.model)
            for n, vals in payload["curve_memory"].items():
                memory[n].set_arrays([v.numpy() for v in vals.values()])
        if "pretrain" in payload:
            log.info("resumed from %s (pre-training, %d epoch(s) done)", path, len(payload["pretrain"]["losses"]))
        else:
            log.info("resumed from %s (stage %s, epoch %d, step %d)", path, self.state.stage,
                     self.state.epoch, self.state.step)
        return True

    def stop_agreed(self) -> bool:
        """Whether any rank has had a stop signal (every rank gets the same answer, so all stop together)."""
        return bool(self.agree([float(self.signals.requested)])[0] > 0)

    def agree(self, flags: list[float]) -> np.ndarray:
        """Combine per-rank flags (stop request, non-finite) so every rank takes the same branch."""
        if self.ctx.world_size == 1:
            return np.asarray(flags, dtype=np.float64)
        return self.collective.allreduce_sum([np.asarray(flags, dtype=np.float64)])[0]

    def recompute_batchnorm(self, module, forward, n_batches: int, batch_size: int, epoch: int) -> None:
        """End of an epoch: precise BatchNorm statistics from ``n_batches`` fixed training batches, or
        (n_batches = 0) torch's running averages made identical on every rank."""
        if n_batches == 0:
            broadcast_batchnorm_stats(module, self.collective)
            return
        batches = self.train_data.batch_index_lists(batch_size, epoch, self.cfg.seed + 11)[:n_batches]
        precise_batchnorm(module, forward, batches, self.collective)

    def epoch_done(self, stage: str, label: str, epoch: int, total: int, metrics: dict) -> None:
        """Log an epoch's metrics (rank 0) and hand them to the report hook (every rank)."""
        if self.is_root:
            log.info("%s %d/%d  %s", label, epoch, total,
                     "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
            if self.tracker is not None:
                self.tracker.epoch(self.state.history)
        if self.report:
            self.report(stage, epoch, metrics)

    def check_finite(self, terms: dict, loss: torch.Tensor, where: str) -> None:
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        if not torch.isfinite(loss):
            bad.append("loss")
        flag = self.agree([self.signals.requested, float(bool(bad))])
        if flag[1] > 0:
            raise NonFiniteError(f"non-finite values at {where} (terms: {', '.join(bad) or 'on another rank'}); "
                                 f"the last good checkpoint in {self.run_dir / 'checkpoints'} is kept; "
                                 "lower train.lr or check the data for NaN/Inf")
        if flag[0] > 0:
            self.save()
            raise StopRequested(where)

    # ----- evaluation --------------------------------------------------------------------------
    @property
    def evaluator(self) -> Evaluator:
        """Read-outs and scores of the model as it is now (pima_hpc.evaluation.evaluate)."""
        return Evaluator(self.model, self.crossmodal, {"train": self.train_data, "val": self.val_data,
                                                       "test": self.test_data},
                         self.collective, self.device, self.eval_batch, self.cfg.seed)

    def evaluate(self) -> dict:
        return self.evaluator.metrics()

    # ----- the whole run -----------------------------------------------------------------------
    def _check_finished_run(self) -> None:
        """A finished run (stage "done") is final. Running it again only re-evaluates it (as needed
        after a kill between its last checkpoint and metrics.json), and adding the cross-modal stage
        trains that stage; asking for more epochs than it trained is an error, because its final
        closed-form pass has run and training on would not give what a longer run gives."""
        if self.state.stage != "done":
            return
        history = self.state.history
        trained = {"multimodal": sum("stage" not in h for h in history),
                   "crossmodal": sum(h.get("stage") == "crossmodal" for h in history)}
        asked = {"multimodal": ("train.epochs", self.cfg.train.epochs),
                 "crossmodal": ("crossmodal.epochs", self.cfg.crossmodal.epochs)}
        more = [f"{asked[s][0]}={asked[s][1]} but it trained {trained[s]}" for s in self.stages
                if asked[s][1] > trained[s] and (s == "multimodal" or self.crossmodal is not None)]
        if more:
            raise ResumeError(f"run directory {str(self.run_dir)!r} holds a finished run ({'; '.join(more)}); "
                              "a finished run is not extended: use a new run_dir, or ask for at most the "
                              "epochs it trained to re-evaluate it")
        if not ("crossmodal" in self.stages and self.crossmodal is None):
            log.info("run directory %s holds a finished run: evaluating it again", self.run_dir)

    def run(self) -> dict:
        """Train the configured stages (resuming if the run directory has a checkpoint) and evaluate."""
        tic = time.perf_counter()
        # Resume (or refuse to) before writing anything: a refused config must not overwrite the
        # config.yaml that describes the checkpoints already there.
        self.try_resume()
        self._check_finished_run()
        problem = None
        if self.is_root:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.run_dir / "config.yaml")
            except OSError as exc:
                problem = f"cannot write to {str(self.run_dir)!r} ({exc.strerror or exc})"
        if self.agree([float(problem is not None)])[0] > 0:  # also the barrier: every rank stops together
            raise ConfigError(f"config key 'run_dir': {problem or 'rank 0 cannot write to it'}; "
                              "choose a writable directory")
        if self.is_root:
            from pima_hpc.train.tracking import Tracker
            self.tracker = Tracker(self.cfg, self.run_dir, self.state)
        self.signals.install()
        try:
            if "multimodal" in self.stages and self.state.stage == "multimodal":
                self.multimodal.fit()
            elif self.state.stage == "multimodal":
                raise ResumeError(f"stage 'crossmodal' needs a trained multimodal model in {str(self.run_dir)!r}; "
                                  "run with stages=[multimodal,crossmodal] first")
            if "crossmodal" in self.stages and self.state.stage in ("crossmodal", "done"):
                if self.state.stage == "done" and self.crossmodal is None:
                    self.state.stage, self.state.epoch, self.state.step = "crossmodal", 0, 0
                if self.crossmodal_stage is None:
                    self._build_crossmodal()
                self.crossmodal_stage.fit()
        finally:
            self.signals.uninstall()
        metrics = self.evaluate()
        metrics["history"] = self.state.history
        metrics["init"] = self.state.init
        metrics["wall_seconds_this_process"] = time.perf_counter() - tic
        metrics["world_size"] = self.ctx.world_size
        if self.is_root:
            from pima_hpc.evaluation.baselines import below_baselines
            for warning in below_baselines(metrics):
                log.warning("%s: that modality alone already finds these clusters (labels used for scoring only)", warning)
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=1))
            figures = []
            if self.cfg.figures:
                from pima_hpc.evaluation.figures import write_figures
                figures = write_figures(self.evaluator, metrics, self.run_dir)
            from pima_hpc.evaluation.report import spec_units, write_report
            write_report(self.run_dir, metrics, (self.run_dir / "config.yaml").read_text(), figures,
                         spec_units(self.spec))
            self.tracker.finish(metrics, figures)
        self.collective.barrier()
        return metrics

    def close(self) -> None:
        """Drop the networks before the process group goes (avoids a rare gloo abort at exit)."""
        # The stages hold the DDP wrappers and optimizers.
        self.multimodal = self.crossmodal_stage = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        gc.collect()


def summary_line(metrics: dict) -> str:
    """Every read-out's test accuracy, the latent clustering (``multimodal``) first: it is the headline."""
    keys = [k for k, v in metrics.items() if isinstance(v, dict) and isinstance(v.get("test"), dict)
            and "accuracy" in v["test"]]
    keys.sort(key=lambda k: k != "multimodal")
    note = {"multimodal_joint": " (incl. the experts' likelihood)"}
    line = "; ".join(f"{k}{note.get(k, '')} test acc {100 * metrics[k]['test']['accuracy']:.2f}%" for k in keys)
    base = {k: v["test"]["accuracy"] for k, v in metrics.get("baselines", {}).items() if "test" in v}
    if base:
        line += " | baselines: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in base.items())
    return line
