"""The tune file: its schema, validation and the search space (no Ray here).

See pima_hpc.tune for the whole picture and docs/tune.md for the format.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import numbers
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pima_hpc.config import Config, ConfigError, load_config

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
