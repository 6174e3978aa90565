"""The tune file: its OmegaConf schema, the command line's tune keys, and the validated sweep (no Ray here).

See pima_hpc.tune for the whole picture and docs/tune.md for the format.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from pima_hpc.config import Config, ConfigError, load_config
from pima_hpc.tune.errors import TuneError, did_you_mean
from pima_hpc.tune.space import Distribution, config_leaf_types, overrides_for, parse_distribution

log = logging.getLogger("pima")


# ---------------------------------------------------------------------------------------------
# The tune file

SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna")
METRICS = ("val_elbo",)

DEFAULT_NUM_SAMPLES = 8
DEFAULT_STORAGE = "runs/tune"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise TuneError(message)


@dataclass
class SchedulerSchema:
    """``scheduler:`` of a tune file (or just its type: ``scheduler: fifo``)."""

    type: str = "asha"
    grace_period: int = 1        # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0

    def __post_init__(self):
        _require(self.type in SCHEDULERS, f"scheduler type must be one of {list(SCHEDULERS)}, got {self.type!r}"
                                          f"{did_you_mean(self.type, SCHEDULERS)}")
        _require(self.grace_period >= 1, f"scheduler.grace_period must be an integer >= 1 (epochs), "
                                         f"got {self.grace_period!r}")
        _require(self.reduction_factor > 1, f"scheduler.reduction_factor must be > 1, got {self.reduction_factor:g}")


@dataclass
class SweepSettings:
    """The settings a tune file gives the sweep as they are (shared by the file's schema and the validated
    :class:`TuneSpec`); the checks below run when either is built."""

    num_samples: int = DEFAULT_NUM_SAMPLES
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    search: str = "random"
    search_seed: Optional[int] = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0
    metric: str = "val_elbo"
    name: Optional[str] = None

    def __post_init__(self):
        for key, low in (("num_samples", 1), ("workers_per_trial", 1), ("max_concurrent_trials", 0)):
            _require(getattr(self, key) >= low, f"{key} must be an integer >= {low}, got {getattr(self, key)!r}")
        _require(self.search_seed is None or self.search_seed >= 0,
                 f"search_seed must be an integer >= 0, got {self.search_seed!r}")
        _require(self.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {self.cpus_per_worker:g}")
        _require(self.gpus_per_worker >= 0, f"gpus_per_worker must be >= 0, got {self.gpus_per_worker:g}")
        _require(self.search in SEARCHES, f"search must be one of {list(SEARCHES)}, got {self.search!r}"
                                          f"{did_you_mean(self.search, SEARCHES)}")
        _require(self.metric != "val_accuracy", "metric val_accuracy uses the labels, which an unsupervised model "
                 "must not be selected on; trials are ranked by val_elbo and val_accuracy is only reported")
        _require(self.metric in METRICS, f"metric must be one of {list(METRICS)}, got {self.metric!r}"
                                          f"{did_you_mean(self.metric, METRICS)}")
        _require(self.name is None or bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)),
                 f"name must be a plain directory name (letters, digits, . _ -), got {self.name!r}")


@dataclass
class TuneFileSchema(SweepSettings):
    """The tune file as written (docs/tune.md): OmegaConf merges the YAML and the command line's
    tune keys onto it and rejects unknown keys and wrong types; the checks give the rest."""

    base: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    space: Dict[str, Any] = field(default_factory=dict)
    mode: str = "max"
    storage_path: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        _require(self.mode == "max", f"mode must be 'max' (the ELBO is maximised), got {self.mode!r}")
        _require(self.storage_path is None or bool(self.storage_path),
                 f"storage_path must be a directory path, got {self.storage_path!r}")


TUNE_KEYS = tuple(f.name for f in dataclasses.fields(TuneFileSchema))


@dataclass(kw_only=True)
class TuneSpec(SweepSettings):
    """A validated tune file. Paths are absolute; ``epochs`` is the trial budget (ASHA's max_t)."""

    source: Path
    base: Optional[Path]
    overrides: list[str]
    space: dict[str, Distribution]
    epochs: int
    storage_path: Path = field(default_factory=lambda: Path(DEFAULT_STORAGE).resolve())

    @property
    def stem(self) -> str:
        return self.source.stem


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


def _split_cli_overrides(items: list[str], where: str) -> tuple[list[str], list[str]]:
    """``key=value`` arguments: tune keys (``num_samples=16``, ``scheduler.grace_period=2``) change
    the tune file; everything else is a config override for every trial."""
    tune_items, config_overrides = [], []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise TuneError(f"{where}: argument {item!r} must look like key=value (num_samples=16, train.lr=1e-3)")
        top = key.split(".")[0]
        if key == "scheduler" and not value.lstrip().startswith("{"):  # the short form, scheduler=fifo
            item = f"scheduler.type={value}"
        if top in ("space", "overrides"):
            raise TuneError(f"{where}: {top!r} cannot be set on the command line; edit the tune file "
                            "(config keys such as train.epochs=4 apply to every trial)")
        (tune_items if top in TUNE_KEYS else config_overrides).append(item)
    return tune_items, config_overrides


def _unknown_tune_key(key: str) -> str:
    top = key.split(".")[0]
    if top == "scheduler":
        sub = key.split(".", 1)[-1]
        known = [f.name for f in dataclasses.fields(SchedulerSchema)]
        return f"unknown scheduler key {sub!r}{did_you_mean(sub, known)}"
    hint = did_you_mean(top, TUNE_KEYS)
    if not hint and top in {f.name for f in dataclasses.fields(Config)}:
        hint = "; config settings go under overrides: [key=value, ...] or in the base config"
    return f"unknown tune key {top!r}{hint}"


def _read_tune_file(raw: dict, cli_items: list[str], where: str) -> TuneFileSchema:
    """The tune file and the command line's tune keys merged onto the schema, validated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    if isinstance(raw.get("scheduler"), str):  # the short form, `scheduler: fifo`
        raw = {**raw, "scheduler": {"type": raw["scheduler"]}}
    layers = [(raw, where)] + [(item, f"argument {item!r}") for item in cli_items]
    merged = OmegaConf.structured(TuneFileSchema)
    try:
        for layer, origin in layers:
            try:
                layer = OmegaConf.from_dotlist([layer]) if isinstance(layer, str) else OmegaConf.create(layer)
                merged = OmegaConf.merge(merged, layer)
            except ConfigKeyError as exc:
                raise TuneError(f"{where}: {_unknown_tune_key(exc.full_key or exc.key or '')}") from None
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", None)
                raise TuneError(f"{where}: {origin}: {('tune key ' + repr(key) + ': ') if key else ''}"
                                f"{str(exc).splitlines()[0]}") from None
        return OmegaConf.to_object(merged)
    except TuneError as exc:
        message = str(exc)
        raise TuneError(message if message.startswith(f"{where}: ") else f"{where}: {message}") from None


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
    tune_items, extra_overrides = _split_cli_overrides(list(cli_overrides or []), where)
    if _is_training_config(raw):
        log.info("%s is a training config: sweeping the default space (train.lr, loss.expert_weight, "
                 "loss.prior_weight); write a tune file to choose your own (docs/tune.md)", where)
        base_cfg = load_config(tune_file, extra_overrides)
        raw = {"base": str(tune_file), "space": default_space(base_cfg)}
    file = _read_tune_file(raw, tune_items, where)

    base = _resolve_base(file.base, tune_file, where) if file.base is not None else None
    overrides = list(file.overrides) + extra_overrides
    try:
        base_cfg = load_config(base, overrides)
    except ConfigError as exc:
        raise TuneError(f"{where}: base config and overrides: {exc}") from None

    if not file.space:
        raise TuneError(f"{where}: space must map config keys to distributions, e.g. "
                        "space: {train.lr: {loguniform: [1e-4, 1e-2]}}")
    leaf_types = config_leaf_types()
    space = {str(k): parse_distribution(str(k), v, leaf_types, where) for k, v in file.space.items()}

    settings = {f.name: getattr(file, f.name) for f in dataclasses.fields(SweepSettings)}
    spec = TuneSpec(source=tune_file, base=base, overrides=overrides, space=space, epochs=base_cfg.train.epochs,
                    **settings)
    if file.storage_path is not None:
        spec.storage_path = Path(file.storage_path).expanduser().resolve()
    if spec.epochs < 1:
        raise TuneError(f"{where}: train.epochs is {spec.epochs}; a sweep needs at least one epoch per trial")
    if spec.scheduler.type == "asha" and spec.scheduler.grace_period > spec.epochs:
        raise TuneError(f"{where}: scheduler.grace_period ({spec.scheduler.grace_period}) exceeds train.epochs "
                        f"({spec.epochs}), the trial budget")
    _check_samples(spec, base_cfg, where)
    return spec


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
