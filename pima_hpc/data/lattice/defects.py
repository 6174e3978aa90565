"""Random fields for the print defects: a smooth thickness field and a periodic noise tile.

The tile's random windows give the surface roughness and the gas pores of every specimen
(:func:`~pima_hpc.data.lattice.specimens.specimen_field`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def smooth_field(rng, shape, corr_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~``corr_px`` (float32)."""
    coarse = [max(2, int(math.ceil(s / max(corr_px, 1.0))) + 1) for s in shape]
    f = rng.standard_normal(coarse).astype(np.float32)
    for ax, s in enumerate(shape):
        u = np.linspace(0, coarse[ax] - 1, s, dtype=np.float32)
        i0 = np.minimum(u.astype(np.int64), coarse[ax] - 2)
        w = (u - i0).reshape([-1 if a == ax else 1 for a in range(len(shape))])
        f = np.take(f, i0, axis=ax) * (1 - w) + np.take(f, i0 + 1, axis=ax) * w
    return f / max(float(f.std()), 1e-6)


TILE = 96


@lru_cache(maxsize=2)
def noise_tile(size: int = TILE, corr_px: float = 1.5) -> np.ndarray:
    """A periodic 3D Gaussian noise tile (unit std, correlation ~``corr_px`` voxels), made once.

    Roughness and pores sample random windows of it (random offsets, axis order and flips),
    which costs a gather instead of filtering fresh 3D noise for every specimen.
    """
    rng = np.random.default_rng(20211)
    k = np.fft.fftfreq(size)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    spec = np.fft.fftn(rng.standard_normal((size,) * 3)) * np.exp(-2 * (np.pi * corr_px) ** 2 * k2)
    f = np.fft.ifftn(spec).real
    return ((f - f.mean()) / f.std()).astype(np.float32)


@lru_cache(maxsize=2)
def _tile_sorted() -> np.ndarray:
    return np.sort(noise_tile().ravel())


def tile_quantile(q: float) -> float:
    """The q-quantile of the noise tile's values (sorted once per process)."""
    v = _tile_sorted()
    return float(v[min(len(v) - 1, int(q * len(v)))])


def noise_window(rng, shape) -> np.ndarray:
    """A random (X, Y, Z) window of the periodic noise tile, float32, unit std."""
    tile = noise_tile()
    if rng.random() < 0.5:
        tile = tile.transpose(1, 0, 2)
    idx = [(rng.integers(TILE) + np.arange(s) * (1 if rng.random() < 0.5 else -1)) % TILE for s in shape]
    return tile.take(idx[2], axis=2).take(idx[0], axis=0).take(idx[1], axis=1)
