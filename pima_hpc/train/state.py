"""What a checkpoint holds beyond the weights: where the run is (:class:`TrainingState`), the random
generators' states, and which checkpoint-relevant config keys changed when a resume is refused."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class TrainingState:
    """Where a run is and what it has recorded; the driver owns it, the stages advance it, and a
    checkpoint stores it as a plain dict (:meth:`to_payload`) so a resume can replace it."""

    stage: str = "multimodal"  # multimodal -> crossmodal -> done
    epoch: int = 0  # finished epochs of the current stage
    step: int = 0  # finished steps of the current epoch (non-zero only in a mid-epoch checkpoint)
    initialized: bool = False  # the mixture and experts have been initialised (train.init)
    warm: bool = True  # still in the warm-up that holds the clusters until the latent code agrees
    history: list = field(default_factory=list)  # one metrics dict per finished epoch, both stages
    best_val_elbo: float = -math.inf
    init: dict = field(default_factory=dict)  # how the initialisation went (method, candidates, ...)
    agreement: list = field(default_factory=list)  # q(c|X) vs the held assignments, per warm-up epoch
    partial_sums: Optional[dict] = None  # this rank's running sums of an unfinished epoch
    mlflow_run_id: Optional[str] = None  # so a resumed run logs to the same MLflow run

    def to_payload(self) -> dict:
        """A plain, JSON-safe dict (a copy: later changes to the state do not reach a saved payload)."""
        import json
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def copy_from(self, other: "TrainingState") -> None:
        """Become a deep copy of ``other`` in place (whoever holds this object sees the change)."""
        from copy import deepcopy
        for f in dataclasses.fields(self):
            setattr(self, f.name, deepcopy(getattr(other, f.name)))

    @classmethod
    def from_payload(cls, payload: dict) -> "TrainingState":
        """Back from :meth:`to_payload`; keys an older checkpoint lacks take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise KeyError(f"unknown training state keys {unknown}")
        return cls(**payload)


def rng_state() -> dict:
    """The global torch, numpy and Python generators, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached)],
            "python": list(internal), "python_gauss": gauss_next}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    # random.gauss() caches its second draw: without it the next gauss() would differ.
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))


def changed_keys(old: dict | None, new: dict, prefix: str = "") -> str:
    """``"model.latent_dim: 3 -> 4, ..."`` for the checkpoint-relevant keys that differ ("" if unknown)."""
    if not old:
        return ""
    out = []
    for key in sorted(old):
        a, b = old[key], new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = changed_keys(a, b, f"{prefix}{key}.")
            out += [inner] if inner else []
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return ", ".join(out)
