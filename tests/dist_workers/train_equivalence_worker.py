"""One worker of the "2 ranks train like 1 rank" test (tests/test_distributed_training.py).

Runs the real Trainer (expert initialisation, capped multimodal epochs with DDP, the closed-form
EM/least-squares updates between epochs, evaluation, checkpoints) on a small slice of the embedded
digits, and writes every rank's final model state to OUT/<tag>-<bn>-<dtype>-rank<r>.npz (and its
epoch history to the .json beside it). Several variants run one after the other in one process
group: ``--bn`` (below) and ``--dtype`` (float64 makes the rounding of the two reduction orders
~1e-16, so parameters can be compared tightly; float32 is what training uses).

Two things in the trainer depend on how a global batch is split over ranks, and this worker pins
them down so that a 2-rank run and a 1-rank run see the same global batches:

* **Batches.** ``train.batch_size`` is per rank, and each rank shuffles its own block of the split.
  :class:`GlobalBatchSplit` instead draws one permutation of the whole split per epoch (the same
  on every rank), cuts it into global batches of ``batch_size * world_size`` and gives rank r the
  r-th part of each sorted global batch. Rank blocks stay as they are for the EM pass and
  evaluation (``shuffle=False`` batches come from the library's reader unchanged). Ranks' parts of a
  sorted global batch are consecutive, so 1 rank's batch is rank 0's part followed by rank 1's.
* **Reparameterisation noise.** The trainer seeds one generator per (step, rank), so the noise of a
  global batch depends on the split. Here eps is a fixed table indexed by the global sample index
  (patched ``elbo.reparameterize``), identical however the batch is split.

BatchNorm on CPU is per rank (torch's SyncBatchNorm is CUDA-only): each rank normalises its half
of the global batch with that half's statistics, and DDP broadcasts rank 0's running statistics
before every forward. So 2 ranks do NOT equal plain 1-rank BatchNorm over the whole batch; they
equal 1 rank whose BatchNorm normalises each rank's part separately and updates its running
statistics from rank 0's part ("ghost" BatchNorm, ``--bn ghost``). ``--bn plain`` is the ordinary
single-process model, kept as a control showing the test can tell the two apart.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_TRAIN, N_EVAL = 240, 64
EMULATED_WORLD = 2  # ghost BatchNorm splits every training batch like 2 ranks do
_current = {"index": None}


def per_sample_points(labels: np.ndarray, first_index: int, t_scale: float, x_spec) -> tuple:
    """Each digit's curve as 2 c t + eps on its own grid (8-20 uneven points of [0, 1], seeded by the sample's
    index): the (t, x, length) of a per-sample-grid curve, physical units, padded to 20. The slope is twice the
    encoder view's, so experts fitted to the points (and not to the view) are told apart by their slopes."""
    t, x, n = np.zeros((len(labels), 20)), np.zeros((len(labels), 20)), np.zeros(len(labels), np.int64)
    for i, c in enumerate(labels):
        rng = np.random.default_rng([first_index + i, 3])
        n[i] = rng.integers(8, 21)
        t[i, :n[i]] = np.sort(rng.uniform(0.0, t_scale, n[i]))
        x[i, :n[i]] = 2.0 * c * t[i, :n[i]] + 0.01 * rng.standard_normal(n[i])
        t[i, n[i]:], x[i, n[i]:] = t[i, n[i] - 1], x[i, n[i] - 1]
    return t, x, n


def _split_factory(per_sample_grids: bool = False):
    from pima_hpc.data.base import InMemorySplit, batch_sizes
    from pima_hpc.data.digits import build_digits

    class GlobalBatchSplit(InMemorySplit):
        """Training batches cut from one global permutation; everything else as InMemorySplit."""

        def batch_index_lists(self, batch_size, epoch=0, seed=0, shuffle=True):
            if not shuffle:
                return super().batch_index_lists(batch_size, epoch, seed, shuffle)
            perm = np.random.default_rng([seed, epoch]).permutation(self.num_global)
            global_batches = np.array_split(perm, self._steps(batch_size))
            return [np.array_split(np.sort(b), self.world_size)[self.rank] for b in global_batches]

        def global_counts(self, batch_size):
            return batch_sizes(self.num_global, self._steps(batch_size))

        def _steps(self, batch_size):
            return math.ceil(self.num_global / (batch_size * self.world_size))

        def read_batch(self, global_indices):
            _current["index"] = torch.as_tensor(np.asarray(global_indices), dtype=torch.int64)
            batch = super().read_batch(global_indices)
            # float64 runs: the data in the networks' dtype (the library reads float32; grids stay float64).
            return {k: v.to(torch.get_default_dtype()) if v.is_floating_point() and not k.endswith("@t") else v
                    for k, v in batch.items()}

    spec, arrays = build_digits()
    sizes = {"train": N_TRAIN, "val": N_EVAL, "test": N_EVAL}
    if per_sample_grids:  # the same digits, their curves measured on per-sample grids
        import dataclasses
        curve = dataclasses.replace(spec["curve"], points=20)
        spec = dataclasses.replace(spec, modalities=(spec["image"], curve))

    def open_split(cfg, split, rank=0, world_size=1):
        a = arrays[split]
        n = sizes[split]
        points = ({"curve": per_sample_points(a["label"][:n], {"train": 0, "val": 10**4, "test": 2 * 10**4}[split],
                                              1.0, spec["curve"])} if per_sample_grids else None)
        return GlobalBatchSplit(spec, {"image": a["image"][:n], "curve": a["curve"][:n]}, a["label"][:n],
                                rank, world_size, points=points)

    return open_split


def _patch_noise(latent_dim: int) -> None:
    from pima_hpc.model import elbo

    table = torch.from_numpy(np.random.default_rng(7).standard_normal((N_TRAIN, latent_dim)).astype(np.float32))

    def reparameterize(mu, logvar, generator=None):
        eps = table[_current["index"] % N_TRAIN].to(mu.dtype)
        assert eps.shape == mu.shape
        return mu + eps * torch.exp(0.5 * logvar)

    elbo.reparameterize = reparameterize


class _GhostBatchNorm:
    """Training-mode BatchNorm over each emulated rank's part of the batch (see the module docstring)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        sizes = [len(p) for p in np.array_split(np.arange(len(x)), EMULATED_WORLD)]
        out = []
        for r, part in enumerate(torch.split(x, sizes)):
            # Only rank 0's running statistics survive: DDP broadcasts them before every forward.
            mean, var = (self.running_mean, self.running_var) if r == 0 else (None, None)
            out.append(F.batch_norm(part, mean, var, self.weight, self.bias, True, self.momentum, self.eps))
        return torch.cat(out)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    pass


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    pass


def use_ghost_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = GhostBatchNorm1d
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = GhostBatchNorm2d


def config(run_dir: Path, batch_size: int, overrides: list[str]):
    from pima_hpc.config import load_config

    return load_config(Path(__file__).resolve().parents[2] / "configs" / "digits.yaml", [
        f"run_dir={run_dir}", f"train.batch_size={batch_size}", "train.epochs=2", "train.max_steps_per_epoch=3",
        "train.warmup_epochs=0", "train.max_warmup_epochs=0",  # the GMM M-step runs after epoch 1
        # torch's running averages, whose DDP semantics the ghost BatchNorm emulates; precise BN
        # (a plain average over ranks) has its own tests in tests/test_batchnorm.py
        "train.precise_bn_batches=0",
        "stages=[multimodal]", "figures=false", "train.progress=false", "device=cpu", *overrides])


def train(cfg, ctx, bn: str, dtype: torch.dtype):
    from pima_hpc.train import trainer as trainer_module

    torch.set_default_dtype(dtype)  # networks and closed-form buffers are created in this dtype
    trainer = trainer_module.Trainer(cfg, ctx)
    try:
        if bn == "ghost":
            assert ctx.world_size == 1, "ghost BatchNorm emulates 2 ranks inside one process"
            use_ghost_batchnorm(trainer.model)
        metrics = trainer.run()
        state = {k: v.detach().double().cpu().numpy() for k, v in trainer.model.state_dict().items()}
        return state, metrics
    finally:
        trainer.close()
        torch.set_default_dtype(torch.float32)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--batch-size", type=int, required=True, help="train.batch_size (per rank)")
    p.add_argument("--bn", nargs="+", choices=("ddp", "ghost", "plain"), default=["ddp"],
                   help="BatchNorm variant(s), trained one after the other in this process (tag-<bn>)")
    p.add_argument("--dtype", nargs="+", choices=("float64", "float32"), default=["float64"])
    p.add_argument("--per-sample-grids", action="store_true", help="the curves on per-sample grids")
    p.add_argument("overrides", nargs="*", help="extra config overrides (after --)")
    args = p.parse_args()
    out = Path(args.out)

    from pima_hpc.train import run as run_module
    from pima_hpc.train import trainer as trainer_module

    trainer_module.open_run_split = _split_factory(args.per_sample_grids)
    base = config(out, args.batch_size, args.overrides)
    _patch_noise(base.model.latent_dim)
    ctx = run_module.make_context(base)
    try:
        for bn in args.bn:
            for dtype in args.dtype:
                tag = f"{args.tag}-{bn}-{dtype}"
                cfg = config(out / f"run-{tag}", args.batch_size, args.overrides)
                state, metrics = train(cfg, ctx, bn, getattr(torch, dtype))
                np.savez(out / f"{tag}-rank{ctx.rank}.npz", **state)
                (out / f"{tag}-rank{ctx.rank}.json").write_text(json.dumps(
                    {"world_size": metrics["world_size"], "history": metrics["history"], "init": metrics["init"]}))
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
