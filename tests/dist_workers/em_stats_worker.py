"""One worker of the distributed EM / least-squares tests (tests/test_distributed_training.py).

Every rank takes its contiguous block of a fixed synthetic dataset (responsibilities gamma,
posterior means and variances, and curves of two physics experts), accumulates the streaming
sufficient statistics batch by batch, sums them over ranks with ONE collective call (as
pima_hpc.train.em does) and applies the M-steps and the experts' solves to the sums. It writes
what it got to OUT/rank<r>.npz; the test compares that with :func:`closed_form` run in one process
and with scipy on the pooled data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

N, C, LATENT, POINTS = 301, 4, 3, 24  # N odd: the rank blocks are uneven (151 + 150)
BATCH = 16
T = np.linspace(0.0, 0.1, POINTS)  # strain-like grid (physical units)
AFFINE_TRUE = np.array([0.5, 2.0, 4.0, 7.0])
HARDENING_TRUE = np.array([[120.0, 0.020, 15.0], [80.0, 0.035, 5.0], [200.0, 0.050, 30.0], [60.0, 0.065, 0.0]])


def synthetic_data() -> dict[str, np.ndarray]:
    """The whole dataset, identical in every process (fixed seed)."""
    rng = np.random.default_rng(12345)
    label = rng.integers(0, C, size=N)
    logits = 4.0 * np.eye(C)[label] + rng.standard_normal((N, C))
    gamma = np.exp(logits - logits.max(1, keepdims=True))
    gamma /= gamma.sum(1, keepdims=True)
    centres = 3.0 * rng.standard_normal((C, LATENT))
    mu = centres[label] + rng.standard_normal((N, LATENT))
    var = np.exp(rng.uniform(-3.0, 0.0, size=(N, LATENT)))
    affine = AFFINE_TRUE[label, None] * T + 0.05 * rng.standard_normal((N, POINTS))
    e, eps_y, h = HARDENING_TRUE[label].T
    hardening = (e[:, None] * np.minimum(T, eps_y[:, None]) + h[:, None] * np.maximum(T - eps_y[:, None], 0.0)
                 + 0.1 * rng.standard_normal((N, POINTS)))
    # a scale-free population: each curve of its cluster's shape times its own amplitude
    amplitude = rng.uniform(0.3, 2.0, size=N)[:, None]
    scaled = amplitude * (hardening - 0.1 * rng.standard_normal((N, POINTS))) + 0.1 * rng.standard_normal((N, POINTS))
    return {"gamma": gamma, "mu": mu, "var": var, "affine": affine, "strain_hardening": hardening,
            "strain_hardening_free": scaled}


def closed_form(collective, rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
    """Rank ``rank``'s block -> batch statistics -> one reduction -> M-steps and expert solves."""
    from pima_hpc.data.base import rank_block
    from pima_hpc.model.experts import build_expert
    from pima_hpc.model.statistics import (StreamingStatistics, curve_statistics, latent_statistics,
                                           m_step_means, m_step_variances, m_step_weights)
    from pima_hpc.train.em import reduce_all

    data = synthetic_data()
    start, stop = rank_block(N, rank, world_size)
    latent = StreamingStatistics({"n0": (C,), "n1": (C, LATENT), "n2": (C, LATENT), "count": ()})
    curves = {name: StreamingStatistics({"s0": (C,), "s1": (C, POINTS), "s2": (C,)})
              for name in ("affine", "strain_hardening")}
    curves["strain_hardening_free"] = StreamingStatistics({"s0": (C,), "s1": (C, POINTS), "s2": (C,),
                                                          "m2": (C, POINTS, POINTS)})
    for a in range(start, stop, BATCH):
        b = min(a + BATCH, stop)
        g = data["gamma"][a:b]
        latent.add(**latent_statistics(g, data["mu"][a:b], data["var"][a:b]))
        for name, st in curves.items():
            st.add(**curve_statistics(g, data[name][a:b], second_moment="m2" in st.values))
    reduce_all(collective, [latent, *curves.values()])  # one collective call

    out = {"n0": latent["n0"], "n1": latent["n1"], "n2": latent["n2"], "count": latent["count"]}
    out["means"] = m_step_means(latent["n0"], latent["n1"], np.zeros((C, LATENT)))
    out["variances"] = m_step_variances(latent["n0"], latent["n1"], latent["n2"], np.ones((C, LATENT)))
    out["weights"] = m_step_weights(latent["n0"])
    for name, st in curves.items():
        free = name.endswith("_free")
        expert = build_expert(name.removesuffix("_free"), T, "free" if free else "fixed")
        out[f"s0_{name}"], out[f"s1_{name}"] = st["s0"], st["s1"]
        out[f"theta_{name}"] = expert.solve(st["s0"], st["s1"], np.zeros((C, expert.n_params)), ridge=0.0,
                                            m2=st["m2"] if free else None)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--collective", default="auto")
    args = p.parse_args()

    from pima_hpc.distributed import setup_distributed, shutdown

    ctx = setup_distributed(collective=args.collective, timeout_s=60, device="cpu")
    try:
        res = closed_form(ctx.collective, ctx.rank, ctx.world_size)
        out = Path(args.out)
        np.savez(out / f"rank{ctx.rank}.npz", **res)
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(
            {"rank": ctx.rank, "world_size": ctx.world_size, "launcher": ctx.launcher,
             "collective": type(ctx.collective).__name__}))
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
