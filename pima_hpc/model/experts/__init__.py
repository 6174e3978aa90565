"""Physics experts E(t; theta_c), one parameter vector per cluster (eqs 11, 13-14, 17).

Experts work in PHYSICAL units (the curve grid ``t`` and the curve values as measured), so the
fitted parameters are directly interpretable (a slope; a modulus, a yield strain, a hardening
modulus). The model maps their predictions into the normalised data space.

Two likelihoods (``model.expert_amplitude``):

* ``fixed`` (eq 11): x_d = E(t; theta_c) + noise. Every curve of a modality shares one grid t, so
  for cluster c

      sum_d gamma_cd ||x_d - E(t; theta)||^2 = S0_c ||xbar_c - E(t; theta)||^2 + const,
      S0_c = sum_d gamma_cd,  S1_c = sum_d gamma_cd x_d,  xbar_c = S1_c / S0_c   (ERRATA 9),

  and the normal equations of any design are A_c = S0_c Phi^T Phi, b_c = Phi^T S1_c.
* ``free`` (scale-free): x_d = a_d E(t; theta_c) + noise with a per-sample amplitude a_d profiled
  out in closed form, a_d = <x_d, m> / <m, m> for m = E(t; theta_c). Then

      sum_d gamma_cd ||x_d - a_d m||^2 = tr(M2_c) - m^T M2_c m / m^T m,
      M2_c = sum_d gamma_cd x_d x_d^T   (L x L, the gamma-weighted second moment),

  so the shape maximises a Rayleigh quotient over the expert's family (a generalised eigenproblem
  for a linear expert) and only the shape is identified: the scale is fixed by the convention that
  the cluster's gamma-weighted mean amplitude is 1, sum_d gamma_cd a_d = S0_c, i.e. E(t; theta_c) is
  the cluster's typical curve. A curve family whose members differ only by scale (a relative
  density changes a lattice's modulus, not its topology) then groups by shape.

The statistics (S0, S1, M2) add across batches and ranks (pima_hpc.model.statistics,
docs/distributed.md). Adding an expert is one small class registered by name:

    @register_expert("quadratic")
    class Quadratic(LinearExpert):
        param_names = ("a", "b")
        def design(self, t): return np.stack([t, t**2], axis=-1)

then ``model.expert: quadratic`` in a config.
"""

from pima_hpc.model.experts.base import (AMPLITUDES, EXPERTS, Expert, build_expert, register_expert,
                                         resolve_expert, top_eigenvectors)
from pima_hpc.model.experts.linear import Affine, BSplineCurve, FreeCurve, LinearExpert, Polynomial
from pima_hpc.model.experts.strain_hardening import StrainHardening

__all__ = ["AMPLITUDES", "EXPERTS", "Expert", "build_expert", "register_expert", "resolve_expert",
           "top_eigenvectors", "LinearExpert", "Affine", "FreeCurve", "Polynomial", "BSplineCurve",
           "StrainHardening"]
