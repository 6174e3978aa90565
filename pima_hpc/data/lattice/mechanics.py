"""The lattice specimens' mechanics: Gibson-Ashby scaling of the solid and the stress-strain curve.

The laws and their sources are given in :mod:`pima_hpc.data.lattice`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pima_hpc.data.lattice.config import GYROID, OCTET, LatticeConfig

E_SOLID = 190e3      # MPa, L-PBF 316L
SIGMA_Y_SOLID = 450.0  # MPa


@dataclass(frozen=True)
class ScalingLaw:
    """Gibson-Ashby scaling ``E = c_e E_s rho^n_e``, ``sigma_y = c_s sigma_ys rho^n_s``, ``H = eta E``."""

    c_e: float
    n_e: float
    c_s: float
    n_s: float
    eta: float

    def moduli(self, rho):
        e = self.c_e * E_SOLID * rho ** self.n_e
        s = self.c_s * SIGMA_Y_SOLID * rho ** self.n_s
        return e, s, self.eta * e


SCALING = {
    GYROID: ScalingLaw(c_e=0.45, n_e=2.0, c_s=0.3, n_s=1.5, eta=0.05),
    OCTET: ScalingLaw(c_e=1.0 / 9.0, n_e=1.0, c_s=1.0 / 3.0, n_s=1.0, eta=0.02),
}


def stress_strain(topology: int, rho: float, scatter: np.ndarray, cfg: LatticeConfig, rng,
                  eps: np.ndarray | None = None):
    """Compression curve (MPa) of a specimen of measured density ``rho`` at strains ``eps`` (default: the
    shared grid), and its true parameters.

    Linear strain hardening with Gibson-Ashby moduli (package docstring), log-normal specimen
    scatter, and Gaussian load noise of ``cfg.curve_noise * sigma_y``.
    """
    e, s, h = SCALING[topology].moduli(rho)
    e, s, h = e * math.exp(scatter[0]), s * math.exp(scatter[1]), h * math.exp(scatter[2])
    eps = cfg.strain if eps is None else eps
    eps_y = s / e
    clean = np.where(eps <= eps_y, e * eps, s + h * (eps - eps_y))
    curve = clean + cfg.curve_noise * s * rng.standard_normal(eps.shape)
    return curve, {"E": e, "sigma_y": s, "H": h, "eps_y": eps_y}
