"""Physics experts E(t; theta_c), one parameter vector per cluster (eqs 11, 13-14, 17).

Experts work in PHYSICAL units (the curve grid ``t`` and the curve values as measured), so the
fitted parameters are directly interpretable (a slope; a modulus, a yield strain, a hardening
modulus). The model maps their predictions into the normalised data space.

Eq 17's weighted least squares is solved from sufficient statistics, not by Adam: every curve of
a modality shares one grid t, so for cluster c

    sum_d gamma_cd ||x_d - E(t; theta)||^2 = S0_c ||xbar_c - E(t; theta)||^2 + const,
    S0_c = sum_d gamma_cd,  S1_c = sum_d gamma_cd x_d,  xbar_c = S1_c / S0_c   (ERRATA 9),

so the normal equations of any design are A_c = S0_c Phi^T Phi, b_c = Phi^T S1_c, and
(S0, S1) add across batches and ranks (see pima_hpc.model.statistics and docs/distributed.md).

Adding an expert is one small class registered by name:

    @register_expert("quadratic")
    class Quadratic(LinearExpert):
        param_names = ("a", "b")
        def design(self, t): return np.stack([t, t**2], axis=-1)

then ``model.expert: quadratic`` in a config.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import minimize_scalar

EXPERTS: dict[str, type["Expert"]] = {}


def register_expert(name: str):
    """Class decorator: make an expert selectable as ``model.expert: <name>``."""

    def wrap(cls):
        if name in EXPERTS:
            raise ValueError(f"expert {name!r} is already registered by {EXPERTS[name].__name__}")
        cls.name = name
        EXPERTS[name] = cls
        return cls

    return wrap


class Expert:
    """Interface of a physics expert on a fixed grid ``t`` (physical units)."""

    name: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]]

    def __init__(self, t: np.ndarray):
        self.t = np.asarray(t, dtype=np.float64)

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def evaluate(self, theta: np.ndarray) -> np.ndarray:
        """E(t; theta) for parameters (..., p) -> curves (..., L)."""
        raise NotImplementedError

    def solve(self, s0: np.ndarray, s1: np.ndarray, theta_prev: np.ndarray, ridge: float = 0.0) -> np.ndarray:
        """Eq 17 for every cluster from (S0 (C,), S1 (C, L)) in physical units -> theta (C, p).

        Clusters with no weight keep ``theta_prev``.
        """
        raise NotImplementedError

    def fit_samples(self, x: np.ndarray) -> np.ndarray:
        """Least-squares parameters of each curve alone, (N, L) -> (N, p): used to initialise clusters."""
        return self.solve(np.ones(len(x)), x, np.zeros((len(x), self.n_params)))

    def cluster_features(self, theta: np.ndarray) -> np.ndarray:
        """Features of per-sample fits (N, p) that k-means clusters to seed the clusters.

        The parameters themselves by default; an expert whose parameters mix a scale (which varies
        within a class) with a shape (which tells classes apart) should return the shape.
        """
        return theta

    def describe(self, theta: np.ndarray) -> dict[str, list[float]]:
        """Named physical parameters per cluster, for reports."""
        return {n: theta[:, i].tolist() for i, n in enumerate(self.param_names)}


class LinearExpert(Expert):
    """E(t; theta) = Phi(t) theta: eq 17 is a weighted linear least-squares problem (ERRATA 9)."""

    def design(self, t: np.ndarray) -> np.ndarray:
        """The design matrix Phi (L, p)."""
        raise NotImplementedError

    def evaluate(self, theta):
        return np.asarray(theta) @ self.design(self.t).T

    def solve(self, s0, s1, theta_prev, ridge=0.0):
        phi = self.design(self.t)
        gram = phi.T @ phi
        theta = np.array(theta_prev, dtype=np.float64, copy=True)
        eye = np.eye(len(gram))
        # Normal equations A_c = S0_c Phi^T Phi (+ ridge), b_c = Phi^T S1_c; p is tiny, so a
        # batched dense solve is exact and cheap.
        has = s0 > 1e-12
        if has.any():
            a = s0[has, None, None] * gram + ridge * eye
            b = s1[has] @ phi
            theta[has] = np.linalg.solve(a, b[..., None])[..., 0]
        return theta


@register_expert("affine")
class Affine(LinearExpert):
    """The MNIST expert E(t; theta_c) = theta_c t (Section 3.1)."""

    param_names = ("slope",)

    def design(self, t):
        return t[:, None]


@register_expert("strain_hardening")
class StrainHardening(Expert):
    """Linear strain hardening (Section 3.2; Jones 2009): elastic, then linear hardening.

    sigma(eps) = E eps                               for eps <= eps_y
               = E eps_y + H (eps - eps_y)           for eps >  eps_y
    with E > 0, H >= 0 and the yield strain eps_y inside the strain window. For a fixed eps_y the
    law is linear in (E, H) with design [min(eps, eps_y), max(eps - eps_y, 0)], so eq 17 is solved
    by variable projection: the (E, H) solve is exact for every eps_y, and a bounded scalar
    search over eps_y (a grid, then Brent refinement) finds the yield point.
    Parameters: (E, eps_y, H); the yield stress is E * eps_y.
    """

    param_names = ("modulus", "yield_strain", "hardening_modulus")
    grid_size = 96

    def __init__(self, t):
        super().__init__(t)
        lo, hi = self.t[1], self.t[-2]
        self.eps_bounds = (float(lo), float(hi))
        self.eps_grid = np.linspace(lo, hi, self.grid_size)

    def evaluate(self, theta):
        theta = np.asarray(theta, dtype=np.float64)
        e, eps_y, h = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
        return e * np.minimum(self.t, eps_y) + h * np.maximum(self.t - eps_y, 0.0)

    def _project(self, xbar: np.ndarray, eps_y: np.ndarray):
        """Best (E >= 0, H >= 0) for each curve (K, L) at yield strains eps_y (K,) -> (beta (K, 2), sse (K,))."""
        t = self.t
        p1 = np.minimum(t, eps_y[:, None])
        p2 = np.maximum(t - eps_y[:, None], 0.0)
        a11, a12, a22 = (p1 * p1).sum(1), (p1 * p2).sum(1), (p2 * p2).sum(1)
        b1, b2 = (p1 * xbar).sum(1), (p2 * xbar).sum(1)
        det = a11 * a22 - a12 ** 2
        safe = np.where(det > 0, det, 1.0)
        e = np.where(det > 0, (a22 * b1 - a12 * b2) / safe, b1 / np.maximum(a11, 1e-300))
        h = np.where(det > 0, (a11 * b2 - a12 * b1) / safe, 0.0)
        # Physical constraints: a negative hardening slope becomes a plateau (H = 0, refit E);
        # a negative modulus becomes 0 (the curve is then fitted by H alone).
        neg_h = h < 0
        e = np.where(neg_h, b1 / np.maximum(a11, 1e-300), e)
        h = np.where(neg_h, 0.0, h)
        neg_e = e < 0
        h = np.where(neg_e, np.maximum(b2, 0.0) / np.maximum(a22, 1e-300), h)
        e = np.where(neg_e, 0.0, e)
        beta = np.stack([e, h], axis=1)
        fit = beta[:, :1] * p1 + beta[:, 1:] * p2
        return beta, ((xbar - fit) ** 2).sum(1)

    def _fit_curves(self, xbar: np.ndarray, refine: bool) -> np.ndarray:
        k = len(xbar)
        sse = np.empty((k, len(self.eps_grid)))
        for j, eps in enumerate(self.eps_grid):
            sse[:, j] = self._project(xbar, np.full(k, eps))[1]
        eps_y = self.eps_grid[np.argmin(sse, axis=1)]
        if refine:
            step = self.eps_grid[1] - self.eps_grid[0]
            for i in range(k):
                lo = max(self.eps_bounds[0], eps_y[i] - step)
                hi = min(self.eps_bounds[1], eps_y[i] + step)
                res = minimize_scalar(lambda e: self._project(xbar[i:i + 1], np.array([e]))[1][0],
                                      bounds=(lo, hi), method="bounded", options={"xatol": 1e-10 * max(hi, 1e-12)})
                eps_y[i] = res.x
        beta, _ = self._project(xbar, eps_y)
        return np.stack([beta[:, 0], eps_y, beta[:, 1]], axis=1)

    def solve(self, s0, s1, theta_prev, ridge=0.0):
        theta = np.array(theta_prev, dtype=np.float64, copy=True)
        has = s0 > 1e-12
        if has.any():
            xbar = s1[has] / s0[has, None]
            theta[has] = self._fit_curves(xbar, refine=True)
        return theta

    def fit_samples(self, x):
        # Grid-only yield points: per-sample fits only seed the clustering, so Brent refinement
        # of every one of possibly millions of curves would be wasted work.
        return self._fit_curves(np.asarray(x, dtype=np.float64), refine=False)

    def cluster_features(self, theta):
        # Gibson-Ashby: modulus and yield stress scale with relative density within a topology,
        # while the yield strain and the hardening ratio H/E are density-free shape descriptors.
        e = np.maximum(theta[:, 0], 1e-12)
        return np.stack([np.log(np.maximum(theta[:, 1], 1e-12)), np.log(np.maximum(theta[:, 2], 1e-6 * e) / e)], axis=1)

    def describe(self, theta):
        out = super().describe(theta)
        out["yield_stress"] = (theta[:, 0] * theta[:, 1]).tolist()
        return out


def build_expert(name: str, t: np.ndarray) -> Expert:
    if name not in EXPERTS:
        raise ValueError(f"unknown expert {name!r}; registered experts: {sorted(EXPERTS)}")
    return EXPERTS[name](t)


def as_tensor(curves: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(curves, dtype=like.dtype, device=like.device)
