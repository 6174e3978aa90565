"""The sweep driver: Ray start-up, the Tuner, resume, and the hand-off to the results."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Optional

from pima_hpc.config import load_config, save_config
from pima_hpc.tune.results import SweepResult, finish_sweep, rows_from_results
from pima_hpc.tune.errors import TuneError
from pima_hpc.tune.space import format_value
from pima_hpc.tune.spec import TuneSpec
from pima_hpc.tune.trial import TrialPlan, free_train_placement_group, run_trial, trial_dirname

log = logging.getLogger("pima")


# ---------------------------------------------------------------------------------------------
# The sweep (the driver process)


def experiment_dir(spec: TuneSpec, resume: bool) -> Path:
    """``storage_path/name``: a new directory for a new sweep; the sweep to continue with ``resume``.

    Without a ``name``, a new sweep is called ``<tune file stem>-<date>-<time>`` and ``--resume``
    continues the newest sweep of that file.
    """
    from ray.tune import Tuner

    if spec.name and resume:
        path = spec.storage_path / spec.name
        if not Tuner.can_restore(str(path)):
            raise TuneError(f"--resume: no sweep to resume at {str(path)!r} (no Ray Tune experiment there); "
                            "run without --resume to start it")
        return path
    if spec.name or not resume:
        path = spec.storage_path / (spec.name or f"{spec.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        # (A directory without a Tune experiment is a sweep that never started: reuse it.)
        if Tuner.can_restore(str(path)):
            raise TuneError(f"sweep directory {str(path)!r} already exists: continue it with --resume, "
                            "or choose another name=...")
        return path
    pattern = re.compile(re.escape(spec.stem) + r"-\d{8}-\d{6}")
    found = sorted(p for p in spec.storage_path.glob(f"{spec.stem}-*")
                   if pattern.fullmatch(p.name) and Tuner.can_restore(str(p)))
    if not found:
        raise TuneError(f"--resume: no sweep of {spec.source.name} to resume under {str(spec.storage_path)!r} "
                        f"(looked for {spec.stem}-<date>-<time>); pass name=... or storage_path=... to "
                        "point at it, or run without --resume")
    return found[-1]


def _check_reachable(address: str) -> None:
    """Fail in seconds on a wrong address (Ray itself retries for minutes)."""
    import socket

    if "://" in address or address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TuneError(f"Ray address {address!r} (--address / RAY_ADDRESS) must look like host:port")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise TuneError(f"cannot reach the Ray cluster at {address} (--address / RAY_ADDRESS): {exc}; "
                        "is the head node's `ray start --head` running?") from None


def _init_ray(spec: TuneSpec, address: Optional[str], num_cpus: Optional[int], verbose: bool) -> None:
    """Connect to the cluster at ``address`` / $RAY_ADDRESS, else start a local instance.

    A local instance gets at least 4 logical CPUs, more than a laptop's cores: small trials mostly
    wait on each other's processes, and two-worker trials then run side by side.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    if address:
        _check_reachable(address)
        if num_cpus is not None:
            raise TuneError("--num-cpus sizes a local Ray instance; a cluster's CPUs are set by `ray start`")
        log.info("connecting to the Ray cluster at %s", address)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise TuneError(f"cannot reach the Ray cluster at {address} (--address / RAY_ADDRESS): "
                            f"{str(exc).splitlines()[0]}") from None
        return
    need = spec.workers_per_trial * spec.cpus_per_worker
    cpus = num_cpus if num_cpus is not None else max(4, os.cpu_count() or 1, math.ceil(need))
    # address="local": never attach to whatever cluster a stale /tmp/ray file names.
    ray.init(address="local", num_cpus=cpus, **kwargs)


def _trial_resources(spec: TuneSpec) -> dict:
    if spec.workers_per_trial == 1:
        res = {"CPU": spec.cpus_per_worker}
        if spec.gpus_per_worker:
            res["GPU"] = spec.gpus_per_worker
        return res
    # The trainable only waits on TorchTrainer.fit(); Ray Train reserves the workers' CPUs and GPUs
    # itself. A token of memory (not a CPU) keeps N trials of W workers packing into N*W workers' CPUs.
    return {"CPU": 0, "memory": 2**20}


def _concurrency(spec: TuneSpec) -> Optional[int]:
    """Check one trial fits the cluster; cap concurrent multi-worker trials at what fits at once
    (otherwise started trials would wait on each other's workers)."""
    import ray

    have = ray.cluster_resources()
    need_cpu = spec.workers_per_trial * spec.cpus_per_worker
    need_gpu = spec.workers_per_trial * spec.gpus_per_worker
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if need_cpu > cpus or need_gpu > gpus:
        raise TuneError(f"a trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs (workers_per_trial "
                        f"{spec.workers_per_trial} x cpus_per_worker {spec.cpus_per_worker:g} / gpus_per_worker "
                        f"{spec.gpus_per_worker:g}) but the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; "
                        "lower them, or give a local instance more logical CPUs with --num-cpus")
    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    if spec.workers_per_trial == 1:
        return None
    fits = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu:
        fits = min(fits, math.floor(gpus / need_gpu + 1e-9))
    return max(1, fits)


def _callbacks(spec: TuneSpec, exp: Path) -> list:
    if spec.workers_per_trial == 1:
        return []
    from ray import tune

    class FreeStoppedTrials(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            free_train_placement_group(exp / trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            free_train_placement_group(exp / trial.trial_id)

    return [FreeStoppedTrials()]


def _searcher(spec: TuneSpec, concurrency: Optional[int]):
    """The search algorithm, limited to ``concurrency`` running trials (None: as many as fit)."""
    if spec.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=spec.search_seed)
        return ConcurrencyLimiter(search, concurrency) if concurrency else search
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials once a generator is given: set it here.
    return BasicVariantGenerator(random_state=spec.search_seed, max_concurrent=concurrency or 0)


def _write_sweep_inputs(spec: TuneSpec, exp: Path) -> None:
    """Store the resolved base config (what every trial and best_config.yaml start from) and the
    tune settings in the sweep directory, so results stay reproducible if the files change."""
    from pima_hpc.atomic import atomic_write_text

    base_cfg = load_config(spec.base, spec.overrides)
    if base_cfg.data.path and not Path(base_cfg.data.path).is_absolute():
        # Ray runs trials in their own working directories.
        data_path = format_value(str(Path(base_cfg.data.path).resolve()))
        base_cfg = load_config(spec.base, spec.overrides + [f"data.path={data_path}"])
    exp.mkdir(parents=True, exist_ok=True)
    save_config(base_cfg, exp / "base_config.yaml")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(spec).items()}
    settings["space"] = {k: {d.kind: d.args} for k, d in spec.space.items()}
    atomic_write_text(exp / "tune.json", json.dumps(settings, indent=1))


def _new_tuner(spec: TuneSpec, exp: Path, trainable, concurrency: Optional[int]):
    from ray import tune

    scheduler = None
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time_attr=epoch (not Tune's count of reports): a restarted trial resumes its checkpoint
        # and reports the true epoch, so ASHA's rungs stay right across --resume.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.epochs, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    tune_config = tune.TuneConfig(metric=spec.metric, mode="max", search_alg=_searcher(spec, concurrency),
                                  scheduler=scheduler, num_samples=spec.num_samples,
                                  trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname)
    run_config = tune.RunConfig(name=exp.name, storage_path=str(exp.parent), verbose=1,
                                callbacks=_callbacks(spec, exp))
    return tune.Tuner(trainable, param_space={k: d.to_ray() for k, d in spec.space.items()},
                      tune_config=tune_config, run_config=run_config)


def run_sweep(spec: TuneSpec, *, resume: bool = False, address: Optional[str] = None,
              num_cpus: Optional[int] = None, verbose: bool = False) -> "SweepResult":
    """Run (or with ``resume`` continue) the sweep; write results.csv and best_config.yaml."""
    try:
        import ray
        from ray import tune
        from ray.train.v2._internal.constants import is_v2_enabled
    except ImportError as exc:
        raise TuneError(f"pima tune needs Ray Tune and Train ({exc}); install them with "
                        "`pip install 'pima-hpc[tune]'`") from None
    if not is_v2_enabled():
        raise TuneError("pima tune runs multi-worker trials with Ray Train V2; unset RAY_TRAIN_V2_ENABLED=0")
    if spec.search == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise TuneError("search: optuna needs the optuna package, which is not installed; "
                            "`pip install optuna`, or use search: random")
    exp = experiment_dir(spec, resume)
    if resume:
        if not (exp / "base_config.yaml").is_file():
            raise TuneError(f"--resume: {str(exp)!r} is not a pima sweep (no base_config.yaml)")
        stored = json.loads((exp / "tune.json").read_text())
        if stored.get("space") != {k: {d.kind: d.args} for k, d in spec.space.items()}:
            log.warning("the tune file's space differs from the one %s started with; resuming with the stored one",
                        exp)
        # Ray restores the trials, scheduler and searcher; these are the settings they ran with.
        spec = dataclasses.replace(spec, **{k: stored[k] for k in (
            "overrides", "workers_per_trial", "cpus_per_worker", "gpus_per_worker", "epochs", "metric",
            "num_samples")})
        base_cfg = load_config(exp / "base_config.yaml")
    else:
        base_cfg = load_config(spec.base, spec.overrides)
    plan = TrialPlan(experiment_dir=str(exp), base_config=str(exp / "base_config.yaml"),
                     workers_per_trial=spec.workers_per_trial, cpus_per_worker=spec.cpus_per_worker,
                     gpus_per_worker=spec.gpus_per_worker,
                     threads=base_cfg.threads or max(1, int(spec.cpus_per_worker)),
                     keep_stages=any(o.split("=", 1)[0].strip() == "stages" for o in spec.overrides))

    _init_ray(spec, address, num_cpus, verbose)
    try:
        concurrency = _concurrency(spec)
        if not resume:
            _write_sweep_inputs(spec, exp)
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), _trial_resources(spec))
        log.info("sweep %s: %s, %d trial(s) of %d worker(s), metric %s (max)", exp, spec.scheduler.type,
                 spec.num_samples, spec.workers_per_trial, spec.metric)
        if resume:
            tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True)
        else:
            tuner = _new_tuner(spec, exp, trainable, concurrency)
        grid = tuner.fit()
        rows = rows_from_results(grid, spec)
    finally:
        ray.shutdown()
    return finish_sweep(rows, spec, exp)
