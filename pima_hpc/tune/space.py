"""The search space of a tune file: one distribution per config key, checked against the run
config's schema, and sampled values written back as ``key=value`` overrides (no Ray here until a
distribution is handed to it)."""

from __future__ import annotations

import dataclasses
import json
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Optional

from pima_hpc.config import Config
from pima_hpc.tune.errors import TuneError, did_you_mean

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
        raise TuneError(f"{where}: space key {key!r} is not a config key{did_you_mean(key, leaf_types)}")
    why = _reserved_reason(key)
    if why:
        raise TuneError(f"{where}: space key {key!r} cannot be swept: {why}")
    example = "{loguniform: [1e-4, 1e-2]}, {uniform: [a, b]}, {randint: [a, b]} or {choice: [...]}"
    if not isinstance(value, dict) or len(value) != 1:
        raise TuneError(f"{where}: space key {key!r} must be one distribution such as {example}, got {value!r}")
    (kind, args), = value.items()
    at = f"{where}: space key {key!r}"
    if kind not in KINDS:
        raise TuneError(f"{at}: unknown distribution {kind!r}{did_you_mean(kind, KINDS)} "
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
