"""Physics experts E(t; theta_c), one parameter vector per cluster (eqs 11, 13-14, 17).

Experts work in PHYSICAL units (the curve grid ``t`` and the curve values as measured), so the
fitted parameters are directly interpretable (a slope; a modulus, a yield strain, a hardening
modulus). The model maps their predictions into the normalised data space.

Two likelihoods (``model.expert_amplitude``):

* ``fixed`` (eq 11): x_d = E(t; theta_c) + noise. Every curve of a modality shares one grid t, so
  for cluster c

      sum_d gamma_cd ||x_d - E(t; theta)||^2 = S0_c ||xbar_c - E(t; theta)||^2 + const,
      S0_c = sum_d gamma_cd,  S1_c = sum_d gamma_cd x_d,  xbar_c = S1_c / S0_c   (ERRATA 9),

  and the normal equations of any design are A_c = S0_c Phi^T Phi, b_c = Phi^T S1_c.
* ``free`` (scale-free): x_d = a_d E(t; theta_c) + noise with a per-sample amplitude a_d profiled
  out in closed form, a_d = <x_d, m> / <m, m> for m = E(t; theta_c). Then

      sum_d gamma_cd ||x_d - a_d m||^2 = tr(M2_c) - m^T M2_c m / m^T m,
      M2_c = sum_d gamma_cd x_d x_d^T   (L x L, the gamma-weighted second moment),

  so the shape maximises a Rayleigh quotient over the expert's family (a generalised eigenproblem
  for a linear expert) and only the shape is identified: the scale is fixed by the convention that
  the cluster's gamma-weighted mean amplitude is 1, sum_d gamma_cd a_d = S0_c, i.e. E(t; theta_c) is
  the cluster's typical curve. A curve family whose members differ only by scale (a relative
  density changes a lattice's modulus, not its topology) then groups by shape.

The statistics (S0, S1, M2) add across batches and ranks (pima_hpc.model.statistics,
docs/distributed.md). Adding an expert is one small class registered by name:

    @register_expert("quadratic")
    class Quadratic(LinearExpert):
        param_names = ("a", "b")
        def design(self, t): return np.stack([t, t**2], axis=-1)

then ``model.expert: quadratic`` in a config.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

EXPERTS: dict[str, type["Expert"]] = {}
AMPLITUDES = ("fixed", "free")


def register_expert(name: str):
    """Class decorator: make an expert selectable as ``model.expert: <name>``."""

    def wrap(cls):
        if name in EXPERTS:
            raise ValueError(f"expert {name!r} is already registered by {EXPERTS[name].__name__}")
        cls.name = name
        EXPERTS[name] = cls
        return cls

    return wrap


def top_eigenvectors(a: np.ndarray, chol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest generalised eigenpair of (A, B) with B = chol chol^T: a (..., p, p) -> (lambda (...), v (..., p)).

    max_v v^T A v / v^T B v, by the symmetric eigenproblem of chol^-1 A chol^-T (batched).
    """
    inv = np.linalg.inv(chol)
    sym = inv @ a @ np.swapaxes(inv, -1, -2)
    sym = 0.5 * (sym + np.swapaxes(sym, -1, -2))
    w, u = np.linalg.eigh(sym)
    v = np.einsum("...ji,...j->...i", inv, u[..., -1])  # chol^-T u
    return w[..., -1], v


class Expert:
    """Interface of a physics expert on a fixed grid ``t`` (physical units)."""

    name: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]]
    # Parameters that only scale the curve (multiplied by the amplitude a_d in physical reports).
    scale_params: ClassVar[tuple[str, ...]] = ()
    # Which linear coefficients `train.ridge` penalises (None: all of them).
    ridge_diagonal: ClassVar[tuple[float, ...] | None] = None

    def __init__(self, t: np.ndarray, amplitude: str = "fixed"):
        self.t = np.asarray(t, dtype=np.float64)
        if amplitude not in AMPLITUDES:
            raise ValueError(f"expert amplitude must be one of {AMPLITUDES}, got {amplitude!r}")
        self.amplitude = amplitude

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def evaluate(self, theta: np.ndarray) -> np.ndarray:
        """E(t; theta) for parameters (..., p) -> curves (..., L)."""
        raise NotImplementedError

    def solve(self, s0: np.ndarray, s1: np.ndarray, theta_prev: np.ndarray, ridge: float = 0.0,
              m2: np.ndarray | None = None) -> np.ndarray:
        """Eq 17 for every cluster from (S0 (C,), S1 (C, L)[, M2 (C, L, L)]) in physical units -> theta (C, p).

        ``m2`` is required with a free amplitude. Clusters with no weight keep ``theta_prev``.
        """
        theta = np.array(theta_prev, dtype=np.float64, copy=True)
        has = s0 > 1e-12
        if has.any():
            if self.amplitude == "fixed":
                theta[has] = self.solve_fixed(s0[has], s1[has], ridge)
            else:
                if m2 is None:
                    raise ValueError("a free-amplitude expert needs the second-moment statistic m2")
                theta[has] = self.solve_free(s0[has], s1[has], m2[has])
        return theta

    def solve_fixed(self, s0: np.ndarray, s1: np.ndarray, ridge: float) -> np.ndarray:
        """argmin_theta S0 ||S1/S0 - E(theta)||^2 + ridge ||theta_lin||^2 per cluster (K,), (K, L) -> (K, p)."""
        raise NotImplementedError

    def solve_free(self, s0: np.ndarray, s1: np.ndarray, m2: np.ndarray) -> np.ndarray:
        """argmax over shapes of m^T M2 m / m^T m, scaled to unit mean amplitude: (K,), (K, L), (K, L, L) -> (K, p)."""
        raise NotImplementedError

    def fit_samples(self, x: np.ndarray) -> np.ndarray:
        """Least-squares parameters of each curve alone, (N, L) -> (N, p): used to initialise clusters.

        For one curve the free-amplitude fit is the fixed one (its amplitude is 1 by the convention).
        """
        x = np.asarray(x, dtype=np.float64)
        return self.solve_fixed(np.ones(len(x)), x, 0.0)

    def cluster_features(self, theta: np.ndarray) -> np.ndarray:
        """Features of per-sample fits (N, p) that k-means clusters to seed the clusters.

        The parameters themselves by default; an expert whose parameters mix a scale (which varies
        within a class) with a shape (which tells classes apart) should return the shape.
        """
        return theta

    def describe(self, theta: np.ndarray) -> dict[str, list[float]]:
        """Named physical parameters per cluster, for reports."""
        return {n: theta[:, i].tolist() for i, n in enumerate(self.param_names)}

    # ----- information form (pima_hpc/model/rls.py) -------------------------------------------
    # An expert that is linear in its parameters on each of K candidate designs D_k (one for a
    # linear law; one per yield-point interval for strain hardening) can be solved from the
    # gamma-weighted information Q_ck = sum_d gamma_cd D_k(t_d)^T D_k(t_d), b_ck = sum_d gamma_cd
    # D_k(t_d)^T x_d, which adds across batches and workers whatever grid each curve has.

    @property
    def has_information_form(self) -> bool:
        return type(self).candidate_designs is not Expert.candidate_designs

    def candidate_designs(self, t: np.ndarray) -> np.ndarray:
        """The designs (..., K, L, p) on grid(s) t (..., L) in which the law is linear."""
        raise NotImplementedError(f"expert {type(self).__name__} has no information form (no candidate designs)")

    def linear_coordinates(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k (C,), y (C, p)): the candidate design whose linear coefficients y reproduce E(t; theta)."""
        raise NotImplementedError(f"expert {type(self).__name__} has no information form (no candidate designs)")

    def information_from_sums(self, s0: np.ndarray, s1: np.ndarray, m2: np.ndarray | None = None) -> dict:
        """The information on the shared grid from the statistics (S0, S1[, M2]) in physical units: with M2
        that of a free amplitude (A2), without it that of a fixed one (Q)."""
        d = self.candidate_designs(self.t)
        info = {"w": s0, "b": np.einsum("kli,cl->cki", d, s1)}
        if m2 is None:  # a fixed amplitude (also a free-amplitude expert's per-sample fits)
            info["q"] = s0[:, None, None, None] * np.einsum("kli,klj->kij", d, d)
        else:
            info["a2"] = np.einsum("kli,clm,kmj->ckij", d, m2, d)
        return info

    def solve_information(self, info: dict, ridge: float = 0.0, intervals: bool = True) -> np.ndarray:
        """Eq 17 from information of clusters that all have weight: fixed amplitude from (Q, b), free from
        (A2 = sum gamma D^T x x^T D, w, b) on the shared grid. ``intervals=False`` keeps a piecewise law's
        breakpoints on the grid (the only exact choice when curves have their own grids)."""
        raise NotImplementedError(f"expert {type(self).__name__} has no information form (no candidate designs)")


class LinearExpert(Expert):
    """E(t; theta) = Phi(t) theta: eq 17 is a weighted linear least-squares problem (ERRATA 9)."""

    def design(self, t: np.ndarray) -> np.ndarray:
        """The design matrix Phi (L, p)."""
        raise NotImplementedError

    @property
    def scale_params(self):  # every parameter of a linear law scales with the curve
        return self.param_names

    def evaluate(self, theta):
        return np.asarray(theta) @ self.design(self.t).T

    def candidate_designs(self, t):
        t = np.asarray(t, dtype=np.float64)
        if t.ndim == 1:
            return self.design(t)[None]
        return np.stack([self.design(row) for row in t.reshape(-1, t.shape[-1])]).reshape(
            t.shape[:-1] + (1, t.shape[-1], self.n_params))

    def linear_coordinates(self, theta):
        return np.zeros(len(theta), dtype=int), np.asarray(theta, dtype=np.float64)

    def solve_fixed(self, s0, s1, ridge):
        return self.solve_information(self.information_from_sums(s0, s1), ridge)

    def solve_free(self, s0, s1, m2):
        return self.solve_information(self.information_from_sums(s0, s1, m2))

    def solve_information(self, info, ridge=0.0, intervals=True):
        if "q" in info:
            # Normal equations A_c = Q_c (+ ridge), b_c; p is tiny, so a batched dense solve is exact and cheap.
            a = info["q"][:, 0] + ridge * np.eye(self.n_params)
            return np.linalg.solve(a, info["b"][:, 0][..., None])[..., 0]
        # max_theta theta^T Phi^T M2 Phi theta / theta^T Phi^T Phi theta: the top generalised
        # eigenvector; every rank solves the same small problem from the same reduced statistics.
        phi = self.design(self.t)
        gram = phi.T @ phi
        _, v = top_eigenvectors(info["a2"][:, 0], np.linalg.cholesky(gram))
        # unit mean amplitude (module docstring): sum_d gamma_d a_d = <S1, Phi v> / ||Phi v||^2 = v . b / v^T G v = S0
        scale = (v * info["b"][:, 0]).sum(-1) / (np.maximum(info["w"], 1e-300) *
                                                 np.maximum(np.einsum("ci,ij,cj->c", v, gram, v), 1e-300))
        return v * scale[:, None]

    def cluster_features(self, theta):
        if self.amplitude == "fixed":
            return theta
        # only the direction of theta is a shape; the sign is fixed by the first nonzero entry
        direction = theta / np.maximum(np.linalg.norm(theta, axis=1, keepdims=True), 1e-300)
        return direction * np.sign(direction[:, :1] + (direction[:, :1] == 0))


@register_expert("affine")
class Affine(LinearExpert):
    """The MNIST expert E(t; theta_c) = theta_c t (Section 3.1)."""

    param_names = ("slope",)

    def design(self, t):
        return t[:, None]


@register_expert("free")
class FreeCurve(LinearExpert):
    """No law: each cluster's mean curve itself, one free value per grid point (Phi = I).

    With a fixed amplitude eq 17 gives the gamma-weighted mean curve S1_c / S0_c; with a free
    amplitude, the top eigenvector of M2_c (the cluster's principal curve shape). For curves no
    registered law fits: an honest decoder whose noise then measures the spread around the mean.
    """

    def __init__(self, t, amplitude="fixed"):
        super().__init__(t, amplitude)
        self.param_names = tuple(f"x{i}" for i in range(len(self.t)))

    def design(self, t):
        return np.eye(len(t))


@register_expert("polynomial")
class Polynomial(LinearExpert):
    """A polynomial of ``degree`` in t (``model.expert_options: {degree: p}``), in the Legendre basis on
    t mapped to [-1, 1] so the normal equations stay well conditioned; parameters are those Legendre
    coefficients (c0 = the curve's mean level over the grid's span)."""

    def __init__(self, t, amplitude="fixed", degree: int = 2):
        super().__init__(t, amplitude)
        if int(degree) != degree or not 0 <= degree < len(self.t):
            raise ValueError(f"polynomial degree must be an integer in [0, {len(self.t) - 1}], got {degree}")
        self.degree = int(degree)
        self.param_names = tuple(f"c{i}" for i in range(self.degree + 1))

    def design(self, t):
        lo, hi = float(self.t[0]), float(self.t[-1])  # the expert's grid fixes the map, whatever grid t is
        return np.polynomial.legendre.legvander(2 * (t - lo) / (hi - lo) - 1, self.degree)


@register_expert("bspline")
class BSplineCurve(LinearExpert):
    """A cubic (``order`` 3 by default) B-spline with ``knots`` evenly spaced interior knots over the grid
    (``model.expert_options: {knots: k, order: 3}``); parameters are the spline coefficients (scipy's
    BSpline basis, the same as scipy.interpolate.make_lsq_spline)."""

    def __init__(self, t, amplitude="fixed", knots: int = 6, order: int = 3):
        super().__init__(t, amplitude)
        n_coef = int(knots) + int(order) + 1
        if int(knots) != knots or knots < 0 or int(order) != order or order < 1 or n_coef > len(self.t):
            raise ValueError(f"bspline needs integers knots >= 0, order >= 1 and knots + order + 1 <= {len(self.t)} "
                             f"grid points, got knots={knots}, order={order}")
        self.order = int(order)
        lo, hi = float(self.t[0]), float(self.t[-1])
        interior = np.linspace(lo, hi, int(knots) + 2)[1:-1]
        self.knot_vector = np.concatenate([[lo] * (self.order + 1), interior, [hi] * (self.order + 1)])
        self.param_names = tuple(f"b{i}" for i in range(n_coef))

    def design(self, t):
        from scipy.interpolate import BSpline
        return BSpline.design_matrix(t, self.knot_vector, self.order).toarray()


@register_expert("strain_hardening")
class StrainHardening(Expert):
    """Linear strain hardening (Section 3.2; Jones 2009): elastic, then linear hardening.

    sigma(eps) = E eps                               for eps <= eps_y
               = E eps_y + H (eps - eps_y)           for eps >  eps_y
    with E >= 0, H >= 0 and the yield strain eps_y in [t_1, t_{L-2}]. Parameters (E, eps_y, H);
    the yield stress is E * eps_y.

    The solve is exact and global (no search grid). Between two grid points t_k <= eps_y <= t_{k+1}
    the law is LINEAR in (alpha, beta, gamma) = (E, H, (E - H) eps_y) with the design
    D_k = [t 1(t <= t_k), t 1(t >= t_{k+1}), 1(t >= t_{k+1})], which does not depend on eps_y.
    So within every interval the minimum (fixed amplitude: a convex quadratic; free amplitude: a
    Rayleigh quotient, whose only local maximum is the top eigenvector) is either the unconstrained
    optimum of D_k, if it maps back to a feasible (E, eps_y, H), or lies on the feasible set's
    boundary: a grid point eps_y = t_k (a two-parameter problem with E, H >= 0), or a face H = 0 or
    E = 0 (again linear in two parameters). Every candidate is closed form; the best one wins.
    ``ridge`` adds ridge * (E^2 + H^2), which is quadratic in (alpha, beta), so it stays exact.
    """

    param_names = ("modulus", "yield_strain", "hardening_modulus")
    scale_params = ("modulus", "hardening_modulus")
    ridge_diagonal = (1.0, 1.0, 0.0)  # ridge * (E^2 + H^2), on the coefficients (E, H, (E - H) eps_y)

    def __init__(self, t, amplitude="fixed"):
        super().__init__(t, amplitude)
        if len(self.t) < 5 or np.any(np.diff(self.t) <= 0):
            raise ValueError("strain_hardening needs >= 5 strictly increasing strain points")
        self.eps_bounds = (float(self.t[1]), float(self.t[-2]))
        n = len(self.t)
        # D_k for the split "j <= k | j > k", k = 0..L-1 (only k = 1..L-2 are used): (L, L, 3)
        after = np.arange(n)[None, :] > np.arange(n)[:, None]
        self._designs = np.stack([np.where(after, 0.0, self.t), np.where(after, self.t, 0.0),
                                  after.astype(float)], axis=-1)

    def evaluate(self, theta):
        theta = np.asarray(theta, dtype=np.float64)
        e, eps_y, h = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
        return e * np.minimum(self.t, eps_y) + h * np.maximum(self.t - eps_y, 0.0)

    # ----- candidates --------------------------------------------------------------------------
    def _candidates(self):
        """Index sets of the problems to solve: grid points g and intervals [t_k, t_{k+1}]."""
        n = len(self.t)
        grid = np.arange(1, n - 1)        # eps_y = t_g, g = 1..L-2
        intervals = np.arange(1, n - 2)   # t_k < eps_y < t_{k+1}, k = 1..L-3
        return grid, intervals

    def _grid_maps(self, grid):
        """(E, H) -> (alpha, beta, gamma) at eps_y = t_g: (G, 3, 2)."""
        m = np.zeros((len(grid), 3, 2))
        m[:, 0, 0] = m[:, 1, 1] = 1.0
        m[:, 2, 0], m[:, 2, 1] = self.t[grid], -self.t[grid]
        return m

    def candidate_designs(self, t):
        # D_k(t) = [t 1(t <= t_k), t 1(t > t_k), 1(t > t_k)] for the split after reference point t_k
        t = np.asarray(t, dtype=np.float64)
        if t.ndim == 1 and t.shape == self.t.shape and np.array_equal(t, self.t):
            return self._designs
        after = t[..., None, :] > self.t[:, None]                           # (..., K, L)
        tt = np.broadcast_to(t[..., None, :], after.shape)
        return np.stack([np.where(after, 0.0, tt), np.where(after, tt, 0.0), after.astype(float)], axis=-1)

    def linear_coordinates(self, theta):
        theta = np.asarray(theta, dtype=np.float64)
        e, eps, h = theta[:, 0], theta[:, 1], theta[:, 2]
        k = np.clip(np.searchsorted(self.t, eps, side="right") - 1, 0, len(self.t) - 1)
        return k, np.stack([e, h, (e - h) * eps], axis=1)

    def solve_fixed(self, s0, s1, ridge):
        return self.solve_information(self.information_from_sums(np.asarray(s0, np.float64),
                                                                 np.asarray(s1, np.float64)), ridge)

    def solve_free(self, s0, s1, m2):
        s0, s1, m2 = (np.asarray(a, np.float64) for a in (s0, s1, m2))
        return self.solve_information(self.information_from_sums(s0, s1, m2))

    def solve_information(self, info, ridge=0.0, intervals=True):
        if "q" in info:
            return self._solve_fixed_information(info["q"] + ridge * np.diag(self.ridge_diagonal), info["b"], intervals)
        return self._solve_free_information(info, intervals)

    def _solve_fixed_information(self, q, b, use_intervals):
        """min over the candidates of y^T Q y - 2 b . y (Q: (C, L, 3, 3) with the ridge, b: (C, L, 3))."""
        grid, intervals = self._candidates()
        best_f = np.zeros(len(q))                                   # E = H = 0: objective 0
        best = np.zeros((len(q), 3))
        best[:, 1] = self.t[grid[0]]

        def offer(f, e, eps, h, ok):
            nonlocal best_f, best
            f = np.where(ok, f, np.inf)
            j = np.argmin(f, axis=1)
            fj = f[np.arange(len(f)), j]
            better = fj < best_f
            pick = np.stack([e, eps, h], -1)[np.arange(len(f)), j]
            best_f = np.where(better, fj, best_f)
            best = np.where(better[:, None], pick, best)

        # grid points: 2-parameter non-negative least squares in (E, H)
        m = self._grid_maps(grid)
        q2 = np.einsum("gia,cgij,gjb->cgab", m, q[:, grid], m)
        b2 = np.einsum("gia,cgi->cga", m, b[:, grid])
        eps = np.broadcast_to(self.t[grid], q2.shape[:2])
        y = np.linalg.solve(q2, b2[..., None])[..., 0]
        offer(-(b2 * y).sum(-1), y[..., 0], eps, y[..., 1], (y >= 0).all(-1))
        for i in (0, 1):  # one of E, H at zero
            v = b2[..., i] / q2[..., i, i]
            e, h = (v, 0 * v) if i == 0 else (0 * v, v)
            offer(-b2[..., i] * v, e, eps, h, v >= 0)
        if not use_intervals:
            return best
        # interval interiors and the faces H = 0 and E = 0 inside them
        lo, hi = self.t[intervals], self.t[intervals + 1]
        qk, bk = q[:, intervals], b[:, intervals]
        y = np.linalg.solve(qk, bk[..., None])[..., 0]
        e, h, g = y[..., 0], y[..., 1], y[..., 2]
        eps = g / np.where(e - h == 0, np.nan, e - h)
        offer(-(bk * y).sum(-1), e, eps, h, (e >= 0) & (h >= 0) & (eps >= lo) & (eps <= hi))
        for keep, sign in (((0, 2), 1.0), ((1, 2), -1.0)):  # H = 0: curve alpha u + gamma v; E = 0
            sub = np.ix_(keep, keep)
            y = np.linalg.solve(qk[..., sub[0], sub[1]], bk[..., keep][..., None])[..., 0]
            a, g = y[..., 0], y[..., 1]
            eps = sign * g / np.where(a == 0, np.nan, a)
            e, h = (a, 0 * a) if keep[0] == 0 else (0 * a, a)
            offer(-(bk[..., keep] * y).sum(-1), e, eps, h, (a >= 0) & (eps >= lo) & (eps <= hi))
        return best

    def _solve_free_information(self, info, use_intervals):
        """max over the candidates of the Rayleigh quotient y^T A2_k y / y^T B_k y, unit mean amplitude."""
        grid, intervals = self._candidates()
        d = self._designs
        gram = np.einsum("kli,klj->kij", d, d)                     # B_k = D_k^T D_k (L, 3, 3)
        a = info["a2"]                                              # A_k = D_k^T M2 D_k (C, L, 3, 3)
        k_all = len(a)
        best_r = np.full(k_all, -np.inf)
        best = np.zeros((k_all, 3))

        def offer(r, e, eps, h, ok):
            nonlocal best_r, best
            r = np.where(ok, r, -np.inf)
            j = np.argmax(r, axis=1)
            rj = r[np.arange(k_all), j]
            better = rj > best_r
            pick = np.stack([e, eps, h], -1)[np.arange(k_all), j]
            best_r = np.where(better, rj, best_r)
            best = np.where(better[:, None], pick, best)

        # grid points: the top eigenvector of the (E, H) problem if it lies in E, H >= 0, else a ray
        m = self._grid_maps(grid)
        a2 = np.einsum("gia,cgij,gjb->cgab", m, a[:, grid], m)
        b2 = np.einsum("gia,gij,gjb->gab", m, gram[grid], m)
        eps = np.broadcast_to(self.t[grid], a2.shape[:2])
        r, v = top_eigenvectors(a2, np.linalg.cholesky(b2))
        v = v * np.sign(v[..., :1] + (v[..., :1] == 0))
        offer(r, v[..., 0], eps, v[..., 1], v[..., 1] >= 0)
        for i in (0, 1):
            r = a2[..., i, i] / b2[None, :, i, i]
            one = np.ones_like(r)
            e, h = (one, 0 * one) if i == 0 else (0 * one, one)
            offer(r, e, eps, h, np.ones_like(r, bool))
        if not use_intervals:
            return self._unit_amplitude(best, info, gram)
        # interval interiors and the faces H = 0 and E = 0 inside them
        lo, hi = self.t[intervals], self.t[intervals + 1]
        ak, bk = a[:, intervals], gram[intervals]
        r, y = top_eigenvectors(ak, np.linalg.cholesky(bk))
        y = y * np.sign(y[..., :1] + (y[..., :1] == 0))
        e, h, g = y[..., 0], y[..., 1], y[..., 2]
        eps = g / np.where(e - h == 0, np.nan, e - h)
        offer(r, e, eps, h, (h >= 0) & (eps >= lo) & (eps <= hi))
        for keep, sign in (((0, 2), 1.0), ((1, 2), -1.0)):
            r, y = top_eigenvectors(ak[..., keep, :][..., :, keep], np.linalg.cholesky(bk[:, keep][:, :, keep]))
            y = y * np.sign(y[..., :1] + (y[..., :1] == 0))
            lead, g = y[..., 0], y[..., 1]
            eps = sign * g / np.where(lead == 0, np.nan, lead)
            e, h = (lead, 0 * lead) if keep[0] == 0 else (0 * lead, lead)
            offer(r, e, eps, h, (eps >= lo) & (eps <= hi))
        return self._unit_amplitude(best, info, gram)

    def _unit_amplitude(self, best, info, gram):
        # unit mean amplitude (module docstring) from the information: <S1, m> = y . b_k, ||m||^2 = y^T B_k y
        k, y = self.linear_coordinates(best)
        rows = np.arange(len(best))
        mm = np.einsum("ci,cij,cj->c", y, gram[k], y)
        scale = (y * info["b"][rows, k]).sum(-1) / (np.maximum(info["w"], 1e-300) * np.maximum(mm, 1e-300))
        best[:, 0] *= scale
        best[:, 2] *= scale
        return best

    def cluster_features(self, theta):
        # Gibson-Ashby: modulus and yield stress scale with relative density within a topology,
        # while the yield strain and the hardening ratio H/E are density-free shape descriptors.
        e = np.maximum(theta[:, 0], 1e-12)
        return np.stack([np.log(np.maximum(theta[:, 1], 1e-12)), np.log(np.maximum(theta[:, 2], 1e-6 * e) / e)], axis=1)

    def describe(self, theta):
        out = super().describe(theta)
        out["yield_stress"] = (theta[:, 0] * theta[:, 1]).tolist()
        return out


def resolve_expert(name: str) -> type[Expert]:
    """The expert class behind ``model.expert``: a registered name, or ``package.module:ClassName`` (a
    user's :class:`Expert` subclass, imported and registered under that path)."""
    if name in EXPERTS:
        return EXPERTS[name]
    if ":" not in name:
        raise ValueError(f"unknown expert {name!r}; registered experts: {sorted(EXPERTS)}, or give "
                         "package.module:ClassName of your own Expert subclass")
    import importlib
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"expert {name!r} cannot be imported ({exc}); check the module is on PYTHONPATH and "
                         "names the class") from None
    if not (isinstance(cls, type) and issubclass(cls, Expert)):
        raise ValueError(f"expert {name!r} is not a subclass of pima_hpc.model.experts.Expert")
    return register_expert(name)(cls) if name not in EXPERTS else EXPERTS[name]


def build_expert(name: str, t: np.ndarray, amplitude: str = "fixed", options: dict | None = None) -> Expert:
    """An expert on grid ``t``; ``options`` (``model.expert_options``) go to its constructor."""
    return resolve_expert(name)(t, amplitude, **dict(options or {}))
