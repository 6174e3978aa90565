"""Random train/validation/test splits shared by the builders."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held) holding out ``round(fraction * N)`` samples with each class's share.

    Per-class quotas by largest remainder, so the total is exact and every class gets
    floor or ceil of its proportional share; both index sets are returned in random order.
    """
    n = len(labels)
    n_held = int(round(fraction * n))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_held / n
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: n_held - quota.sum()]] += 1
    held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
                          + [np.zeros(0, dtype=np.int64)]).astype(np.int64)
    keep = np.setdiff1d(np.arange(n), held)
    return rng.permutation(keep), rng.permutation(held)
