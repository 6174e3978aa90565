"""Streaming sufficient statistics and the closed-form M-steps (Algorithm 1, eqs 16-17).

E-step, statistics and M-step are separate pure functions, in the manner of scikit-learn's
GaussianMixture: the statistics are plain float64 arrays, which is exactly what a cross-worker
sum needs (ERRATA 6: they add across batches and across workers, so the distributed result is
the single-process result).

Per cluster c, with gamma_cd = p(c | z_d) and q(z_d|X_d) = N(mu_d, diag s_d^2):
    latent:  N0_c = sum_d gamma_cd,  N1_c = sum_d gamma_cd mu_d,  N2_c = sum_d gamma_cd (mu_d^2 + s_d^2)
    curves:  S0_c = sum_d gamma_cd,  S1_c = sum_d gamma_cd x_d,   S2_c = sum_d gamma_cd ||x_d||^2
             and, for scale-free experts, M2_c = sum_d gamma_cd x_d x_d^T (L x L)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class StreamingStatistics(Mapping):
    """Named float64 accumulators: add batch contributions, reduce over workers, decay (RLS forgetting).
    Read like a dict of arrays."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.values = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}

    def add(self, **batch: np.ndarray) -> None:
        for k, v in batch.items():
            self.values[k] += v

    def decay(self, factor: float) -> None:
        """Multiply every statistic by ``factor`` (the forgetting factor lambda of recursive least squares)."""
        for v in self.values.values():
            v *= factor

    def merge(self, other: "StreamingStatistics") -> None:
        self.add(**other.values)

    def arrays(self) -> list[np.ndarray]:
        return list(self.values.values())

    def set_arrays(self, arrays: list[np.ndarray]) -> None:
        for k, a in zip(self.values, arrays):
            self.values[k] = np.asarray(a, dtype=np.float64).reshape(self.values[k].shape)

    def reduce(self, collective) -> None:
        """Replace every statistic by its sum over all workers (one collective call)."""
        self.set_arrays(collective.allreduce_sum(self.arrays()))

    def __getitem__(self, key: str) -> np.ndarray:
        return self.values[key]

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def latent_shapes(n_clusters: int, latent_dim: int, full: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of :func:`latent_statistics` (``full``: with the second-moment matrices of full covariances)."""
    c, l = n_clusters, latent_dim
    shapes = {"n0": (c,), "n1": (c, l), "n2": (c, l), "count": ()}
    if full:
        shapes["n2_full"] = (c, l, l)
    return shapes


def latent_statistics(gamma: np.ndarray, mu: np.ndarray, var: np.ndarray, full: bool = False) -> dict[str, np.ndarray]:
    """E-step sufficient statistics of one batch: gamma (B, C), mu and var (B, l), all float64.

    ``full`` adds N2full_c = sum_d gamma_cd (mu_d mu_d^T + diag s_d^2) (C, l, l) for full covariances."""
    out = {"n0": gamma.sum(0), "n1": gamma.T @ mu, "n2": gamma.T @ (mu ** 2 + var), "count": np.array(len(mu), float)}
    if full:
        out["n2_full"] = np.einsum("bc,bi,bj->cij", gamma, mu, mu, optimize=True)
        out["n2_full"][:, np.arange(mu.shape[1]), np.arange(mu.shape[1])] += gamma.T @ var
    return out


def curve_statistics(gamma: np.ndarray, x: np.ndarray, second_moment: bool = False) -> dict[str, np.ndarray]:
    """Gamma-weighted curve sums of one batch (the RLS information for eq 17): gamma (B, C), x (B, L).

    ``second_moment`` adds M2 = sum gamma x x^T (C, L, L), which a free-amplitude expert needs.
    """
    out = {"s0": gamma.sum(0), "s1": gamma.T @ x, "s2": gamma.T @ (x ** 2).sum(1)}
    if second_moment:
        out["m2"] = np.einsum("bc,bi,bj->cij", gamma, x, x, optimize=True)
    return out


def m_step_means(n0: np.ndarray, n1: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Cluster means mu_c = sum gamma mu / sum gamma (eq 16); a cluster with no weight keeps its mean."""
    has = n0 > 1e-10
    out = np.array(prev, dtype=np.float64, copy=True)
    out[has] = n1[has] / n0[has, None]
    return out


def m_step_variances(n0: np.ndarray, n1: np.ndarray, n2: np.ndarray, prev: np.ndarray,
                     min_var: float = 1e-6) -> np.ndarray:
    """ELBO-optimal sigma_cj^2 = sum gamma (s^2 + (mu - mu_c)^2) / sum gamma, floored at ``min_var``.

    The posterior variance s^2 enters because the closed-form ELBO takes E_q over z, not a point.
    """
    has = n0 > 1e-10
    out = np.array(prev, dtype=np.float64, copy=True)
    mean = n1[has] / n0[has, None]
    out[has] = np.maximum(n2[has] / n0[has, None] - mean ** 2, min_var)
    return out


def m_step_full_covariances(n0: np.ndarray, n1: np.ndarray, n2_full: np.ndarray, prev: np.ndarray,
                            min_var: float = 1e-6) -> np.ndarray:
    """ELBO-optimal full covariances Sigma_c = sum gamma ((mu - mu_c)(mu - mu_c)^T + diag s^2) / sum gamma,
    with ``min_var`` added to the diagonal (as scikit-learn's reg_covar) so each stays positive definite;
    a cluster with no weight keeps ``prev`` (C, l, l)."""
    has = n0 > 1e-10
    out = np.array(prev, dtype=np.float64, copy=True)
    mean = n1[has] / n0[has, None]
    cov = n2_full[has] / n0[has, None, None] - np.einsum("ci,cj->cij", mean, mean)
    out[has] = 0.5 * (cov + np.swapaxes(cov, 1, 2)) + min_var * np.eye(n1.shape[1])
    return out


def m_step_tied_variance(n0: np.ndarray, n1: np.ndarray, n2: np.ndarray, min_var: float = 1e-6) -> float:
    """One spherical variance shared by every cluster and axis (a "tied" mixture).

    sigma^2 = sum_c sum_j (N2_cj - N1_cj^2 / N0_c) / (N l). With equal variances argmax_c p(c|z)
    is the nearest mean (shifted by log pi), so a cluster that happens to be tight along one axis
    cannot lose its own samples to a broad neighbour.
    """
    has = n0 > 1e-10
    within = (n2[has] - n1[has] ** 2 / n0[has, None]).sum()
    return float(max(within / (n0.sum() * n1.shape[1]), min_var))


def m_step_weights(n0: np.ndarray, min_weight: float = 1e-6) -> np.ndarray:
    """Mixture weights pi_c = N0_c / N (eq 9's optimum), kept away from 0 so log pi stays finite."""
    pi = np.maximum(n0 / max(n0.sum(), 1e-300), min_weight)
    return pi / pi.sum()


def expert_noise_variance(s0: np.ndarray, s1: np.ndarray, s2: np.ndarray, curves: np.ndarray,
                          prev: np.ndarray, floor_var: float) -> np.ndarray:
    """sigma_hat_c^2 = sum_d gamma_cd ||x_d - E_c||^2 / (L sum_d gamma_cd) from the statistics.

    sum gamma ||x - E||^2 = S2 - 2 E . S1 + S0 ||E||^2, all in the same (normalised) units.
    """
    has = s0 > 1e-10
    out = np.array(prev, dtype=np.float64, copy=True)
    sse = s2 - 2.0 * (curves * s1).sum(1) + s0 * (curves ** 2).sum(1)
    out[has] = np.maximum(sse[has] / (s0[has] * curves.shape[1]), floor_var)
    return out


def profiled_noise_variance(s0: np.ndarray, m2: np.ndarray, shapes: np.ndarray, prev: np.ndarray,
                            floor_var: float) -> np.ndarray:
    """sigma_hat_c^2 of a free-amplitude expert: sum_d gamma_cd min_a ||x_d - a m_c||^2 / (L S0_c).

    The profiled residual sum is tr(M2_c) - m_c^T M2_c m_c / m_c^T m_c (pima_hpc.model.experts), in
    the units of the statistics; ``shapes`` (C, L) are the clusters' curves in those units.
    """
    has = s0 > 1e-10
    out = np.array(prev, dtype=np.float64, copy=True)
    quad = np.einsum("ci,cij,cj->c", shapes, m2, shapes) / np.maximum((shapes ** 2).sum(1), 1e-300)
    sse = np.trace(m2, axis1=1, axis2=2) - quad
    out[has] = np.maximum(sse[has] / (s0[has] * shapes.shape[1]), floor_var)
    return out


def regression_statistics(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Sums of one batch for a least-squares regression of y (B, K) on x (B, p): X^T X, X^T Y, sum y^2, n."""
    return {"xtx": x.T @ x, "xty": x.T @ y, "yty": (y ** 2).sum(0), "n": np.array(float(len(x)))}


def solve_regression(xtx: np.ndarray, xty: np.ndarray, yty: np.ndarray, n: float, ridge: float = 1e-8,
                     min_var: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of every target column from the summed statistics -> (coef (p, K), residual variance (K,)).

    ``ridge`` (relative to the mean diagonal of X^T X) keeps a constant feature solvable; the residual
    variance sum (y - x w)^2 / n = (sum y^2 - 2 w . X^T y + w^T X^T X w) / n is floored at ``min_var``.
    """
    p = len(xtx)
    a = xtx + ridge * max(np.trace(xtx) / p, 1e-300) * np.eye(p)
    coef = np.linalg.solve(a, xty)
    sse = yty - 2.0 * (coef * xty).sum(0) + np.einsum("ik,ij,jk->k", coef, xtx, coef)
    return coef, np.maximum(sse / max(float(n), 1.0), min_var)
