"""How well each expert fits a modality's curves, before training: per-sample least-squares fits
(each curve alone, physical units) and their R^2 = 1 - ||x - E(t; theta_x)||^2 / ||x - mean(x)||^2.

A cluster's expert can fit no better than the law fits its members one by one, so a low median
R^2 means the chosen law cannot describe the data, whatever the clustering (`pima data
fit-experts`, and a warning from `pima train`).
"""

from __future__ import annotations

import numpy as np

from pima_hpc.model.experts import EXPERTS, build_expert
from pima_hpc.model.rls import per_sample_fits

POOR_MEDIAN_R2 = 0.9
# Interpolates every curve exactly (one parameter per point): R^2 = 1 says nothing about a law.
UNRANKED = ("free",)


def per_sample_r2(expert, x: np.ndarray, t: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """R^2 of each curve's own least-squares fit by ``expert``: (N, L) physical units -> (N,); with ``t`` and
    ``mask`` (N, L) each curve on its own grid, over its measured points."""
    x = np.asarray(x, dtype=np.float64)
    if t is None:
        fit, m = expert.evaluate(expert.fit_samples(x)), np.ones_like(x)
    else:
        m = np.asarray(mask, np.float64)
        theta = per_sample_fits(expert, x, t, m)
        fit = np.take_along_axis(expert.evaluate_at(t, theta), np.arange(len(x))[:, None, None], 1)[:, 0]
    sse = (m * (x - fit) ** 2).sum(1)
    mean = (m * x).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1.0)
    sst = (m * (x - mean) ** 2).sum(1)
    return 1.0 - sse / np.maximum(sst, 1e-300)


def fit_table(t: np.ndarray, x: np.ndarray, names: list[str] | None = None,
              options: dict | None = None, grid: np.ndarray | None = None, mask: np.ndarray | None = None) -> list[dict]:
    """One row per expert (default: every registered one): median and 10th-percentile R^2, parameters;
    best median first. ``options`` maps an expert name to its constructor keywords. ``grid`` and ``mask``
    (N, P): each curve of ``x`` on its own grid (see :func:`per_sample_r2`)."""
    rows = []
    for name in names or sorted(EXPERTS):
        expert = build_expert(name, t, options=(options or {}).get(name))
        r2 = per_sample_r2(expert, x, grid, mask)
        rows.append({"expert": name, "params": expert.n_params, "median_r2": float(np.median(r2)),
                     "p10_r2": float(np.quantile(r2, 0.1)), "ranked": name not in UNRANKED})
    rows.sort(key=lambda r: (not r["ranked"], -r["median_r2"], r["params"]))
    return rows


def recommend(rows: list[dict], tolerance: float = 0.01) -> str | None:
    """The simplest ranked expert whose median R^2 is within ``tolerance`` of the best, if it is not poor."""
    ranked = [r for r in rows if r["ranked"]]
    if not ranked:
        return None
    best = max(r["median_r2"] for r in ranked)
    near = [r for r in ranked if r["median_r2"] >= best - tolerance]
    choice = min(near, key=lambda r: (r["params"], -r["median_r2"]))
    return choice["expert"] if choice["median_r2"] >= POOR_MEDIAN_R2 else None
