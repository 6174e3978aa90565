"""Hyperparameter sweeps with Ray Tune: ``pima tune TUNE_FILE [key=value ...] [--resume]``.

A tune file (``configs/tune_*.yaml``, described in docs/tune.md) names a base training config,
overrides for every trial, and a search space of dotted config keys; each trial is one ordinary
training run of the multimodal stage, written to its own directory.

Selection is unsupervised: trials are ranked by the validation ELBO, which the trainer computes
with unit loss weights, so trials that sweep the ``loss.*`` weights still compare on the same
objective. ``val_accuracy`` is reported when the data have labels, never used to choose.

A trial with ``workers_per_trial > 1`` is a Ray Train ``TorchTrainer`` started from inside the
Tune function trainable (Ray Train V2's Tune integration): Ray starts the DDP workers and their
torch.distributed group, each worker runs the usual :class:`~pima_hpc.train.trainer.Trainer`, and
``TuneReportCallback`` relays rank 0's per-epoch metrics to Tune. One-worker trials train inside
the trainable itself.

Everything up to the launch (reading and validating the tune file, every sampled value checked
through :func:`~pima_hpc.config.load_config`) is plain Python; Ray is imported only to run, so a
bad tune file fails in a second with one line and ``pima tune --help`` works without Ray.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import logging
import math
import numbers
import os
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pima_hpc.config import Config, ConfigError, load_config, save_config

log = logging.getLogger("pima")


class TuneError(ConfigError):
    """A tune file, sweep directory or Ray cluster problem the user can fix (one line, exit 2)."""


# ---------------------------------------------------------------------------------------------
# The tune file

TUNE_KEYS = ("base", "overrides", "space", "num_samples", "scheduler", "search", "search_seed",
             "workers_per_trial", "cpus_per_worker", "gpus_per_worker", "max_concurrent_trials",
             "metric", "mode", "storage_path", "name")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor")
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna")
METRICS = ("val_elbo",)
KINDS = ("loguniform", "uniform", "randint", "choice")

# Keys a sweep may not sample, and why (the prefix form covers a whole section).
RESERVED = {
    "run_dir": "every trial gets its own run_dir under the trial's directory",
    "stages": "trials train the multimodal stage, the only one the selection metric depends on",
    "crossmodal.": "the selection metric (val_elbo) does not depend on the cross-modal encoders",
    "train.epochs": "it is the trial budget (ASHA's max_t); set it under overrides",
    "data.": "trials must see the same data for their validation ELBOs to be comparable; "
             "set data.* under overrides",
    "device": "set from gpus_per_worker",
    "threads": "set from cpus_per_worker",
    "dist.": "Ray sets up the trials' process groups",
    "figures": "trials write no figures",
    "train.progress": "trials show no progress bars",
}

DEFAULT_NUM_SAMPLES = 8
DEFAULT_STORAGE = "runs/tune"


@dataclass
class Distribution:
    """One search dimension. ``randint: [a, b]`` includes b (Ray's randint excludes its upper end)."""

    kind: str
    args: list

    def to_ray(self):
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)
        return tune.choice(list(self.args))

    def corners(self) -> list:
        """The values worth validating: both ends of a range, every choice."""
        return list(self.args)


@dataclass
class TuneSpec:
    """A validated tune file. Paths are absolute; ``epochs`` is the trial budget (ASHA's max_t)."""

    source: Path
    base: Optional[Path]
    overrides: list[str]
    space: dict[str, Distribution]
    epochs: int
    num_samples: int = DEFAULT_NUM_SAMPLES
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    search: str = "random"
    search_seed: Optional[int] = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0
    metric: str = "val_elbo"
    storage_path: Path = field(default_factory=lambda: Path(DEFAULT_STORAGE).resolve())
    name: Optional[str] = None

    @property
    def stem(self) -> str:
        return self.source.stem


def _did_you_mean(word: str, choices) -> str:
    word, choices = str(word), [str(c) for c in choices]
    guess = difflib.get_close_matches(word, choices, n=1, cutoff=0.6) or [
        c for c in choices if len(word) >= 3 and c.startswith(word)][:1]
    return f"; did you mean {guess[0]!r}?" if guess else ""


def config_leaf_types(schema=Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of the run config with its type (``model.latent_dim`` -> int)."""
    out = {}
    for name, tp in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(tp):
            out.update(config_leaf_types(tp, prefix + name + "."))
        else:
            out[prefix + name] = tp
    return out


def format_value(value) -> str:
    """A sampled value as the right-hand side of a ``key=value`` override (YAML flow syntax)."""
    if value is None:
        return "null"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        text = repr(float(value))
        mantissa, e, exponent = text.partition("e")
        # YAML reads 1e-05 as a string: its floats need a dot in the mantissa.
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a config override")


def overrides_for(values: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(val)}" for key, val in values.items()]


def _number(value, where: str, integer: bool = False):
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integer and not float(value).is_integer()):
        raise TuneError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    return int(value) if integer else float(value)


def _reserved_reason(key: str) -> Optional[str]:
    for prefix, why in RESERVED.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return why
    return None


def parse_distribution(key: str, value, leaf_types: dict[str, Any], where: str) -> Distribution:
    """Check one ``space`` entry: a known, sweepable key and a well-formed distribution for its type."""
    if key not in leaf_types:
        raise TuneError(f"{where}: space key {key!r} is not a config key{_did_you_mean(key, leaf_types)}")
    why = _reserved_reason(key)
    if why:
        raise TuneError(f"{where}: space key {key!r} cannot be swept: {why}")
    example = "{loguniform: [1e-4, 1e-2]}, {uniform: [a, b]}, {randint: [a, b]} or {choice: [...]}"
    if not isinstance(value, dict) or len(value) != 1:
        raise TuneError(f"{where}: space key {key!r} must be one distribution such as {example}, got {value!r}")
    (kind, args), = value.items()
    at = f"{where}: space key {key!r}"
    if kind not in KINDS:
        raise TuneError(f"{at}: unknown distribution {kind!r}{_did_you_mean(kind, KINDS)} "
                        f"(one of {list(KINDS)})")
    if not isinstance(args, list) or not args:
        raise TuneError(f"{at}: {kind} takes a non-empty list, e.g. {example}; got {args!r}")
    tp = leaf_types[key]
    if kind == "choice":
        if any(isinstance(a, dict) for a in args):
            raise TuneError(f"{at}: choice values must be scalars or lists, got {args!r}")
        return Distribution(kind, list(args))
    if len(args) != 2:
        raise TuneError(f"{at}: {kind} takes [low, high], got {args!r}")
    if kind == "randint":
        if tp not in (int, float):
            raise TuneError(f"{at}: {kind} needs a numeric key, but {key} is {_type_name(tp)}; use choice")
        low, high = (_number(a, f"{at} ({kind})", integer=True) for a in args)
    else:
        if tp is not float:
            hint = "use randint or choice" if tp is int else "use choice"
            raise TuneError(f"{at}: {kind} samples floats but {key} is {_type_name(tp)}; {hint}")
        low, high = (_number(a, f"{at} ({kind})") for a in args)
    if not low < high:
        raise TuneError(f"{at}: {kind} needs low < high, got {args!r} (a constant belongs under overrides)")
    if kind == "loguniform" and low <= 0:
        raise TuneError(f"{at}: loguniform needs 0 < low < high, got {args!r}")
    return Distribution(kind, [low, high])


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _resolve_base(value, tune_file: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise TuneError(f"{where}: base must be the path of a training config, got {value!r}")
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [tune_file.parent / path, Path.cwd() / path]
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    looked = " or ".join(repr(str(c)) for c in dict.fromkeys(candidates))
    raise TuneError(f"{where}: base config {value!r} not found (looked for {looked})")


def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise TuneError(f"tune file {str(path)!r} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # yaml errors come in many types
        raise TuneError(f"tune file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TuneError(f"tune file {str(path)!r} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def _split_cli_overrides(items: list[str], where: str) -> tuple[dict, list[str]]:
    """``key=value`` arguments: tune keys (``num_samples=16``, ``scheduler.grace_period=2``) change
    the tune file; everything else is a config override for every trial."""
    from omegaconf import OmegaConf

    tune_updates, config_overrides = {}, []
    for item in items:
        key, eq, _ = item.partition("=")
        if not eq or not key:
            raise TuneError(f"{where}: argument {item!r} must look like key=value (num_samples=16, train.lr=1e-3)")
        top = key.split(".")[0]
        if top not in TUNE_KEYS:
            config_overrides.append(item)
            continue
        if top in ("space", "overrides"):
            raise TuneError(f"{where}: {top!r} cannot be set on the command line; edit the tune file "
                            "(config keys such as train.epochs=4 apply to every trial)")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except Exception as exc:
            raise TuneError(f"{where}: argument {item!r}: {str(exc).splitlines()[0]}") from None
        for k, v in parsed.items():
            if k == "scheduler" and isinstance(v, dict):
                tune_updates.setdefault("scheduler", {}).update(v)
            else:
                tune_updates[k] = v
    return tune_updates, config_overrides


def _merge_scheduler(old, new):
    if isinstance(new, dict):
        base = {"type": old} if isinstance(old, str) else dict(old or {})
        base.update(new)
        return base
    return new


def _is_training_config(raw: dict) -> bool:
    top = {f.name for f in dataclasses.fields(Config)}
    return "space" not in raw and bool(raw) and set(raw) <= top


def default_space(cfg: Config) -> dict[str, dict]:
    """The sweep run on a plain training config: the learning rate around its value and the ELBO's
    expert and prior weights around 1."""
    lr = cfg.train.lr
    return {"train.lr": {"loguniform": [lr / 3, lr * 3]},
            "loss.expert_weight": {"loguniform": [0.5, 2.0]},
            "loss.prior_weight": {"loguniform": [0.5, 2.0]}}


def load_tune_spec(path: str | Path, cli_overrides: Optional[list[str]] = None) -> TuneSpec:
    """Read and validate a tune file (or a training config, swept over :func:`default_space`).

    Every value the space can produce at its corners (both ends of a range, every choice), alone
    and all lows / all highs together, is checked through :func:`load_config`, so a sweep does not
    launch trials that are bound to fail on their config.
    """
    tune_file = Path(path).resolve()
    where = str(path)
    raw = _read_yaml(tune_file)
    updates, extra_overrides = _split_cli_overrides(list(cli_overrides or []), where)
    if _is_training_config(raw):
        log.info("%s is a training config: sweeping the default space (train.lr, loss.expert_weight, "
                 "loss.prior_weight); write a tune file to choose your own (docs/tune.md)", where)
        base_cfg = load_config(tune_file, extra_overrides)
        raw = {"base": str(tune_file), "space": default_space(base_cfg)}
    for key in raw:
        if key not in TUNE_KEYS:
            hint = _did_you_mean(key, TUNE_KEYS)
            if not hint and key in {f.name for f in dataclasses.fields(Config)}:
                hint = "; config settings go under overrides: [key=value, ...] or in the base config"
            raise TuneError(f"{where}: unknown tune key {key!r}{hint}")
    for key, val in updates.items():
        raw[key] = _merge_scheduler(raw.get(key), val) if key == "scheduler" else val

    base = _resolve_base(raw["base"], tune_file, where) if raw.get("base") is not None else None
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise TuneError(f"{where}: overrides must be a list of key=value strings, got {overrides!r}")
    overrides = list(overrides) + extra_overrides
    try:
        base_cfg = load_config(base, overrides)
    except ConfigError as exc:
        raise TuneError(f"{where}: base config and overrides: {exc}") from None

    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise TuneError(f"{where}: space must map config keys to distributions, e.g. "
                        "space: {train.lr: {loguniform: [1e-4, 1e-2]}}")
    leaf_types = config_leaf_types()
    space = {str(k): parse_distribution(str(k), v, leaf_types, where) for k, v in space_raw.items()}

    spec = TuneSpec(source=tune_file, base=base, overrides=overrides, space=space,
                    epochs=base_cfg.train.epochs)
    _fill_settings(spec, raw, where)
    if spec.epochs < 1:
        raise TuneError(f"{where}: train.epochs is {spec.epochs}; a sweep needs at least one epoch per trial")
    if spec.scheduler == "asha" and spec.grace_period > spec.epochs:
        raise TuneError(f"{where}: scheduler.grace_period ({spec.grace_period}) exceeds train.epochs "
                        f"({spec.epochs}), the trial budget")
    _check_samples(spec, base_cfg, where)
    return spec


def _fill_settings(spec: TuneSpec, raw: dict, where: str) -> None:
    def integer(key, low):
        if key in raw:
            val = raw[key]
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise TuneError(f"{where}: {key} must be an integer >= {low}, got {val!r}")
            setattr(spec, key, val)

    def real(key, low, strict):
        if key in raw:
            val = _number(raw[key], f"{where}: {key}")
            if val < low or (strict and val == low):
                raise TuneError(f"{where}: {key} must be {'>' if strict else '>='} {low}, got {raw[key]!r}")
            setattr(spec, key, val)

    def one_of(key, choices):
        if key in raw:
            if raw[key] not in choices:
                raise TuneError(f"{where}: {key} must be one of {list(choices)}, got {raw[key]!r}"
                                f"{_did_you_mean(raw[key], choices)}")
            setattr(spec, key, raw[key])

    integer("num_samples", 1)
    integer("workers_per_trial", 1)
    integer("max_concurrent_trials", 0)
    real("cpus_per_worker", 0, strict=True)
    real("gpus_per_worker", 0, strict=False)
    one_of("search", SEARCHES)
    if "metric" in raw and raw["metric"] == "val_accuracy":
        raise TuneError(f"{where}: metric val_accuracy uses the labels, which an unsupervised model must not be "
                        "selected on; trials are ranked by val_elbo and val_accuracy is only reported")
    one_of("metric", METRICS)
    if raw.get("mode", "max") != "max":
        raise TuneError(f"{where}: mode must be 'max' (the ELBO is maximised), got {raw['mode']!r}")
    if raw.get("search_seed") is not None:
        integer("search_seed", 0)
    if raw.get("storage_path") is not None:
        if not isinstance(raw["storage_path"], str) or not raw["storage_path"]:
            raise TuneError(f"{where}: storage_path must be a directory path, got {raw['storage_path']!r}")
        spec.storage_path = Path(raw["storage_path"]).expanduser().resolve()
    if raw.get("name") is not None:
        name = str(raw["name"])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise TuneError(f"{where}: name must be a plain directory name (letters, digits, . _ -), got {name!r}")
        spec.name = name

    sched = raw.get("scheduler", "asha")
    sched = {"type": sched} if isinstance(sched, str) else sched
    if not isinstance(sched, dict):
        raise TuneError(f"{where}: scheduler must be 'asha', 'fifo' or a mapping such as "
                        f"{{type: asha, grace_period: 1, reduction_factor: 2}}, got {sched!r}")
    for key in sched:
        if key not in SCHEDULER_KEYS:
            raise TuneError(f"{where}: unknown scheduler key {key!r}{_did_you_mean(key, SCHEDULER_KEYS)}")
    kind = sched.get("type", "asha")
    if kind not in SCHEDULERS:
        raise TuneError(f"{where}: scheduler type must be one of {list(SCHEDULERS)}, got {kind!r}"
                        f"{_did_you_mean(kind, SCHEDULERS)}")
    spec.scheduler = kind
    if "grace_period" in sched:
        gp = sched["grace_period"]
        if isinstance(gp, bool) or not isinstance(gp, int) or gp < 1:
            raise TuneError(f"{where}: scheduler.grace_period must be an integer >= 1 (epochs), got {gp!r}")
        spec.grace_period = gp
    if "reduction_factor" in sched:
        rf = _number(sched["reduction_factor"], f"{where}: scheduler.reduction_factor")
        if rf <= 1:
            raise TuneError(f"{where}: scheduler.reduction_factor must be > 1, got {rf}")
        spec.reduction_factor = rf


def _check_samples(spec: TuneSpec, base_cfg: Config, where: str) -> None:
    def check(values: dict, what: str):
        try:
            load_config(spec.base, spec.overrides + overrides_for(values))
        except ConfigError as exc:
            raise TuneError(f"{where}: {what} gives an invalid config: {exc}") from None

    for key, dist in spec.space.items():
        for val in dist.corners():
            check({key: val}, f"space key {key!r} value {val!r}")
    check({k: d.corners()[0] for k, d in spec.space.items()}, "the space's lowest/first values together")
    check({k: d.corners()[-1] for k, d in spec.space.items()}, "the space's highest/last values together")

    from pima_hpc.train.splits import has_split

    if not has_split(base_cfg.data, "val"):
        from pima_hpc.data.layout import list_splits

        raise TuneError(f"{where}: trials are ranked by {spec.metric}, which needs a validation split, but "
                        f"{base_cfg.data.path!r} has no split {base_cfg.data.val_split!r} (its splits: "
                        f"{', '.join(list_splits(base_cfg.data.path))}); name another with data.val_split=... "
                        "under overrides (selection uses its ELBO, never its labels) or rebuild the data "
                        "with a validation split")


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
        history = [h for h in trainer.state["history"] if "stage" not in h]
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


def _trial_dirname(trial) -> str:
    return trial.trial_id


# Where a multi-worker trial's rank 0 records the placement group Ray Train reserved its workers in.
PG_FILE = "ddp_placement_group"


def _free_train_placement_group(trial_dir: Path) -> None:
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
            _free_train_placement_group(exp / trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            _free_train_placement_group(exp / trial.trial_id)

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
    from pima_hpc.train.checkpoint import atomic_write_text

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
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time_attr=epoch (not Tune's count of reports): a restarted trial resumes its checkpoint
        # and reports the true epoch, so ASHA's rungs stay right across --resume.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.epochs, grace_period=spec.grace_period,
                                  reduction_factor=spec.reduction_factor)
    tune_config = tune.TuneConfig(metric=spec.metric, mode="max", search_alg=_searcher(spec, concurrency),
                                  scheduler=scheduler, num_samples=spec.num_samples,
                                  trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname)
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
        log.info("sweep %s: %s, %d trial(s) of %d worker(s), metric %s (max)", exp, spec.scheduler,
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


# ---------------------------------------------------------------------------------------------
# Results: the ranked table and the best config


@dataclass
class TrialRow:
    trial_id: str
    metric: float  # nan when the trial reported nothing
    val_accuracy: Optional[float]
    epochs: int
    status: str  # done | stopped (early, by the scheduler) | error | interrupted (--resume continues it)
    params: dict
    error: str = ""


@dataclass
class SweepResult:
    experiment_dir: Path
    rows: list[TrialRow]
    best: Optional[TrialRow]
    results_csv: Path
    best_config: Optional[Path]


def rows_from_results(grid, spec: TuneSpec) -> list[TrialRow]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = {k: (result.config or {}).get(k) for k in spec.space}
        epochs = int(m.get("epoch") or 0)
        value = m.get(spec.metric)
        if result.error is not None:
            status = "error"
        elif value is None:
            status = "interrupted"  # started, reported nothing
        elif epochs >= spec.epochs:
            status = "done"
        else:  # Tune marks the last result of a trial its scheduler stopped as done
            status = "stopped" if m.get("done") else "interrupted"
        err = str(result.error).strip().splitlines()[-1][:300] if result.error is not None else ""
        rows.append(TrialRow(trial_id=m.get("trial_id") or Path(result.path).name,
                             metric=float(value) if value is not None else math.nan,
                             val_accuracy=m.get("val_accuracy"), epochs=epochs, status=status, params=params,
                             error=err))
    return rank_rows(rows)


def rank_rows(rows: list[TrialRow]) -> list[TrialRow]:
    """Best first (highest metric); trials without the metric last."""
    return sorted(rows, key=lambda r: (math.isnan(r.metric), -r.metric if not math.isnan(r.metric) else 0.0,
                                       r.trial_id))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, str)):
        return json.dumps(value)
    return repr(float(value)) if isinstance(value, float) else str(value)


def write_results_csv(rows: list[TrialRow], path: Path, metric: str, space_keys: list[str]) -> None:
    import io

    from pima_hpc.train.checkpoint import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "trial_id", metric, "val_accuracy", "epochs", "status", *space_keys, "error"])
    for i, r in enumerate(rows, 1):
        writer.writerow([i, r.trial_id, repr(r.metric) if not math.isnan(r.metric) else "",
                         "" if r.val_accuracy is None else repr(float(r.val_accuracy)), r.epochs, r.status,
                         *[_csv_value(r.params.get(k)) for k in space_keys], r.error])
    atomic_write_text(path, buf.getvalue())


def format_table(rows: list[TrialRow], metric: str, space_keys: list[str]) -> str:
    header = ["#", "trial", metric, "val_acc", "epochs", "status", *space_keys]
    body = [[str(i), r.trial_id, _cell(r.metric),
             "" if r.val_accuracy is None else f"{100 * float(r.val_accuracy):.1f}%", str(r.epochs), r.status,
             *[_cell(r.params.get(k)) for k in space_keys]] for i, r in enumerate(rows, 1)]
    widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + body]
    return "\n".join(lines)


def write_best_config(exp: Path, best: TrialRow, metric: str) -> Path:
    """The sweep's base config with the best trial's values, ready for ``pima train``."""
    from omegaconf import OmegaConf

    from pima_hpc.train.checkpoint import atomic_write_text

    values = {k: v for k, v in best.params.items() if v is not None}
    run_dir = format_value(str(exp / "best"))
    cfg = load_config(exp / "base_config.yaml", overrides_for(values) + [f"run_dir={run_dir}"])
    acc = "" if best.val_accuracy is None else f", val_accuracy {float(best.val_accuracy):.4f}"
    header = [f"# Best trial {best.trial_id} of the sweep in {exp}: {metric} {best.metric:.6g}{acc} "
              f"after {best.epochs} epoch(s).",
              *[f"#   {k} = {format_value(v)}" for k, v in values.items()],
              f"# Train it: pima train {exp / 'best_config.yaml'}"]
    path = exp / "best_config.yaml"
    atomic_write_text(path, "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path


def finish_sweep(rows: list[TrialRow], spec: TuneSpec, exp: Path) -> SweepResult:
    keys = list(spec.space)
    csv_path = exp / "results.csv"
    write_results_csv(rows, csv_path, spec.metric, keys)
    print(format_table(rows, spec.metric, keys))
    print(f"results: {csv_path}")
    for r in rows:
        if r.status == "error":
            log.warning("trial %s failed: %s (see %s)", r.trial_id, r.error, exp / r.trial_id / "error.txt")
    best = rows[0] if rows and not math.isnan(rows[0].metric) else None
    if best is None:
        first = next((r for r in rows if r.error), None)
        detail = f"; first error ({first.trial_id}): {first.error}" if first else ""
        raise TuneError(f"no trial of the sweep in {str(exp)!r} reported {spec.metric}{detail}")
    best_path = write_best_config(exp, best, spec.metric)
    acc = "" if best.val_accuracy is None else f", val_accuracy {100 * float(best.val_accuracy):.1f}%"
    print(f"best trial {best.trial_id}: {spec.metric} {best.metric:.6g}{acc}, {best.epochs} epoch(s); "
          + " ".join(f"{k}={format_value(v)}" for k, v in best.params.items()))
    print(f"best config: {best_path}  (train it: pima train {best_path})")
    if any(r.status == "interrupted" for r in rows) or len(rows) < spec.num_samples:
        print(f"the sweep did not finish; continue it with: pima tune {spec.source} name={exp.name} "
              f"storage_path={exp.parent} --resume")
    return SweepResult(exp, rows, best, csv_path, best_path)


# ---------------------------------------------------------------------------------------------
# The command line


def cmd_tune(args) -> int:
    spec = load_tune_spec(args.config, args.overrides)
    run_sweep(spec, resume=args.resume, address=args.address, num_cpus=args.num_cpus, verbose=args.verbose)
    return 0


def add_tune_command(sub) -> None:
    import argparse

    p = sub.add_parser(
        "tune", help="Ray Tune sweep over a tune file (configs/tune_*.yaml)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hyperparameter sweep with Ray Tune (docs/tune.md). Trials are ranked by the validation "
                    "ELBO;\nthe sweep directory (storage_path/name) gets results.csv and best_config.yaml.",
        epilog="examples:\n"
               "  pima tune configs/tune_digits.yaml\n"
               "  pima tune configs/tune_digits.yaml num_samples=16 workers_per_trial=2 train.epochs=6\n"
               "  pima tune configs/tune_digits.yaml --resume           # the newest sweep of this file\n"
               "  pima tune configs/tune_lattice.yaml --address head-node:6379")
    p.add_argument("config", help="tune file; a plain training config sweeps train.lr and the loss weights")
    p.add_argument("overrides", nargs="*",
                   help="key=value: tune keys (num_samples=16, name=x, scheduler.grace_period=2) change the tune "
                        "file; config keys (train.epochs=4) apply to every trial")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (name=..., else the newest sweep of this file)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a local Ray instance (default: max(4, cores))")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the trials' logs")
    p.set_defaults(func=cmd_tune)
