"""One worker of the multi-process collective tests (tests/test_collectives.py).

Joins the others with setup_distributed(), sums every rank's float64 data through the
collective in exact and plain-allreduce modes, and writes what it saw to OUT/rank<r>.npz and
OUT/rank<r>.json for the test to compare across ranks. ``--die-rank R --die-at {setup,collective}``
makes rank R exit abruptly, and ``--raise-rank R`` makes it raise (shutdown then runs from
``finally``), to test that the other ranks fail instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def rank_data(rank: int) -> list[np.ndarray]:
    """Rank ``rank``'s arrays: deterministic, so the test can recompute every rank's data.

    The last array plants values whose float64 sum depends on the order of addition for three or
    more ranks: ((1e16 + 1) - 1e16) == 0 in rank order, but (1e16 - 1e16) + 1 == 1.
    """
    rng = np.random.default_rng(1000 + rank)
    planted = np.array([1e16, 1.0, -1e16][rank % 3] * np.ones(3))
    planted[1] = [1.0, -1e16, 1e16][rank % 3]
    return [
        rng.standard_normal((3, 4)) * 10.0 ** rng.uniform(-6, 6, size=(3, 4)),
        np.float64(rng.standard_normal()),       # 0-d
        rng.integers(-5, 5, size=5),              # ints are summed as float64
        np.zeros((0, 2)),                         # empty
        rng.standard_normal((7,)).astype(np.float32),
        planted,
    ]


def expected_sums(world_size: int) -> list[np.ndarray]:
    """The sums in rank order, computed locally from every rank's data."""
    per_rank = [rank_data(r) for r in range(world_size)]
    out = []
    for i in range(len(per_rank[0])):
        total = np.array(per_rank[0][i], dtype=np.float64)
        for r in range(1, world_size):
            total = total + np.asarray(per_rank[r][i], dtype=np.float64)
        out.append(total)
    return out


def run(ctx, args) -> None:
    coll = ctx.collective
    if ctx.rank == args.die_rank:
        sys.stdout.flush()
        os._exit(1)  # no cleanup, like a crash: the survivors must not hang
    if ctx.rank == args.raise_rank:
        raise RuntimeError(f"planted failure on rank {ctx.rank}")

    data = rank_data(ctx.rank)
    exact = coll.allreduce_sum(data)
    coll.exact = False
    fast = coll.allreduce_sum(data)
    coll.exact = True

    # Ranks disagreeing on shapes (same element count) must fail on every rank, not mix numbers.
    mismatch = {}
    for mode in (True, False):
        coll.exact = mode
        try:
            coll.allreduce_sum([np.ones((2, 3) if ctx.rank == 0 else (3, 2))])
            mismatch["exact" if mode else "fast"] = ""
        except RuntimeError as exc:
            mismatch["exact" if mode else "fast"] = str(exc)
    coll.exact = True

    token = coll.broadcast_object({"from": ctx.rank, "payload": [1, 2.5, "x"]}, root=ctx.world_size - 1)
    coll.barrier()
    out = Path(args.out)
    np.savez(out / f"rank{ctx.rank}.npz", **{f"exact_{i}": a for i, a in enumerate(exact)},
             **{f"fast_{i}": a for i, a in enumerate(fast)})
    info = {"rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
            "launcher": ctx.launcher, "mpi": ctx.launch.mpi, "collective": type(coll).__name__,
            "coll_rank": coll.rank, "coll_world": coll.world_size, "backend": ctx.backend,
            "is_root": ctx.is_root, "broadcast": token, "mismatch": mismatch,
            "dtypes": [str(a.dtype) for a in exact], "shapes": [list(a.shape) for a in exact]}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(info))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--collective", default="auto")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--die-rank", type=int, default=-1)
    p.add_argument("--die-at", choices=("setup", "collective"), default="collective")
    p.add_argument("--raise-rank", type=int, default=-1)
    args = p.parse_args()

    from pima_hpc.distributed import detect_launcher, setup_distributed, shutdown

    if detect_launcher().rank == args.die_rank and args.die_at == "setup":
        os._exit(1)
    ctx = setup_distributed(collective=args.collective, timeout_s=args.timeout, device="cpu")
    try:  # the shape of pima_hpc.train.run: shutdown in finally, also on a failing rank
        run(ctx, args)
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
