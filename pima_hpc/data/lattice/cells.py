"""Unit-cell geometry of the two lattice topologies and sampling it over the imaged volume.

The gyroid's field and the octet's strut distances are computed once per process on a periodic
unit-cell grid; :func:`density_table` maps a field level to the relative density it gives.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from pima_hpc.data.lattice.config import GYROID


# --------------------------------------------------------------------------------------------
# Unit-cell fields (computed once per process)

CELL_GRID = 32


def _cell_coords(g: int):
    u = np.arange(g) / g
    return np.meshgrid(u, u, u, indexing="ij")


@lru_cache(maxsize=4)
def gyroid_cell(g: int = CELL_GRID) -> tuple[np.ndarray, np.ndarray]:
    """F and |grad F| (cell units) of the gyroid on a periodic g^3 grid of one unit cell."""
    x, y, z = (2 * np.pi * c for c in _cell_coords(g))
    sx, cx, sy, cy, sz, cz = np.sin(x), np.cos(x), np.sin(y), np.cos(y), np.sin(z), np.cos(z)
    f = sx * cy + sy * cz + sz * cx
    grad = 2 * np.pi * np.sqrt((cx * cy - sz * sx) ** 2 + (cy * cz - sx * sy) ** 2 + (cz * cx - sy * sz) ** 2)
    return f.astype(np.float32), grad.astype(np.float32)


def octet_segments() -> np.ndarray:
    """The 36 struts of one octet-truss cell as (36, 2, 3) endpoints in cell units.

    24 struts join each face centre to the face's corners (shared with the neighbouring cell)
    and 12 join face centres of adjacent faces (the inner octahedron).
    """
    faces = []
    for axis in range(3):
        for side in (0.0, 1.0):
            c = np.full(3, 0.5)
            c[axis] = side
            faces.append((axis, c))
    segs = []
    for axis, c in faces:
        others = [a for a in range(3) if a != axis]
        for d0 in (0.0, 1.0):
            for d1 in (0.0, 1.0):
                corner = c.copy()
                corner[others[0]], corner[others[1]] = d0, d1
                segs.append((c, corner))
    for i in range(6):
        for j in range(i + 1, 6):
            if faces[i][0] != faces[j][0]:
                segs.append((faces[i][1], faces[j][1]))
    return np.array(segs)


@lru_cache(maxsize=4)
def octet_cell(g: int = CELL_GRID) -> np.ndarray:
    """Distance (cell units) from each point of a g^3 cell grid to each strut: (36, g, g, g).

    Junction nodes need no separate term: near a node, a strut of a neighbouring cell is no
    closer than the node itself, which ends one of this cell's struts.
    """
    p = np.stack(_cell_coords(g), axis=-1).reshape(-1, 3)
    out = []
    for a, b in octet_segments():
        ab = b - a
        s = np.clip((p - a) @ ab / (ab @ ab), 0.0, 1.0)
        out.append(np.linalg.norm(p - (a + s[:, None] * ab), axis=1))
    return np.stack(out).reshape(-1, g, g, g).astype(np.float32)


@lru_cache(maxsize=4)
def density_table(topology: int, g: int = CELL_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Nominal relative density as a function of the field level, by voxel counting on the cell.

    Gyroid: level t, solid F > t. Octet: strut radius r, solid (distance to a strut) < r.
    Returns (levels, densities) with densities increasing, for :func:`level_for_density`.
    """
    if topology == GYROID:
        f = np.sort(gyroid_cell(g)[0].ravel())[::-1]
        levels = f[:: max(1, len(f) // 2000)]
        rho = np.searchsorted(-f, -levels, side="right") / len(f)
    else:
        d = np.sort(octet_cell(g).min(axis=0).ravel())
        levels = d[:: max(1, len(d) // 2000)]
        rho = np.searchsorted(d, levels, side="right") / len(d)
    return levels.astype(np.float64), rho.astype(np.float64)


def level_for_density(topology: int, rho: float) -> float:
    levels, dens = density_table(topology)
    return float(np.interp(rho, dens, levels))


def equivalent_radius(rho: float) -> float:
    """Strut radius (cell units) of an octet of density rho (rho = 12 sqrt(2) pi r^2); a length scale
    for the gyroid's walls too, so defect amplitudes scale with the walls for both topologies."""
    return math.sqrt(rho / (12 * math.sqrt(2) * math.pi))


# --------------------------------------------------------------------------------------------
# Sampling the periodic cell field over the imaged volume


def _periodic_lerp(a: np.ndarray, u: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` (periodic along ``axis``, grid spacing 1/g) at cell coords u."""
    g = a.shape[axis]
    x = np.mod(u, 1.0) * g
    i0 = np.floor(x).astype(np.int64)
    w = (x - i0).astype(np.float32)
    i0 %= g
    i1 = (i0 + 1) % g
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w


def sample_cell(cell: np.ndarray, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
    """Trilinear sample of a periodic (g, g, g) cell field on the grid ux x uy x uz -> (X, Y, Z).

    Separable: one axis at a time, the smallest intermediate arrays first.
    """
    return _periodic_lerp(_periodic_lerp(_periodic_lerp(cell, uz, 2), ux, 0), uy, 1)
