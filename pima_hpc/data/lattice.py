"""A physics-based stand-in for the paper's lattice dataset (Section 3.2, Appendix A).

Each *specimen* is an additively manufactured lattice of one of two topologies, photographed
from the top and tested in uniaxial compression:

* **gyroid** - the network (skeletal) gyroid, the solid side ``F > level`` of the triply periodic
  minimal-surface approximation ``F = sin x cos y + sin y cos z + sin z cos x`` (Schoen's gyroid
  as used by Maskery et al. 2018 and Al-Ketan & Abu Al-Rub 2019);
* **octet** - the octet truss (face-centred-cubic nodes, 12 struts per node; Deshpande, Fleck &
  Ashby 2001).

Geometry. A field ``phi`` (negative inside the solid, roughly a signed distance in cell units)
is precomputed once on a periodic unit-cell grid, then sampled trilinearly over the imaged volume
(the photographed area, one cell deep) with a random in-plane position. Print defects act on
the field: a smooth thickness field over the build plate and per-strut-class radius jitter
(thickness jitter), band-limited noise (surface roughness, and a rough top cut) and small voids
where an independent noise field exceeds a quantile set by the porosity (gas pores).
The relative density is *measured* on this voxelised geometry, so it includes the defects.

Photograph. The first surface hit by a ray from the camera gives a height map; shading is
Lambert plus a Blinn-Phong highlight (a metal surface), darkened with depth; then a Gaussian
defocus blur, a lighting gradient with vignetting, Poisson-Gaussian sensor noise, and an 8-bit
exposure that stretches the 0.5-99.5 percentiles to 0..255. Defaults mirror Appendix A: a photo
of 2S x 2S pixels is cut into four S x S quadrants (S = 152) and each quadrant is stored as is and
flipped along each axis (12 images per specimen, all paired with the specimen's curve).

Stress-strain curve (100 points). The linear strain-hardening law the paper's expert uses
(Jones 2009): ``stress = E*strain`` up to ``eps_y = sigma_y / E``, then
``sigma_y + H*(strain - eps_y)``. E and sigma_y follow Gibson-Ashby scaling with the measured
relative density rho (Gibson & Ashby 1997, "Cellular Solids", 2nd ed.):

* octet, stretch-dominated: ``E/E_s = rho/9``, ``sigma_y/sigma_ys = rho/3`` (Deshpande, Fleck &
  Ashby 2001, J. Mech. Phys. Solids 49:1747, the octet truss loaded along a cube axis; also
  Deshpande, Ashby & Fleck 2001, Acta Mater. 49:1035, stretching versus bending);
* gyroid, bending-dominated: ``E/E_s = 0.45 rho^2``, ``sigma_y/sigma_ys = 0.3 rho^1.5``
  (the exponents of Gibson & Ashby's open-cell, bending-dominated foams, with their plastic
  collapse constant C5 ~ 0.3; gyroid exponents near 2 and 1.5 are reported by Maskery et al. 2018,
  "Insights into the mechanical properties of several triply periodic minimal surface lattice
  structures made by polymer additive manufacturing", Polymer, and by Al-Ketan & Abu Al-Rub 2019,
  "Multifunctional mechanical metamaterials based on triply periodic minimal surface lattices",
  Adv. Eng. Mater.; the prefactor 0.45 is our choice within the reported range).

Solid: E_s = 190 GPa, sigma_ys = 450 MPa, representative of laser-powder-bed-fused 316L steel.
The hardening modulus ``H = eta * E`` (eta = 0.02 octet, 0.05 gyroid) is an assumption, not a
sourced law: bending-dominated lattices show a rising plateau, stretch-dominated ones a nearly
flat one. Specimen-to-specimen scatter multiplies E, sigma_y and H by independent log-normal
factors (5 %), and the measured curve carries Gaussian noise of 1 % of sigma_y (load cell).

Two populations (``LatticeConfig.population``):

* ``design`` (the default, as in the paper): each topology is printed at ONE design relative density
  (``design_density``, 0.20 for both here; the paper does not state its values) and scatters
  around it only through the print process: a log-normal deviation of the printed density
  (``density_cv`` = 4 %, a typical L-PBF strut-thickness deviation) plus the voxel defects above,
  all of which enter the measured density. The two populations' curves then "split naturally"
  (the paper's Figure 6): octet stiff with a flat plateau, gyroid softer with a rising one.
* ``spread``: the design density itself is drawn uniformly from ``density`` (0.10-0.30) for each
  specimen, so within a topology E varies 3x (octet) to 9x (gyroid): a harder, density-confounded set
  in which a curve's amplitude says more about its density than its topology. Both settings draw
  the same random numbers, so the same seed gives the same specimens except for their density.

Every specimen is generated from its own random stream ``(seed, index)``, so a dataset is
reproducible and can be generated in parallel and in any block size.
"""

from __future__ import annotations

import math
import multiprocessing
from collections import deque
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import norm

from pima_hpc.data.errors import DataError
from pima_hpc.data.writer import DatasetWriter, ModalityLayout, TruthField, default_provenance

TOPOLOGIES = ("gyroid", "octet")
GYROID, OCTET = 0, 1

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
    points: int = 100                # curve length
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
        return np.linspace(0.0, self.strain_max, self.points)


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


# --------------------------------------------------------------------------------------------
# One specimen


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


def render_photo(phi: np.ndarray, px: float, dz: float, p: dict, cfg: LatticeConfig, rng) -> np.ndarray:
    """Top-view grayscale photograph (uint8, X x Y) of the solid ``phi < 0``; see the module docstring."""
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


def stress_strain(topology: int, rho: float, scatter: np.ndarray, cfg: LatticeConfig, rng):
    """Compression curve (MPa) of a specimen of measured density ``rho``, and its true parameters.

    Linear strain hardening with Gibson-Ashby moduli (module docstring), log-normal specimen
    scatter, and Gaussian load noise of ``cfg.curve_noise * sigma_y``.
    """
    e, s, h = SCALING[topology].moduli(rho)
    e, s, h = e * math.exp(scatter[0]), s * math.exp(scatter[1]), h * math.exp(scatter[2])
    eps = cfg.strain
    eps_y = s / e
    clean = np.where(eps <= eps_y, e * eps, s + h * (eps - eps_y))
    curve = clean + cfg.curve_noise * s * rng.standard_normal(eps.shape)
    return curve, {"E": e, "sigma_y": s, "H": h, "eps_y": eps_y}


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


def generate_specimen(seed: int, index: int, cfg: LatticeConfig) -> dict:
    """Everything stored for specimen ``index``: images (views, 1, S, S) uint8, curve, truth."""
    p = specimen_parameters(seed, index, cfg)
    rng = np.random.default_rng([seed, index, 1])
    phi, px, dz = specimen_field(p, cfg, rng)
    rho = measured_density(phi)
    photo = render_photo(phi, px, dz, p, cfg, rng)
    del phi
    curve, params = stress_strain(p["topology"], rho, p["scatter"], cfg, rng)
    return {"images": views(photo, cfg), "curve": curve, "topology": p["topology"], "relative_density": rho,
            "target_density": p["target_density"], "cell_mm": p["cell_mm"], "porosity": p["porosity"], **params}


TRUTH = [
    TruthField("topology", "int64", "", "0 = gyroid, 1 = octet"),
    TruthField("relative_density", "float64", "", "solid fraction measured on the voxelised specimen"),
    TruthField("target_density", "float64", "", "design relative density before print defects"),
    TruthField("cell_size", "float64", "mm", "unit-cell size"),
    TruthField("porosity", "float64", "", "void fraction drawn for the specimen"),
    TruthField("E", "float64", "MPa", "elastic modulus of the curve"),
    TruthField("sigma_y", "float64", "MPa", "yield stress of the curve"),
    TruthField("H", "float64", "MPa", "linear hardening modulus of the curve"),
    TruthField("eps_y", "float64", "", "yield strain sigma_y / E"),
    TruthField("specimen", "int64", "", "specimen index (its views share the curve)"),
    TruthField("view", "int64", "", "quadrant * 3 + flip (0 as is, 1 flipped along y, 2 along x)"),
]


def _generate_block(args) -> list[dict]:
    seed, start, stop, cfg = args
    return [generate_specimen(seed, i, cfg) for i in range(start, stop)]


def _rows(specimens: list[dict], first_index: int, cfg: LatticeConfig) -> tuple[dict, np.ndarray, dict]:
    v = cfg.views
    images = np.concatenate([s["images"] for s in specimens])
    curves = np.repeat(np.stack([s["curve"] for s in specimens]), v, axis=0)
    labels = np.repeat([s["topology"] for s in specimens], v)
    truth = {
        "topology": labels,
        "relative_density": np.repeat([s["relative_density"] for s in specimens], v),
        "target_density": np.repeat([s["target_density"] for s in specimens], v),
        "cell_size": np.repeat([s["cell_mm"] for s in specimens], v),
        "porosity": np.repeat([s["porosity"] for s in specimens], v),
        "E": np.repeat([s["E"] for s in specimens], v),
        "sigma_y": np.repeat([s["sigma_y"] for s in specimens], v),
        "H": np.repeat([s["H"] for s in specimens], v),
        "eps_y": np.repeat([s["eps_y"] for s in specimens], v),
        "specimen": np.repeat(np.arange(first_index, first_index + len(specimens)), v),
        "view": np.tile(np.arange(v), len(specimens)),
    }
    return {"image": images, "curve": curves}, labels, truth


def build_lattice(out, n: int = 91, *, seed: int = 0, cfg: LatticeConfig | None = None,
                  test_fraction: float = 0.2, shard_size: int | None = None, workers: int = 0,
                  block: int = 8, progress: bool = True, overwrite: bool = False) -> Path:
    """Generate ``n`` specimens into a dataset at ``out`` (train/test split by specimen).

    Specimens ``[0, n_train)`` form the training split and the rest the test split (their
    parameters are i.i.d., so this is a random split; all views of a specimen stay on one side).
    Memory is bounded by ``block`` specimens per worker plus the writer's buffers, whatever
    ``n``; ``workers > 0`` renders in that many processes (results are identical).
    """
    cfg = cfg or LatticeConfig()
    if n < 2:
        raise DataError(f"--n must be >= 2 specimens (one per split at least), got {n}")
    if not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    n_train = n - n_test
    if n_test < 1 or n_train < 1:
        raise DataError(f"--n {n} with --test-fraction {test_fraction} leaves an empty split; use more specimens")
    v = cfg.views
    modalities = [
        ModalityLayout("image", "image", (1, cfg.size, cfg.size), units="gray level (8-bit)", storage="uint8",
                       description="top-view photograph of the lattice, contrast-stretched 8-bit"),
        ModalityLayout("curve", "curve", (cfg.points,), t=cfg.strain, units="MPa", t_units="strain",
                       normalisation="zero-max",
                       description="compressive engineering stress vs strain; offset 0 keeps stress = E*strain linear"),
    ]
    cfg_dict = asdict(cfg)
    prov = default_provenance("lattice", "pima_hpc.data.lattice.build_lattice", seed=seed, specimens=n,
                              test_fraction=test_fraction, config=cfg_dict,
                              solid={"E_s_MPa": E_SOLID, "sigma_ys_MPa": SIGMA_Y_SOLID},
                              scaling={TOPOLOGIES[k]: asdict(law) for k, law in SCALING.items()},
                              split="specimens [0, n_train) train, the rest test")
    blocks = ((seed, a, min(a + block, n), cfg) for a in range(0, n, block))  # lazy: O(1) memory in n
    with DatasetWriter(out, modalities, {"train": n_train * v, "test": n_test * v}, shard_size=shard_size,
                       label_names=TOPOLOGIES, truth=TRUTH, provenance=prov, overwrite=overwrite) as w:
        bar = _progress(n, progress)
        for (_, start, _, _), specimens in _run_blocks(blocks, workers):
            arrays, labels, truth = _rows(specimens, start, cfg)
            # a block may straddle the train/test boundary
            cut = max(0, min(len(specimens), n_train - start)) * v
            for split, sl in (("train", slice(0, cut)), ("test", slice(cut, None))):
                if sl.start != (sl.stop if sl.stop is not None else len(labels)):
                    w.write(split, {k: a[sl] for k, a in arrays.items()}, labels[sl],
                            {k: a[sl] for k, a in truth.items()}, source=f"lattice specimens {start}..")
            bar.update(len(specimens))
        bar.close()
    return Path(out)


def _run_blocks(blocks, workers: int):
    """Yield (block, its specimens) in order; with workers, at most 2 blocks per worker in flight."""
    if workers <= 0:
        for b in blocks:
            yield b, _generate_block(b)
        return
    ctx = multiprocessing.get_context("spawn")  # no inherited HDF5 handles or thread pools
    with ctx.Pool(workers) as pool:
        pending = deque()
        for b in blocks:
            pending.append((b, pool.apply_async(_generate_block, (b,))))
            if len(pending) > 2 * workers:
                done, res = pending.popleft()
                yield done, res.get()
        while pending:
            done, res = pending.popleft()
            yield done, res.get()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="specimen", desc="lattice", dynamic_ncols=True, disable=not enabled)


__all__ = ["LatticeConfig", "SCALING", "TOPOLOGIES", "build_lattice", "generate_specimen", "stress_strain",
           "render_photo", "specimen_field", "measured_density"]
