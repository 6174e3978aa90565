"""Trials: the functions that run in Ray worker processes (one training run each)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pima_hpc.config import Config, load_config
from pima_hpc.tune.space import format_value, overrides_for

log = logging.getLogger("pima")


# ---------------------------------------------------------------------------------------------
# Trials (these functions run in Ray worker processes)


@dataclass
class TrialPlan:
    """What every trial needs, shipped to the trials with ``tune.with_parameters``."""

    experiment_dir: str  # storage_path/name: trial <id> trains in <experiment_dir>/<id>/run
    base_config: str  # the sweep's stored base config (base + overrides, data.path absolute)
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int
    keep_stages: bool  # the overrides chose the stages; otherwise trials train the multimodal stage


def trial_overrides(plan: TrialPlan, sampled: dict, run_dir: Path) -> list[str]:
    ov = overrides_for({k: sampled[k] for k in sorted(sampled)})
    ov += [f"run_dir={format_value(str(run_dir))}", f"device={'cuda' if plan.gpus_per_worker > 0 else 'cpu'}",
           "figures=false", "train.progress=false", f"threads={plan.threads}"]
    if not plan.keep_stages:
        ov.append("stages=[multimodal]")
    return ov


def _train(cfg: Config, ctx, send) -> None:
    """One training run whose multimodal-stage epochs are sent to Ray (Tune or Train)."""
    from pima_hpc.train.trainer import Trainer

    sent = []

    def report(stage, epoch, metrics):
        if stage == "multimodal":
            sent.append(epoch)
            send({**{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                  "epoch": epoch, "world_size": ctx.world_size})

    trainer = Trainer(cfg, ctx, report=report)
    try:
        trainer.run()
        # A resumed trial whose run had already finished its epochs (the sweep stopped between the
        # last epoch and Tune recording it) trains nothing: report its last epoch again.
        history = [h for h in trainer.state.history if "stage" not in h]
        if not sent and history:
            report("multimodal", history[-1]["epoch"], history[-1])
    finally:
        trainer.close()


def _ddp_worker(loop_config: dict) -> None:
    """One Ray Train worker: Ray has initialised torch.distributed; build the trainer's context."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.util import get_current_placement_group

    from pima_hpc.distributed import TorchCollective
    from pima_hpc.runtime import Context

    cfg: Config = loop_config["cfg"]
    rc = ray.train.get_context()
    if cfg.device == "cuda":
        from ray.train.torch import get_device
        device = get_device()
    else:
        device = torch.device("cpu")
    backend = dist.get_backend()
    # The float64 EM statistics need a group that reduces CPU tensors (NCCL does not).
    stats_group = None if backend == "gloo" else dist.new_group(backend="gloo")
    ctx = Context(rank=rc.get_world_rank(), local_rank=rc.get_local_rank(), world_size=rc.get_world_size(),
                  device=device, launcher="ray", collective=TorchCollective(stats_group),
                  is_distributed=True, backend=backend, stats_group=stats_group)
    pg = get_current_placement_group()
    if ctx.rank == 0 and pg is not None:
        (Path(loop_config["trial_dir"]) / PG_FILE).write_text(pg.id.hex())
    # Every rank reports: ray.train.report is a barrier, and Ray Train keeps rank 0's metrics.
    _train(cfg, ctx, ray.train.report)


def run_trial(config: dict, plan: TrialPlan) -> None:
    """The Tune function trainable: one training run with the sampled ``config``."""
    import torch
    from ray import tune

    # The trial's directory in the sweep's storage (get_trial_dir() is a node-local staging copy),
    # so a resumed trial finds its checkpoints there, whichever node it runs on.
    trial_dir = Path(plan.experiment_dir) / tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(plan.base_config, trial_overrides(plan, config, trial_dir / "run"))
    if plan.workers_per_trial == 1:
        from pima_hpc.runtime import Context

        _train(cfg, Context(device=torch.device(cfg.device)), tune.report)
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = {"CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        resources["GPU"] = plan.gpus_per_worker
    trainer = TorchTrainer(
        _ddp_worker, train_loop_config={"cfg": cfg, "trial_dir": str(trial_dir)},
        scaling_config=ScalingConfig(num_workers=plan.workers_per_trial, use_gpu=plan.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="ddp", storage_path=str(trial_dir), callbacks=[TuneReportCallback()]))
    trainer.fit()


def trial_dirname(trial) -> str:
    return trial.trial_id


# Where a multi-worker trial's rank 0 records the placement group Ray Train reserved its workers in.
PG_FILE = "ddp_placement_group"


def free_train_placement_group(trial_dir: Path) -> None:
    """Release the workers' placement group of a trial that Tune has ended.

    When ASHA stops a trial (early, or at max_t right after its last epoch's report), Tune ends the
    trainable and with it the Ray Train controller it owns, before the controller can release its
    placement group. Ray Train's own clean-up of that case asks the Ray state API (served by the
    dashboard), which a cluster started without the dashboard, or a Ray installed without
    ``ray[default]``, lacks: the reserved CPUs would stay taken until the sweep ends, and the next
    trials would wait for them forever.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    path = trial_dir / PG_FILE
    if not path.is_file():
        return
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(path.read_text().strip())))
    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
        log.debug("removing the placement group of trial %s's workers", trial_dir.name)
        remove_placement_group(pg)
