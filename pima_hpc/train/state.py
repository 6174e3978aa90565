"""What a checkpoint holds beyond the weights: the random generators' states, and which
checkpoint-relevant config keys changed when a resume is refused."""

from __future__ import annotations

import random

import numpy as np
import torch


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
