"""The expert interface, its registry (``model.expert: <name>`` or ``package.module:ClassName``) and
the construction from a config. The family of experts and the two likelihoods are described in
pima_hpc/model/experts/__init__.py."""

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

    def evaluate_at(self, t: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """E(t_d; theta_c) on per-sample grids: t (B, P), theta (C, p) -> (B, C, P).

        From the information form: each cluster's candidate design on every sample's grid times its
        linear coefficients. An expert with a closed form anywhere may override this.
        """
        k, y = self.linear_coordinates(theta)
        return np.einsum("bcli,ci->bcl", self.candidate_designs(t)[:, k], y)

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
