"""``train.statistics: streaming``: Algorithm 1's EM statistics gathered inside the training pass.

Each training step already encodes its batch; the responsibilities gamma at z = mu (ERRATA 8)
from that forward pass feed the latent sums of eq 16 and the experts' recursive least squares
(pima_hpc/model/rls.py), so no second pass over the split is needed. Every ``rls_sync_steps``
steps (0: at the epoch's end) the pending sums of every part go through ONE collective call and
every rank solves the same experts; the cluster means, variances and weights are set at the
epoch's end as in the exact mode. What differs from ``train.statistics: exact``: the
responsibilities come from the encoders as they were at each step (train-mode BatchNorm,
weights moving during the epoch) instead of the epoch's final encoders in eval mode.

Forgetting (``train.rls_forgetting`` = lambda, the weight of one-epoch-old information in both
modes): 0 restarts the experts' information at every epoch; lambda > 0 decays it by
lambda^(1 / steps per epoch) at every step and never restarts it.
"""

from __future__ import annotations

import numpy as np
import torch

from pima_hpc.collective import allreduce_groups
from pima_hpc.model.pima import PIMA
from pima_hpc.model.rls import ExpertRLS, SyncedSums
from pima_hpc.model.statistics import latent_shapes, latent_statistics


class TrainingPassStatistics:
    def __init__(self, model: PIMA, steps_per_epoch: int, forgetting: float = 0.0, sync_steps: int = 0):
        c, l = model.cfg.n_clusters, model.cfg.latent_dim
        self.latent = SyncedSums(latent_shapes(c, l, model.full_covariance))
        per_step = forgetting ** (1.0 / max(steps_per_epoch, 1)) if forgetting > 0 else 1.0
        self.experts = {n: ExpertRLS(model.experts[n], c, per_step, shared_grid=n not in model.point_curves)
                        for n in model.curve_names}
        self.restart_experts = forgetting == 0
        self.sync_steps = sync_steps

    def parts(self) -> list[SyncedSums]:
        return list(self._named().values())

    def start_epoch(self) -> None:
        self.latent.reset()
        if self.restart_experts:
            for rls in self.experts.values():
                rls.sums.reset()

    @torch.no_grad()
    def add(self, model: PIMA, batch: dict, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """One training step's contribution, from the forward pass's posterior (mu, logvar)."""
        mu, logvar = mu.detach(), logvar.detach()
        gamma = model.cluster_log_posterior(batch, mu, logvar, mu).exp().double().cpu().numpy()
        self.latent.step(latent_statistics(gamma, mu.double().cpu().numpy(), logvar.exp().double().cpu().numpy(),
                                           model.full_covariance))
        for name, rls in self.experts.items():
            if name in model.point_curves:
                rls.add(gamma, *model.measured_points(name, batch))
            else:
                rls.add(gamma, model.spec[name].to_physical(batch[name].double().cpu().numpy()))

    def due(self, step: int, steps: int) -> bool:
        """Is a mid-epoch sync due after step ``step`` (0-based) of ``steps``? (The epoch's end always syncs.)"""
        return self.sync_steps > 0 and (step + 1) % self.sync_steps == 0 and step + 1 < steps

    @property
    def pending(self) -> bool:
        return any(p.steps for p in self.parts())

    def sync(self, collective) -> None:
        """Sum every part's pending sums over workers in one collective call and absorb them."""
        parts = self.parts()
        for p, summed in zip(parts, allreduce_groups(collective, [p.pending_arrays() for p in parts])):
            p.absorb(summed)

    @torch.no_grad()
    def solve_experts(self, model: PIMA, ridge: float, noise: str, noise_floor: float) -> None:
        """Eq 17 and sigma_hat_c from the synced information, identically on every rank."""
        for name, rls in self.experts.items():
            theta = rls.solve(model.theta(name), ridge)
            model.set_theta(name, theta)
            if noise == "learned":
                # the information is in physical units; the model's noise is in normalised ones
                s2 = model.spec[name].scale ** 2
                prev = model.log_noise(name).exp().double().cpu().numpy()
                var = rls.noise_variance(theta, prev * s2, noise_floor ** 2 * s2) / s2
                model.log_noise(name).copy_(torch.as_tensor(np.log(var)))

    def pending_vector(self) -> np.ndarray:
        return np.concatenate([p.pending_vector() for p in self.parts()])

    def state(self, pending_rows: np.ndarray | None = None) -> dict:
        """The synced sums and every rank's pending row (``pending_rows`` (world, n), gathered by the
        caller) as tensors: checkpoints are loaded with weights_only=True."""
        out = {name: {k: torch.from_numpy(v) for k, v in p.state().items()} for name, p in self._named().items()}
        if pending_rows is not None:
            out["pending"] = {"rows": torch.from_numpy(np.asarray(pending_rows, np.float64)),
                              "steps": torch.tensor(self.latent.steps)}
        return out

    def load_state(self, state: dict, rank: int, world_size: int) -> bool:
        """Restore the sums; a rank's pending row goes back to that rank, so a resumed epoch adds up
        exactly as an uninterrupted one. Returns False when the run was saved on another number of
        ranks: the rows are then summed into the totals (the same result up to rounding)."""
        parts = self._named()
        for name, p in parts.items():
            p.load_state({k: v.numpy() for k, v in state[name].items()})
        pending = state.get("pending")
        if pending is None:
            return True
        rows, steps = pending["rows"].numpy(), int(pending["steps"])
        same = len(rows) == world_size
        vector = rows[rank] if same else rows.sum(0)
        i = 0
        for p in parts.values():
            n = p.pending_vector().size
            p.set_pending_vector(vector[i:i + n], steps)
            i += n
        if not same:
            for p in parts.values():
                p.absorb(p.pending_arrays())
        return same

    def _named(self) -> dict[str, SyncedSums]:
        return {"latent": self.latent, **{f"expert_{n}": r.sums for n, r in self.experts.items()}}
