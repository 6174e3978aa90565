"""Weighted recursive least squares in information form for the cluster experts (eq 17).

For cluster c and a law that is linear on candidate design k (one design for a linear expert,
one per yield-point split for strain hardening; Expert.candidate_designs), eq 17 needs only

    Q_ck = sum_d gamma_cd D_k(t_d)^T M_d D_k(t_d)      b_ck = sum_d gamma_cd D_k(t_d)^T M_d x_d
    yy_c = sum_d gamma_cd x_d^T M_d x_d                 n_c  = sum_d gamma_cd 1^T M_d 1,  w_c = sum_d gamma_cd

(M_d: the mask of sample d's valid points; a free amplitude needs A2_ck = sum_d gamma_cd
D_k^T x_d x_d^T D_k instead of Q on a shared grid). This is the information form of recursive
least squares: each step adds its batch's information, with forgetting factor lambda applied
per step,

    I_s = lambda I_{s-1} + Delta I_s ,    theta_s = argmin from I_s ,   P_s = sigma^2 Q_s^-1 ,

which equals the covariance (gain) form of RLS (tests/test_rls.py) and needs no shared grid: every
sample brings its own t_d and length. Information adds across workers too. Each worker keeps
the increments since the last sync, already decayed step by step (``pending``); a sync replaces
the total by lambda^s total + (the pending part summed over workers), which is exactly the
single-process recursion over the global batches. The sum itself is the caller's one collective
call: this module knows nothing about workers.
"""

from __future__ import annotations

import numpy as np

from pima_hpc.model.experts import Expert


class SyncedSums:
    """Named float64 sums with a worker-local pending part and a total summed over workers.

    ``step(increments)`` decays the pending part by the per-step forgetting factor and adds this
    step's increments; ``absorb(summed)`` takes the pending parts summed over workers:
    total <- lambda^steps total + summed (steps since the last sync are the same on every worker).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], forgetting: float = 1.0):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"per-step forgetting factor must be in (0, 1], got {forgetting}")
        self.forgetting = float(forgetting)
        self.total = {k: np.zeros(s) for k, s in shapes.items()}
        self.pending = {k: np.zeros(s) for k, s in shapes.items()}
        self.steps = 0

    def step(self, increments: dict[str, np.ndarray]) -> None:
        for k, v in self.pending.items():
            if self.forgetting < 1.0:
                v *= self.forgetting
            v += increments[k]
        self.steps += 1

    def pending_arrays(self) -> list[np.ndarray]:
        return list(self.pending.values())

    def absorb(self, summed: list[np.ndarray]) -> None:
        decay = self.forgetting ** self.steps
        for (k, tot), s in zip(self.total.items(), summed):
            self.total[k] = np.array(decay * tot + np.asarray(s, dtype=np.float64).reshape(tot.shape))
            self.pending[k][...] = 0.0
        self.steps = 0

    def reset(self) -> None:
        for part in (self.total, self.pending):
            for v in part.values():
                v[...] = 0.0
        self.steps = 0

    def pending_vector(self) -> np.ndarray:
        """This worker's pending sums, flattened (a checkpoint stores every worker's row)."""
        return np.concatenate([v.ravel() for v in self.pending.values()])

    def set_pending_vector(self, vector: np.ndarray, steps: int) -> None:
        i = 0
        for v in self.pending.values():
            v[...] = np.asarray(vector[i:i + v.size]).reshape(v.shape)
            i += v.size
        self.steps = int(steps)

    def state(self) -> dict[str, np.ndarray]:
        """The synced totals (the pending part is stored apart, per worker)."""
        return {k: v.copy() for k, v in self.total.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for k in self.total:
            self.total[k] = np.array(np.asarray(state[k], dtype=np.float64).reshape(self.total[k].shape))
            self.pending[k][...] = 0.0
        self.steps = 0

    def __getitem__(self, key: str) -> np.ndarray:
        return self.total[key]


def information_shapes(expert: Expert, n_clusters: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the information of ``n_clusters`` clusters (module docstring)."""
    k, _, p = expert.candidate_designs(expert.t).shape
    c = n_clusters
    shapes = {"w": (c,), "b": (c, k, p), "yy": (c,), "n": (c,)}
    shapes["q" if expert.amplitude == "fixed" else "a2"] = (c, k, p, p)
    return shapes


def sample_information(expert: Expert, x: np.ndarray, t: np.ndarray | None = None,
                       mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each curve's own information (as if it were a cluster of weight 1), fixed amplitude: x (B, L) in
    physical units, ``t`` (B, L) its grid and ``mask`` (B, L) its valid points -> arrays with leading axis B."""
    if expert.amplitude != "fixed":
        raise ValueError("a free-amplitude expert needs every curve on the expert's grid (its profiled "
                         "amplitude is a Rayleigh quotient only there); use model.expert_amplitude=fixed")
    x = np.asarray(x, np.float64)
    t = np.broadcast_to(expert.t, x.shape) if t is None else np.asarray(t, np.float64)
    m = np.ones_like(x) if mask is None else np.asarray(mask, np.float64)
    x = np.where(m > 0, x, 0.0)  # padding may hold anything
    t = np.where(m > 0, t, expert.t[0])  # ... and any grid value: keep designs defined, the mask zeroes them
    d = expert.candidate_designs(t)                                   # (B, K, L, p)
    dm = d * m[:, None, :, None]
    return {"w": np.ones(len(x)), "b": np.einsum("bkli,bl->bki", dm, x), "yy": (m * x ** 2).sum(1),
            "n": m.sum(1), "q": np.einsum("bkli,bklj->bkij", dm, d)}


def batch_information(expert: Expert, gamma: np.ndarray, x: np.ndarray, t: np.ndarray | None = None,
                      mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One batch's information (module docstring): gamma (B, C), curves x (B, L) in physical units.

    ``t`` (B, L) gives each curve its own grid and ``mask`` (B, L) its valid points (padding is 0);
    without them every curve lies on the expert's grid.
    """
    gamma, x = np.asarray(gamma, np.float64), np.asarray(x, np.float64)
    if t is None and mask is None:
        d = expert.candidate_designs(expert.t)                        # (K, L, p)
        w = gamma.sum(0)
        u = gamma.T @ x                                               # S1 (C, L)
        info = {"w": w, "b": np.einsum("kli,cl->cki", d, u), "yy": gamma.T @ (x ** 2).sum(1),
                "n": w * x.shape[1]}
        if expert.amplitude == "fixed":
            info["q"] = w[:, None, None, None] * np.einsum("kli,klj->kij", d, d)
        else:
            z = np.einsum("kli,bl->bki", d, x)
            info["a2"] = np.einsum("bc,bki,bkj->ckij", gamma, z, z, optimize=True)
        return info
    # information adds over samples: the gamma-weighted sum of each sample's own
    return {k: np.tensordot(gamma, v, axes=(0, 0)) for k, v in sample_information(expert, x, t, mask).items()}


def solve_information(expert: Expert, info: dict, theta_prev: np.ndarray, ridge: float = 0.0,
                      shared_grid: bool = True) -> np.ndarray:
    """theta (C, n_params) from information; clusters without weight keep ``theta_prev``. With per-sample
    grids a piecewise law keeps its breakpoints on the expert's reference grid (class docstring)."""
    theta = np.array(theta_prev, dtype=np.float64, copy=True)
    has = info["w"] > 1e-12
    if has.any():
        theta[has] = expert.solve_information({k: v[has] for k, v in info.items()}, ridge, intervals=shared_grid)
    return theta


def residual_sum(expert: Expert, info: dict, theta: np.ndarray) -> np.ndarray:
    """sum_d gamma_cd ||x_d - E(t_d; theta_c)||^2 over valid points (amplitude profiled out if free), (C,)."""
    k, y = expert.linear_coordinates(theta)
    rows = np.arange(len(theta))
    b = info["b"][rows, k]
    if "q" in info:
        return info["yy"] - 2.0 * (y * b).sum(1) + np.einsum("ci,cij,cj->c", y, info["q"][rows, k], y)
    d = expert.candidate_designs(expert.t)[k]
    gram = np.einsum("cli,clj->cij", d, d)
    quad = np.einsum("ci,cij,cj->c", y, info["a2"][rows, k], y)
    return info["yy"] - quad / np.maximum(np.einsum("ci,cij,cj->c", y, gram, y), 1e-300)


def noise_variance(expert: Expert, info: dict, theta: np.ndarray, prev: np.ndarray, floor_var: float) -> np.ndarray:
    """sigma_hat_c^2 = residual sum / weighted point count (physical units), floored; clusters without
    weight keep ``prev``."""
    has = info["w"] > 1e-10
    out = np.array(prev, dtype=np.float64, copy=True)
    out[has] = np.maximum(residual_sum(expert, info, theta)[has] / info["n"][has], floor_var)
    return out


def per_sample_fits(expert: Expert, x: np.ndarray, t: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each curve's own least-squares parameters on its own grid (the per-sample grid version of
    ``Expert.fit_samples``): (B, L) x3 -> (B, p)."""
    info = sample_information(expert, x, t, mask)
    return expert.solve_information(info, 0.0, intervals=False)


class ExpertRLS:
    """Recursive least squares for the C cluster experts of one curve modality (module docstring).

    ``shared_grid=False`` accepts curves with their own grids; a piecewise law then keeps its
    breakpoints on the expert's reference grid, where it stays linear for any sample grid.
    """

    def __init__(self, expert: Expert, n_clusters: int, forgetting: float = 1.0, shared_grid: bool = True):
        if not expert.has_information_form:
            raise ValueError(f"expert {getattr(expert, 'name', type(expert).__name__)!r} has no information form (Expert.candidate_designs), "
                             "so it cannot be solved recursively")
        self.expert = expert
        self.shared_grid = shared_grid
        self.sums = SyncedSums(information_shapes(expert, n_clusters), forgetting)

    def add(self, gamma: np.ndarray, x: np.ndarray, t: np.ndarray | None = None,
            mask: np.ndarray | None = None) -> None:
        """One step: decay the pending information and add this batch's."""
        if not self.shared_grid and t is None:
            raise ValueError("this ExpertRLS takes per-sample grids: pass t (and mask)")
        self.sums.step(batch_information(self.expert, gamma, x, t, mask))

    def solve(self, theta_prev: np.ndarray, ridge: float = 0.0) -> np.ndarray:
        """theta (C, n_params) from the synced information; clusters without weight keep theta_prev."""
        return solve_information(self.expert, self.sums.total, theta_prev, ridge, self.shared_grid)

    def residual_sum(self, theta: np.ndarray) -> np.ndarray:
        return residual_sum(self.expert, self.sums.total, theta)

    def noise_variance(self, theta: np.ndarray, prev: np.ndarray, floor_var: float) -> np.ndarray:
        return noise_variance(self.expert, self.sums.total, theta, prev, floor_var)

    def covariance(self, theta: np.ndarray, noise_var: np.ndarray, ridge: float = 0.0) -> np.ndarray:
        """P_c = sigma_c^2 (Q_ck + ridge R)^-1 of the linear coefficients at each cluster's candidate
        design (for a linear expert: of theta itself), (C, p, p). Fixed amplitude only."""
        if "q" not in self.sums.total:
            raise ValueError("the covariance of a free-amplitude shape is not a least-squares covariance")
        k, _ = self.expert.linear_coordinates(theta)
        q = self.sums.total["q"][np.arange(len(theta)), k]
        penalty = np.diag(self.expert.ridge_diagonal or np.ones(q.shape[-1]))
        return np.asarray(noise_var)[:, None, None] * np.linalg.inv(q + ridge * penalty)
