"""The lattice generator's settings (:class:`LatticeConfig`) and the topology codes.

The physics behind every setting is described in :mod:`pima_hpc.data.lattice`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pima_hpc.data.errors import DataError

TOPOLOGIES = ("gyroid", "octet")
GYROID, OCTET = 0, 1


@dataclass(frozen=True)
class LatticeConfig:
    """Generator settings; the defaults mirror the paper's dataset (Appendix A)."""

    size: int = 152                  # stored image side (pixels)
    augment: str = "paper"           # "paper": 4 quadrants x (as is, flip x, flip y); "quadrants"; "none"
    crop_mm: float = 7.6             # field of view of one stored image
    cell_mm: tuple = (2.0, 4.0)      # unit-cell size range
    population: str = "design"       # "design": one design density per topology; "spread": uniform range
    design_density: tuple = (0.20, 0.20)  # (gyroid, octet) design relative densities ("design")
    density_cv: float = 0.04         # log-normal print deviation of the density around the design
    density: tuple = (0.10, 0.30)    # target relative density range ("spread"; Gibson-Ashby regime rho < 0.3)
    points: int = 100                # curve length (per-sample grids: the most points of one test)
    grids: str = "shared"            # "shared": every test on one strain grid; "per-sample": each its own
    strain_max: float = 0.05
    curve_noise: float = 0.01        # std of the load noise / sigma_y
    scatter: float = 0.05            # log-normal specimen scatter of E, sigma_y, H
    thickness_jitter: float = 0.10   # smooth thickness field, std / equivalent strut radius
    strut_jitter: float = 0.08       # per strut class radius jitter (octet)
    roughness: float = 0.15          # surface noise std / equivalent strut radius
    porosity: tuple = (0.0, 0.02)    # void volume fraction range
    blur_px: tuple = (0.5, 1.2)      # Gaussian defocus sigma range
    lighting: float = 0.15           # max relative lighting gradient across the photo
    shot_noise: float = 4e-4         # Poisson-like variance per unit intensity
    read_noise: float = 0.01         # Gaussian read noise std

    def __post_init__(self):
        if self.grids not in ("shared", "per-sample"):
            raise DataError(f"--grids must be 'shared' or 'per-sample', got {self.grids!r}")
        if self.augment not in ("paper", "quadrants", "none"):
            raise DataError(f"--augment must be 'paper', 'quadrants' or 'none', got {self.augment!r}")
        if self.size < 16:
            raise DataError(f"--size must be >= 16 pixels, got {self.size}")
        if not 0 < self.density[0] < self.density[1] < 0.5:
            raise DataError(f"density range must satisfy 0 < lo < hi < 0.5, got {self.density}")
        if self.population not in ("design", "spread"):
            raise DataError(f"--population must be 'design' or 'spread', got {self.population!r}")
        if len(self.design_density) != 2 or not all(0 < d < 0.5 for d in self.design_density):
            raise DataError(f"design densities (gyroid, octet) must be in (0, 0.5), got {self.design_density}")
        if not 0 <= self.density_cv < 0.5:
            raise DataError(f"--density-cv must be in [0, 0.5), got {self.density_cv}")

    @property
    def views(self) -> int:
        return {"paper": 12, "quadrants": 4, "none": 1}[self.augment]

    @property
    def photo_px(self) -> int:
        return self.size * (1 if self.augment == "none" else 2)

    @property
    def pixel_mm(self) -> float:
        return self.crop_mm / self.size

    @property
    def strain(self) -> np.ndarray:
        """The shared strain grid (with per-sample grids: the reference grid the encoder's view is on)."""
        return np.linspace(0.0, self.strain_max, self.points)

    def test_strains(self, rng) -> np.ndarray:
        """One test's own strain points (``grids="per-sample"``): between half and all of ``points`` points,
        unevenly spaced from 0 to where the test stopped (60-100 % of ``strain_max``)."""
        n = int(rng.integers(self.points // 2, self.points + 1))
        end = self.strain_max * rng.uniform(0.6, 1.0)
        return np.concatenate([[0.0], np.sort(rng.uniform(0.0, end, n - 2)), [end]])
