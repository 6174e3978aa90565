"""One lattice specimen: its random parameters, its defect-laden geometry and everything stored for it.

Every specimen is generated from its own random stream ``(seed, index)``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

from pima_hpc.data.lattice.cells import equivalent_radius, gyroid_cell, level_for_density, octet_cell, sample_cell
from pima_hpc.data.lattice.config import GYROID, LatticeConfig
from pima_hpc.data.lattice.defects import noise_window, smooth_field, tile_quantile
from pima_hpc.data.lattice.mechanics import stress_strain
from pima_hpc.data.lattice.photos import render_photo, views


def specimen_parameters(seed: int, index: int, cfg: LatticeConfig) -> dict:
    """The random design and process parameters of specimen ``index`` (its own random stream)."""
    rng = np.random.default_rng([seed, index, 0])
    topo = int(rng.integers(2))
    u = float(rng.uniform())  # one draw for either population, so both share every other parameter
    if cfg.population == "spread":
        target = cfg.density[0] + u * (cfg.density[1] - cfg.density[0])
    else:
        target = cfg.design_density[topo] * math.exp(cfg.density_cv * float(norm.ppf(min(max(u, 1e-12), 1 - 1e-12))))
    return {
        "topology": topo,
        "target_density": float(target),
        "cell_mm": float(rng.uniform(*cfg.cell_mm)),
        "shift": rng.uniform(0, 1, size=3),
        "porosity": float(rng.uniform(*cfg.porosity)),
        "blur_px": float(rng.uniform(*cfg.blur_px)),
        "light_dir": float(rng.uniform(0, 2 * np.pi)),
        "gradient": float(rng.uniform(0, cfg.lighting)),
        "scatter": rng.standard_normal(3) * cfg.scatter,
    }


def specimen_field(p: dict, cfg: LatticeConfig, rng) -> tuple[np.ndarray, float, float]:
    """The defect-laden field ``phi`` over the photographed volume (X, Y, Z), z = depth from the top.

    Returns (phi, voxel size in x-y [mm], voxel size in z [mm]); the solid is phi < 0.
    """
    n = cfg.photo_px
    px = cfg.pixel_mm
    cell = p["cell_mm"]
    depth = int(np.clip(round(cell / px), 12, 32))
    dz = cell / depth
    ux = (np.arange(n) + 0.5) * px / cell + p["shift"][0]
    uy = (np.arange(n) + 0.5) * px / cell + p["shift"][1]
    uz = (np.arange(depth) + 0.5) * dz / cell + p["shift"][2]
    r_eq = equivalent_radius(p["target_density"])
    level = level_for_density(p["topology"], p["target_density"])
    if p["topology"] == GYROID:
        f, grad = gyroid_cell()
        cell_phi = (level - f) / np.maximum(grad, np.pi)  # ~ signed distance, cell units
    else:
        radii = level * (1 + cfg.strut_jitter * rng.standard_normal(36)).astype(np.float32)
        cell_phi = (octet_cell() - radii[:, None, None, None]).min(axis=0)
    phi = sample_cell(cell_phi, ux, uy, uz)
    # thickness field over the build plate (~ one cell wavelength), thickening where positive
    thick = smooth_field(rng, (n, n), corr_px=0.5 * cell / px)
    phi -= (cfg.thickness_jitter * r_eq) * thick[:, :, None]
    # roughness: band-limited noise (~1.5 voxel correlation), a window of a periodic noise tile
    phi += (cfg.roughness * r_eq) * noise_window(rng, phi.shape)
    # the specimen's top face is a rough cut, not a polished plane: void above z_top(x, y)
    z_top = (2 * cfg.roughness * r_eq * cell) * np.abs(smooth_field(rng, (n, n), corr_px=1.5))
    top = int(min(depth, np.ceil(z_top.max() / dz) + 1))
    z = ((np.arange(top) + 0.5) * dz).astype(np.float32)
    phi[:, :, :top] = np.maximum(phi[:, :, :top], (z_top[:, :, None] - z) / cell)
    # gas porosity: voids where an independent noise window exceeds the quantile that makes the
    # expected void fraction of the solid equal to the specimen's porosity (blobs of ~1-2 voxels)
    if p["porosity"] > 0:
        thr = tile_quantile(1.0 - p["porosity"])
        pores = noise_window(rng, phi.shape)
        np.maximum(phi, (pores - thr) * (0.5 * px / cell), out=phi)
    return phi, px, dz


def measured_density(phi: np.ndarray) -> float:
    """Relative density of the voxelised specimen: the solid fraction of the imaged volume."""
    return float(np.count_nonzero(phi < 0)) / phi.size


def generate_specimen(seed: int, index: int, cfg: LatticeConfig) -> dict:
    """Everything stored for specimen ``index``: images (views, 1, S, S) uint8, curve, truth."""
    p = specimen_parameters(seed, index, cfg)
    rng = np.random.default_rng([seed, index, 1])
    phi, px, dz = specimen_field(p, cfg, rng)
    rho = measured_density(phi)
    photo = render_photo(phi, px, dz, p, cfg, rng)
    del phi
    if cfg.grids == "per-sample":  # the test's own strain points; the encoder's view interpolated on cfg.strain
        eps = cfg.test_strains(np.random.default_rng([seed, index, 2]))
        measured, params = stress_strain(p["topology"], rho, p["scatter"], cfg, rng, eps)
        curve, points = np.interp(cfg.strain, eps, measured), (eps, measured)
    else:
        curve, params = stress_strain(p["topology"], rho, p["scatter"], cfg, rng)
        points = None
    return {"images": views(photo, cfg), "curve": curve, "points": points, "topology": p["topology"],
            "relative_density": rho, "target_density": p["target_density"], "cell_mm": p["cell_mm"],
            "porosity": p["porosity"], **params}
