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

Modules: :mod:`.config` (settings, topology codes), :mod:`.cells` (unit-cell geometry),
:mod:`.defects` (print-defect random fields), :mod:`.photos` (rendering, stored views),
:mod:`.mechanics` (Gibson-Ashby scaling, stress-strain curve), :mod:`.specimens` (one specimen)
and :mod:`.build` (:func:`build_lattice`); every public name is importable from this package.
"""

from __future__ import annotations

from pima_hpc.data.lattice.build import TRUTH, build_lattice
from pima_hpc.data.lattice.cells import (CELL_GRID, density_table, equivalent_radius, gyroid_cell, level_for_density,
                                         octet_cell, octet_segments, sample_cell)
from pima_hpc.data.lattice.config import GYROID, OCTET, TOPOLOGIES, LatticeConfig
from pima_hpc.data.lattice.defects import TILE, noise_tile, noise_window, smooth_field, tile_quantile
from pima_hpc.data.lattice.mechanics import E_SOLID, SCALING, SIGMA_Y_SOLID, ScalingLaw, stress_strain
from pima_hpc.data.lattice.photos import render_photo, views
from pima_hpc.data.lattice.specimens import generate_specimen, measured_density, specimen_field, specimen_parameters

__all__ = ["LatticeConfig", "SCALING", "TOPOLOGIES", "build_lattice", "generate_specimen", "stress_strain",
           "render_photo", "specimen_field", "measured_density",
           # also re-exported, so every name of the former single module imports from here
           "CELL_GRID", "E_SOLID", "GYROID", "OCTET", "SIGMA_Y_SOLID", "TILE", "TRUTH", "ScalingLaw", "density_table",
           "equivalent_radius", "gyroid_cell", "level_for_density", "noise_tile", "noise_window", "octet_cell",
           "octet_segments", "sample_cell", "smooth_field", "specimen_parameters", "tile_quantile", "views"]
