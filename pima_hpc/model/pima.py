"""The PIMA model: unimodal encoders, product-of-experts fusion, Gaussian-mixture prior,
data-driven decoders for images (and curves listed in ``model.network_curves``) and physics
experts for the other curves (Sections 2.1-2.4).

This module knows nothing about ranks or launchers. Parameters trained by Adam are the
networks, the mixture logits (eq 9) and, unless EM sets them, the cluster log-variances.
The cluster means (eq 16), the expert parameters (eq 17) and the expert noise sigma_hat_c are
buffers the model sets in closed form (:meth:`PIMA.m_step`, :meth:`PIMA.solve_expert`) from the
sufficient statistics that :mod:`pima_hpc.train.em` gathers and sums over workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import nn

from pima_hpc.data.base import CURVE, IMAGE, DatasetSpec, measured_points, points_key
from pima_hpc.model import elbo, rls
from pima_hpc.model.experts import build_expert
from pima_hpc.errors import ConfigError
from pima_hpc.model.networks import CurveDecoder, ImageDecoder, build_encoder
from pima_hpc.model.statistics import (expert_noise_variance, m_step_full_covariances, m_step_means,
                                       m_step_tied_variance, m_step_variances, m_step_weights,
                                       profiled_noise_variance)

if TYPE_CHECKING:  # the model reads its settings, it does not depend on the config module
    from pima_hpc.config import ModelConfig


def spread_points(n: int, dim: int, radius: float) -> torch.Tensor:
    """``n`` well-separated initial cluster means: greedy farthest points on a sphere of ``radius``.

    Random normal means can land close together, and two clusters that start on top of each other
    may never separate in latent space even when their experts tell them apart.
    """
    if dim == 1:
        return torch.linspace(-radius, radius, n).unsqueeze(1)
    cand = torch.randn(64 * n, dim)
    cand = radius * cand / cand.norm(dim=1, keepdim=True)
    chosen = [0]
    dist = (cand - cand[0]).norm(dim=1)
    for _ in range(n - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, (cand - cand[nxt]).norm(dim=1))
    return cand[chosen].clone()



def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """A network's output at least float32: under autocast (train.precision=bf16) it is bfloat16."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class PIMA(nn.Module):
    def __init__(self, spec: DatasetSpec, cfg: ModelConfig):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        c, l = cfg.n_clusters, cfg.latent_dim
        self.names = spec.names
        curves = [m.name for m in spec.modalities if m.kind == CURVE]
        unknown = [n for n in cfg.network_curves if n not in curves]
        if unknown:
            raise ConfigError(f"config key 'model.network_curves': {unknown} are not curve modalities of the data "
                              f"(its curves: {curves}); name curves to decode by a network instead of an expert")
        self.image_names = [m.name for m in spec.modalities if m.kind == IMAGE]
        # curves with a physics expert (eqs 11, 17) and curves decoded from z by a network (eq 12's Gaussian)
        self.curve_names = [n for n in curves if n not in cfg.network_curves]
        self.network_curve_names = [n for n in curves if n in cfg.network_curves]
        self.decoded_names = [n for n in self.names if n in self.image_names or n in self.network_curve_names]
        self.encoders = nn.ModuleDict({m.name: build_encoder(m, cfg.image_channels, cfg.curve_channels, l)
                                       for m in spec.modalities})
        self.decoders = nn.ModuleDict({m.name: ImageDecoder(m, cfg.decoder_channels, l) if m.kind == IMAGE
                                       else CurveDecoder(m, l) for m in spec.modalities if m.name in self.decoded_names})
        self.experts = {name: build_expert(cfg.expert, spec[name].t, cfg.expert_amplitude, cfg.expert_options)
                        for name in self.curve_names}
        self.amplitude_free = cfg.expert_amplitude == "free"
        # curves measured on per-sample grids: the experts score and fit their points alone
        self.point_curves = [n for n in self.curve_names if spec[n].points]
        if self.point_curves and self.amplitude_free:
            raise ConfigError(f"config key 'model.expert_amplitude': curves {self.point_curves} have per-sample grids, "
                              "where a free amplitude has no closed form; use model.expert_amplitude=fixed")
        lacking = [n for n in self.point_curves if not self.experts[n].has_information_form]
        if lacking:
            raise ConfigError(f"config key 'model.expert': {cfg.expert!r} cannot fit curves {lacking} on their own "
                              "grids (it has no candidate_designs); use a registered expert or add them")
        # eq 9: pi = softmax(free vector)
        self.pi_logits = nn.Parameter(torch.zeros(c))
        # eq 10: cluster means (EM, eq 16) and log-variances (Adam, or EM when enabled)
        self.register_buffer("cluster_means", spread_points(c, l, cfg.cluster_init_scale))
        self.cluster_logvars = nn.Parameter(torch.zeros(c, l))
        # model.cluster_covariance=full: Sigma_c = L_c L_c^T, set by EM (cluster_logvars then mirror its diagonal)
        self.full_covariance = cfg.cluster_covariance == "full"
        if self.full_covariance:
            self.register_buffer("cluster_scale_tril", torch.eye(l).repeat(c, 1, 1))
        init_noise = float(np.log(cfg.expert_noise_std ** 2))
        for name in self.decoded_names:  # sigma^2 of eq 12: 1 (the paper) or set in closed form (image_noise: learned)
            self.register_buffer(f"log_recon_var_{name}", torch.zeros(()))
        for name, expert in self.experts.items():
            self.register_buffer(f"theta_{name}", torch.zeros(c, expert.n_params, dtype=torch.float64))
            self.register_buffer(f"log_noise_{name}", torch.full((c,), init_noise))
            self.register_buffer(f"curves_{name}", torch.zeros(c, len(expert.t)))

    # ----- parameters set in closed form --------------------------------------------------------
    def theta(self, name: str) -> np.ndarray:
        return getattr(self, f"theta_{name}").cpu().numpy()

    def set_theta(self, name: str, theta: np.ndarray) -> None:
        """Set expert parameters (physical units) and cache their curves in normalised units."""
        getattr(self, f"theta_{name}").copy_(torch.as_tensor(theta, dtype=torch.float64))
        curves = self.spec[name].to_normalised(self.experts[name].evaluate(theta))
        getattr(self, f"curves_{name}").copy_(torch.as_tensor(curves, dtype=torch.float32))

    def expert_curves(self, name: str) -> torch.Tensor:
        """E(t; theta_c) of every cluster in the normalised data space (C, L)."""
        return getattr(self, f"curves_{name}")

    def log_noise(self, name: str) -> torch.Tensor:
        return getattr(self, f"log_noise_{name}")

    def curve_shift(self, name: str) -> float:
        """offset / scale: normalised curves plus this have a zero offset, x_n + shift = x_physical / scale,
        the units in which a free amplitude multiplies the curve."""
        s = self.spec[name]
        return float(s.offset / s.scale)

    def expert_curves_at(self, name: str, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """E(t_d; theta_c) on every sample's own grid t (B, P), normalised: (B, C, P)."""
        e = self.experts[name].evaluate_at(t.detach().cpu().double().numpy(), self.theta(name))
        return torch.as_tensor(self.spec[name].to_normalised(e), dtype=dtype, device=t.device)

    def measured_points(self, name: str, batch: dict[str, torch.Tensor]):
        """Curve ``name`` of a batch as measured, physical units (:func:`pima_hpc.data.base.measured_points`):
        (x, t, mask) (B, P) float64 on per-sample grids, (x, None, None) on the shared grid."""
        return measured_points(self.spec[name], batch)

    def curve_log_likelihood(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(X_s | c) of curve modality ``name`` for every cluster (eq 11; profiled over a free amplitude;
        over its measured points alone where it has per-sample grids): (B, C)."""
        if name in self.point_curves:
            x, t, mask = (batch[points_key(name, p)] for p in ("x", "t", "mask"))
            return elbo.masked_expert_log_likelihood(x, mask, self.expert_curves_at(name, t, x.dtype),
                                                     self.log_noise(name))
        x = batch[name]
        if not self.amplitude_free:
            return elbo.expert_log_likelihood(x, self.expert_curves(name), self.log_noise(name))
        shift = self.curve_shift(name)
        return elbo.profiled_expert_log_likelihood(x + shift, self.expert_curves(name) + shift, self.log_noise(name))

    def amplitudes(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Each curve's profiled amplitude under every cluster's shape (1 = the cluster's typical curve): (B, C)."""
        shift = self.curve_shift(name)
        return elbo.profiled_amplitude(x + shift, self.expert_curves(name) + shift)

    def recon_log_likelihood(self, name: str, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """log p(X_i | z) of a network-decoded modality ``name`` (eq 12; an image or a network curve) with its
        observation variance: (B,)."""
        return elbo.gaussian_recon_log_likelihood(x, x_hat, getattr(self, f"log_recon_var_{name}"))

    def set_recon_variance(self, name: str, var: float) -> None:
        getattr(self, f"log_recon_var_{name}").fill_(float(np.log(var)))

    def log_pi(self) -> torch.Tensor:
        return torch.log_softmax(self.pi_logits, dim=0)

    @torch.no_grad()
    def m_step(self, latent: Mapping[str, np.ndarray], variances: bool, weights: bool, tied: bool = False) -> None:
        """The mixture's M-step from the gamma-weighted latent sums (n0, n1, n2): cluster means (eq 16),
        optionally variances (per cluster, or one tied value) and weights."""
        n0, n1, n2 = latent["n0"], latent["n1"], latent["n2"]
        self.cluster_means.copy_(torch.as_tensor(m_step_means(n0, n1, self.cluster_means.double().cpu().numpy())))
        if self.full_covariance:  # always set by EM (the config checks em_variances)
            self.set_covariances(m_step_full_covariances(n0, n1, latent["n2_full"], self.covariances()))
        elif variances and tied:
            self.cluster_logvars.data.fill_(float(np.log(m_step_tied_variance(n0, n1, n2))))
        elif variances:
            var = m_step_variances(n0, n1, n2, self.cluster_logvars.detach().exp().double().cpu().numpy())
            self.cluster_logvars.data.copy_(torch.as_tensor(np.log(var)))
        if weights:
            self.pi_logits.data.copy_(torch.as_tensor(np.log(m_step_weights(n0))))

    def covariances(self) -> np.ndarray:
        """The clusters' covariances, (C, l, l) with full covariances, else their diagonals (C, l)."""
        if self.full_covariance:
            tril = self.cluster_scale_tril.double().cpu()
            return (tril @ tril.transpose(-1, -2)).numpy()
        return self.cluster_logvars.detach().exp().double().cpu().numpy()

    @torch.no_grad()
    def set_covariances(self, cov: np.ndarray) -> None:
        """Set the clusters' covariances: (C, l, l) with full covariances (a diagonal (C, l) is accepted
        there too), else (C, l); the log-variances always hold the diagonal."""
        cov = np.asarray(cov, dtype=np.float64)
        if self.full_covariance:
            cov = cov if cov.ndim == 3 else np.einsum("ci,ij->cij", cov, np.eye(cov.shape[-1]))
            self.cluster_scale_tril.copy_(torch.as_tensor(np.linalg.cholesky(cov)))
            cov = np.diagonal(cov, axis1=1, axis2=2)
        self.cluster_logvars.data.copy_(torch.as_tensor(np.log(cov)))

    def expected_log_prior_z(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """E_q(z)[log p(z | c)] per cluster (Lemmas B.1-B.2), with the configured covariances: (B, C)."""
        if self.full_covariance:
            return elbo.expected_log_prior_z_full(mu, logvar, self.cluster_means, self.cluster_scale_tril)
        return elbo.expected_log_prior_z(mu, logvar, self.cluster_means, self.cluster_logvars)

    @torch.no_grad()
    def solve_expert(self, name: str, stats: Mapping[str, np.ndarray], ridge: float, noise: str,
                     noise_floor: float) -> None:
        """Eq 17 for curve modality ``name`` from its gamma-weighted sums (s0, s1, s2; m2 with a free
        amplitude; the information (w, b, q, yy, n) of pima_hpc/model/rls.py for per-sample grids), then
        sigma_hat_c from the weighted residuals when ``noise`` is "learned"."""
        spec = self.spec[name]
        prev_noise = self.log_noise(name).exp().double().cpu().numpy()
        if "q" in stats:  # information in physical units; the noise is kept in normalised ones
            theta = rls.solve_information(self.experts[name], stats, self.theta(name), ridge, shared_grid=False)
            self.set_theta(name, theta)
            s2 = spec.scale ** 2
            var = rls.noise_variance(self.experts[name], stats, theta, prev_noise * s2, noise_floor ** 2 * s2) / s2
            if noise == "learned":
                self.log_noise(name).copy_(torch.as_tensor(np.log(var)))
            return
        s0, s1, s2 = stats["s0"], stats["s1"], stats["s2"]
        if self.amplitude_free:
            # statistics of x_n + offset/scale = x / scale: physical units are one factor away
            theta = self.experts[name].solve(s0, spec.scale * s1, self.theta(name), ridge,
                                             m2=spec.scale ** 2 * stats["m2"])
            self.set_theta(name, theta)
            shapes = self.expert_curves(name).double().cpu().numpy() + self.curve_shift(name)
            var = profiled_noise_variance(s0, stats["m2"], shapes, prev_noise, noise_floor ** 2)
        else:
            # Statistics are in normalised units; experts work in physical units (x = scale x_n + offset).
            s1_phys = spec.scale * s1 + spec.offset * s0[:, None]
            self.set_theta(name, self.experts[name].solve(s0, s1_phys, self.theta(name), ridge))
            var = expert_noise_variance(s0, s1, s2, self.expert_curves(name).double().cpu().numpy(),
                                        prev_noise, noise_floor ** 2)
        if noise == "learned":
            self.log_noise(name).copy_(torch.as_tensor(np.log(var)))

    # ----- inference ---------------------------------------------------------------------------
    def encode_each(self, batch: dict[str, torch.Tensor]) -> tuple[list, list]:
        mus, logvars = [], []
        for name in self.names:
            mu, lv = self.encoders[name](batch[name])
            mus.append(_full_precision(mu))
            logvars.append(_full_precision(lv))
        return mus, logvars

    def encode(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None):
        """q(z | X_1..X_D) by product of experts (eqs 7-8); ``mask`` (B, D) drops missing modalities."""
        mus, logvars = self.encode_each(batch)
        return elbo.product_of_experts(mus, logvars, mask, self.cfg.prior_expert)

    def log_responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """log gamma = log p(c | z) (eq 15, ERRATA 8)."""
        if self.full_covariance:
            joint = elbo.log_joint_clusters_full(z, self.log_pi(), self.cluster_means, self.cluster_scale_tril)
            return joint - torch.logsumexp(joint, dim=-1, keepdim=True)
        return elbo.log_responsibilities(z, self.log_pi(), self.cluster_means, self.cluster_logvars)

    def expert_log_posterior(self, batch: dict[str, torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
        """log p(c | X_s) from the expert likelihoods of the curve modalities ``names`` (all by default), eq 19: (B, C)."""
        names = self.curve_names if names is None else names
        joint = self.log_pi().detach().expand(len(batch[names[0]]), -1)
        for name in names:
            joint = joint + self.curve_log_likelihood(name, batch)
        return joint - torch.logsumexp(joint, dim=-1, keepdim=True)

    def image_log_posterior(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """log p(mu_c | X_i) for a data-driven modality (eq 20): decode every centroid, compare."""
        x_hat = self.decoders[name](self.cluster_means)  # (C, ...)
        d = (x.unsqueeze(1) - x_hat.unsqueeze(0)).flatten(2)
        joint = self.log_pi() - 0.5 * (d ** 2).sum(-1)
        return joint - torch.logsumexp(joint, dim=-1, keepdim=True)

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic cluster assignment: argmax gamma at z = posterior mean (ERRATA 8)."""
        mu, _ = self.encode(batch, mask)
        return self.log_responsibilities(mu).argmax(-1)

    # ----- the ELBO ----------------------------------------------------------------------------
    def cluster_log_posterior(self, batch: dict[str, torch.Tensor], mu: torch.Tensor, logvar: torch.Tensor,
                              z: torch.Tensor, curve_ll: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """log q(c | X) used in the ELBO, (B, C).

        "latent" (the paper): gamma = p(c|z) at the sample z (eq 15), differentiated through.
        "joint": the mean-field optimum of the closed-form ELBO over q(c),
            log q(c) = log pi_c + E_q[log p(z|c)] + sum_s log p(X_s|c) + const,
        which also counts the expert likelihood. Appendix B's eq 27 treats the decoder as
        independent of c; with per-cluster experts it is not, and this q(c) is the tighter
        bound. It is an optimum, so by the envelope theorem no gradient flows through it.
        ``curve_ll`` passes eq 11's log-likelihoods when the caller has them already.
        """
        if self.cfg.cluster_posterior == "latent":
            return self.log_responsibilities(z)
        with torch.no_grad():
            joint = self.log_pi() + self.expected_log_prior_z(mu, logvar)
            for name in self.curve_names:
                joint = joint + (curve_ll[name] if curve_ll is not None else self.curve_log_likelihood(name, batch))
            return joint - torch.logsumexp(joint, dim=-1, keepdim=True)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                q_c: torch.Tensor | None = None, return_codes: bool = False, seen: dict | None = None):
        """Per-sample ELBO terms (Section 2.3 / Appendix B with ERRATA 1-3), each (B,).

        q(c|X) from :meth:`cluster_log_posterior`, unless ``q_c`` (B, C) supplies it (the optional
        expert-guided warm-up uses eq 19's p(c | X_s)). ``return_codes`` also returns the fused
        posterior (mu, logvar), which the streaming EM statistics reuse. ``seen``: what the encoders read
        instead of ``batch`` (train.augment's moved images); every likelihood still scores ``batch``.
        """
        mu, logvar = self.encode(batch if seen is None else seen)
        z = elbo.reparameterize(mu, logvar, generator)
        means = {name: _full_precision(self.decoders[name](z)) for name in self.decoded_names}
        # The networks above may run under the caller's autocast (train.precision=bf16); the ELBO's
        # closed forms below always run in float32.
        with torch.autocast(z.device.type, enabled=False):
            return self._elbo_terms(batch, mu, logvar, z, means, q_c, return_codes)

    def _elbo_terms(self, batch, mu, logvar, z, means, q_c, return_codes):
        """The per-sample terms from the fused posterior (mu, logvar), its sample z and the decoded means."""
        # eq 11 once per step (it holds no parameter: data and closed-form buffers), for q(c) and the term
        curve_ll = {name: self.curve_log_likelihood(name, batch) for name in self.curve_names}
        if q_c is None:
            log_gamma = self.cluster_log_posterior(batch, mu, logvar, z, curve_ll)
        else:
            log_gamma = torch.log(q_c.clamp_min(1e-30))
        gamma = log_gamma.exp()
        log_pi = self.log_pi()
        terms = {"recon": torch.zeros_like(mu[:, 0]), "expert": torch.zeros_like(mu[:, 0])}
        for name in self.decoded_names:
            terms["recon"] = terms["recon"] + self.recon_log_likelihood(name, batch[name], means[name])
        for name in self.curve_names:
            ll = curve_ll[name]
            terms["expert"] = terms["expert"] + (gamma * ll).sum(-1)
        terms["prior_z"] = (gamma * self.expected_log_prior_z(mu, logvar)).sum(-1)
        terms["prior_c"] = elbo.expected_log_prior_c(gamma, log_pi)
        terms["entropy_z"] = elbo.entropy_q_z(logvar)
        terms["entropy_c"] = elbo.entropy_q_c(gamma, log_gamma)
        return (terms, mu, logvar) if return_codes else terms

    # ----- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self.decoders[name](z) for name in self.decoded_names}

    @torch.no_grad()
    def decoded_curve(self, name: str, z: torch.Tensor, physical: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A network curve at codes z: the decoder's mean and eq 12's variance (the same at every point), (B, L) each."""
        mean = self.decoders[name](z)
        var = getattr(self, f"log_recon_var_{name}").exp().expand_as(mean)
        if not physical:
            return mean, var
        s = self.spec[name]
        return s.to_physical(mean), var * s.scale ** 2

    @torch.no_grad()
    def predict_curve(self, name: str, weights: torch.Tensor, physical: bool = True,
                      log_amplitude: tuple[torch.Tensor, torch.Tensor] | None = None):
        """MoE mean and variance of curve modality ``name`` (eqs 13-14, ERRATA 4) under ``weights``.

        With a free amplitude, ``log_amplitude`` = (mean, log-variance) of log a given each cluster,
        (B, C) each (an amplitude head's output); without it the amplitude is 1, the typical curve.
        """
        s = self.spec[name]
        if not self.amplitude_free or log_amplitude is None:
            mean, var = elbo.moe_mean_var(weights, self.expert_curves(name), self.log_noise(name).exp())
        else:
            shift = self.curve_shift(name)
            mean, var = elbo.moe_mean_var(weights, self.expert_curves(name) + shift, self.log_noise(name).exp(),
                                          elbo.lognormal_moments(*log_amplitude))
            mean = mean - shift
        if physical:
            mean, var = s.to_physical(mean), var * s.scale ** 2
        return mean, var


def elbo_from_terms(terms: dict[str, torch.Tensor], recon_w=1.0, expert_w=1.0, prior_w=1.0) -> torch.Tensor:
    """Weighted per-sample ELBO (weights 1 give the ELBO of ERRATA 3, halved to a true log-likelihood bound)."""
    kl_part = terms["prior_z"] + terms["prior_c"] + terms["entropy_z"] + terms["entropy_c"]
    return recon_w * terms["recon"] + expert_w * terms["expert"] + prior_w * kl_part
