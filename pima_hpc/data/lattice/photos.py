"""Photographing a lattice specimen: the top-view render and the stored views (Appendix A)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from pima_hpc.data.lattice.config import LatticeConfig


def render_photo(phi: np.ndarray, px: float, dz: float, p: dict, cfg: LatticeConfig, rng) -> np.ndarray:
    """Top-view grayscale photograph (uint8, X x Y) of the solid ``phi < 0``; see the package docstring."""
    solid = phi < 0
    hit = solid.any(axis=2)
    k = solid.argmax(axis=2)
    # sub-voxel depth of the first surface crossing along each ray (linear zero crossing of phi)
    kp = np.maximum(k - 1, 0)
    f0 = np.take_along_axis(phi, kp[..., None], 2)[..., 0]
    f1 = np.take_along_axis(phi, k[..., None], 2)[..., 0]
    frac = np.where(k > 0, np.clip(f0 / np.maximum(f0 - f1, 1e-6), 0, 1), 0.0)
    depth_mm = np.where(k > 0, (kp + 0.5 + frac) * dz, 0.0)
    depth_mm = np.where(hit, depth_mm, phi.shape[2] * dz)
    # surface normal of the height field h = -depth (x, y in mm)
    gx, gy = np.gradient(depth_mm, px)
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    n = np.stack([gx / norm, gy / norm, 1.0 / norm])
    a = p["light_dir"]
    light = np.array([0.45 * np.cos(a), 0.45 * np.sin(a), 0.89])
    half = light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    diffuse = np.clip(np.tensordot(light, n, 1), 0, None)
    specular = np.clip(np.tensordot(half, n, 1), 0, None) ** 40
    cell = p["cell_mm"]
    atten = np.exp(-depth_mm / (0.35 * cell))
    img = np.where(hit, (0.12 + 0.6 * diffuse + 0.9 * specular) * atten, 0.03)
    img = gaussian_filter(img, p["blur_px"], mode="nearest")
    m = img.shape[0]
    u = (np.arange(m) + 0.5) / m - 0.5
    ramp = u[:, None] * np.cos(a + 0.7) + u[None, :] * np.sin(a + 0.7)
    vignette = 1.0 - 0.25 * (u[:, None] ** 2 + u[None, :] ** 2)
    img = img * (1.0 + 2 * p["gradient"] * ramp) * vignette
    img = img + np.sqrt(cfg.shot_noise * np.clip(img, 0, None) + cfg.read_noise ** 2) * rng.standard_normal(img.shape)
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip(np.round((img - lo) / max(hi - lo, 1e-9) * 255.0), 0, 255).astype(np.uint8)


def views(photo: np.ndarray, cfg: LatticeConfig) -> np.ndarray:
    """The stored images of one photo: (views, 1, S, S) - quadrants, each as is / flipped (Appendix A)."""
    if cfg.augment == "none":
        return photo[None, None]
    s = cfg.size
    quads = [photo[:s, :s], photo[:s, s:], photo[s:, :s], photo[s:, s:]]
    if cfg.augment == "quadrants":
        return np.stack(quads)[:, None]
    out = []
    for q in quads:
        out += [q, q[::-1, :], q[:, ::-1]]
    return np.ascontiguousarray(np.stack(out)[:, None])
