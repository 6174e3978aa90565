"""Linear experts E(t; theta) = Phi(t) theta (eq 17 is a weighted linear least-squares problem): the MNIST
slope, one free mean curve per cluster, Legendre polynomials and B-splines."""

from __future__ import annotations

import numpy as np

from pima_hpc.model.experts.base import Expert, register_expert, top_eigenvectors


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
            try:
                return np.linalg.solve(a, info["b"][:, 0][..., None])[..., 0]
            except np.linalg.LinAlgError:  # fewer points than parameters (a short curve on its own grid)
                return (np.linalg.pinv(a, hermitian=True) @ info["b"][:, 0][..., None])[..., 0]
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
    On another grid (curves with their own grids) the curve is the linear interpolation of those
    values (hat functions on the expert's grid, held at the end values outside it), so the
    parameters stay values at the expert's grid points.
    """

    def __init__(self, t, amplitude="fixed"):
        super().__init__(t, amplitude)
        self.param_names = tuple(f"x{i}" for i in range(len(self.t)))

    def design(self, t):
        t = np.asarray(t, dtype=np.float64)
        if t.shape == self.t.shape and np.array_equal(t, self.t):
            return np.eye(len(t))
        ref = self.t
        j = np.clip(np.searchsorted(ref, t, side="right") - 1, 0, len(ref) - 2)
        frac = np.clip((t - ref[j]) / (ref[j + 1] - ref[j]), 0.0, 1.0)
        phi = np.zeros((len(t), len(ref)))
        rows = np.arange(len(t))
        phi[rows, j] = 1.0 - frac
        phi[rows, j + 1] += frac
        return phi


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
        # points of a per-sample grid may lie outside the expert's grid: the end polynomials continue
        return BSpline.design_matrix(t, self.knot_vector, self.order, extrapolate=True).toarray()
