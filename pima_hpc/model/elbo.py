"""The PIMA posterior, mixture prior and closed-form ELBO, one paper equation per function.

Shapes: B samples, C clusters, l latent dimensions, L curve points.
All log-densities include their 2*pi constants, so each term is a true expectation and can be
checked against Monte Carlo (tests/test_elbo.py).
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def product_of_experts(mus: list[torch.Tensor], logvars: list[torch.Tensor],
                       mask: torch.Tensor | None = None, prior_expert: bool = False):
    """Fuse unimodal Gaussians into q(z|X_1..X_D) = N(mu, sigma^2) (eqs 7-8).

    sigma^-2 = sum_i sigma_i^-2 and mu / sigma^2 = sum_i mu_i / sigma_i^2, over the modalities
    present. ``mask`` (B, D) marks present modalities (1) and missing ones (0), for cross-modal
    inference; ``prior_expert`` adds N(0, I) as one more expert so a sample with every modality
    masked falls back to the prior instead of dividing by zero.
    Returns (mu, logvar), each (B, l).
    """
    mu_stack = torch.stack(mus, dim=1)  # (B, D, l)
    precision = torch.exp(-torch.stack(logvars, dim=1))
    if mask is not None:
        precision = precision * mask.to(precision.dtype).unsqueeze(-1)
    total = precision.sum(dim=1)
    weighted = (precision * mu_stack).sum(dim=1)
    if prior_expert:
        total = total + 1.0  # N(0, I): precision 1, mean 0
    return weighted / total, -torch.log(total)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None):
    """z = mu + eps * sigma with eps ~ N(0, I) (Section 2.1), from an explicit generator for exact resume."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device="cpu").to(mu.device)
    return mu + eps * torch.exp(0.5 * logvar)


def log_normal_diag(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag exp(logvar)) summed over the last axis (broadcasting)."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar)).sum(-1)


def log_joint_clusters(z: torch.Tensor, log_pi: torch.Tensor, means: torch.Tensor,
                       logvars: torch.Tensor) -> torch.Tensor:
    """log pi_c + log N(z; mu_c, sigma_c^2) for every cluster (eqs 9-10): (B, l) -> (B, C)."""
    return log_pi + log_normal_diag(z.unsqueeze(1), means, logvars)


def log_normal_full(x: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(x; mu_c, Sigma_c) for every cluster, Sigma_c = L_c L_c^T: (B, l), (C, l), (C, l, l) -> (B, C)."""
    diff = (x.unsqueeze(1) - means).unsqueeze(-1)                                   # (B, C, l, 1)
    white = torch.linalg.solve_triangular(scale_tril.expand(diff.shape[0], -1, -1, -1), diff, upper=False)
    log_det = 2.0 * torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)  # (C,)
    return -0.5 * (x.shape[-1] * LOG_2PI + log_det + (white ** 2).sum((-2, -1)))


def log_joint_clusters_full(z: torch.Tensor, log_pi: torch.Tensor, means: torch.Tensor,
                            scale_tril: torch.Tensor) -> torch.Tensor:
    """log pi_c + log N(z; mu_c, Sigma_c) (eqs 9-10 with a full covariance per cluster): (B, l) -> (B, C)."""
    return log_pi + log_normal_full(z, means, scale_tril)


def log_responsibilities(z: torch.Tensor, log_pi: torch.Tensor, means: torch.Tensor,
                         logvars: torch.Tensor) -> torch.Tensor:
    """log gamma_c = log p(c|z) (eq 15), normalised by logsumexp (ERRATA 8).

    The paper's product of exponentials underflows to 0/0 for z far from every centre;
    in log space gamma sums to one and stays finite everywhere.
    """
    joint = log_joint_clusters(z, log_pi, means, logvars)
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def expected_log_prior_z(mu: torch.Tensor, logvar: torch.Tensor, means: torch.Tensor,
                         logvars: torch.Tensor) -> torch.Tensor:
    """E_q(z)[log N(z; mu_c, sigma_c^2)] per cluster (Lemmas B.1-B.2, ERRATA 1): (B, C).

    = -1/2 sum_j [log 2 pi sigma_cj^2 + sigma_j^2 / sigma_cj^2 + (mu_j - mu_cj)^2 / sigma_cj^2].
    """
    mu, logvar = mu.unsqueeze(1), logvar.unsqueeze(1)
    inv = torch.exp(-logvars)
    return -0.5 * (LOG_2PI + logvars + torch.exp(logvar) * inv + (mu - means) ** 2 * inv).sum(-1)


def expected_log_prior_z_full(mu: torch.Tensor, logvar: torch.Tensor, means: torch.Tensor,
                             scale_tril: torch.Tensor) -> torch.Tensor:
    """E_q(z)[log N(z; mu_c, Sigma_c)] per cluster with a full covariance (Lemmas B.1-B.2): (B, C).

    = log N(mu; mu_c, Sigma_c) - 1/2 tr(Sigma_c^-1 diag(s^2)), and tr(Sigma^-1 diag(s^2)) = sum_j (Sigma^-1)_jj s_j^2.
    With a diagonal Sigma_c it is :func:`expected_log_prior_z`.
    """
    precision = torch.cholesky_inverse(scale_tril)                                   # (C, l, l)
    trace = torch.exp(logvar) @ torch.diagonal(precision, dim1=-2, dim2=-1).T          # (B, C)
    return log_normal_full(mu, means, scale_tril) - 0.5 * trace


def expected_log_prior_c(gamma: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """E_q[log p(c)] = sum_c gamma_c log pi_c (Lemma B.3 as corrected by ERRATA 2): (B,)."""
    return (gamma * log_pi).sum(-1)


def entropy_q_z(logvar: torch.Tensor) -> torch.Tensor:
    """-E_q[log q(z|X)] = 1/2 sum_j (1 + log 2 pi sigma_j^2) (Lemma B.4): (B,)."""
    return 0.5 * (1.0 + LOG_2PI + logvar).sum(-1)


def entropy_q_c(gamma: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """-E_q[log q(c|X)] = -sum_c gamma_c log gamma_c (Lemma B.5): (B,)."""
    return -(gamma * log_gamma).sum(-1)


def expert_log_likelihood(x: torch.Tensor, expert_means: torch.Tensor, log_noise_var: torch.Tensor) -> torch.Tensor:
    """log p(X_s | c) = log N(X_s; E(t; theta_c), sigma_hat_c^2 I) per cluster (eq 11): (B, L), (C, L), (C,) -> (B, C)."""
    sq = ((x.unsqueeze(1) - expert_means) ** 2).sum(-1)
    n = x.shape[-1]
    return -0.5 * (n * (LOG_2PI + log_noise_var) + sq * torch.exp(-log_noise_var))


def masked_expert_log_likelihood(x: torch.Tensor, mask: torch.Tensor, expert_means: torch.Tensor,
                                 log_noise_var: torch.Tensor) -> torch.Tensor:
    """Eq 11 over each curve's own measured points: log N(x_d[M_d]; E(t_d; theta_c)[M_d], sigma_hat_c^2 I).

    x and mask (B, P) (mask 1 on measured points), expert_means (B, C, P) on every sample's grid,
    log_noise_var (C,) -> (B, C). A curve of n_d points contributes n_d terms, as on a shared grid.
    """
    sq = (mask.unsqueeze(1) * (x.unsqueeze(1) - expert_means) ** 2).sum(-1)
    n = mask.sum(-1, keepdim=True)
    return -0.5 * (n * (LOG_2PI + log_noise_var) + sq * torch.exp(-log_noise_var))


def profiled_amplitude(x: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """a_dc = max(<x_d, m_c>, 0) / <m_c, m_c>, the best amplitude of each cluster's shape: (B, L), (C, L) -> (B, C).

    x and shapes must share a zero offset (a curve of amplitude 0 is 0); see pima_hpc.model.experts.
    """
    return (x @ shapes.T).clamp_min(0.0) / (shapes ** 2).sum(-1).clamp_min(1e-30)


def profiled_expert_log_likelihood(x: torch.Tensor, shapes: torch.Tensor, log_noise_var: torch.Tensor) -> torch.Tensor:
    """max_a log N(X_s; a E(t; theta_c), sigma_hat_c^2 I), eq 11 with a free amplitude a >= 0: (B, C).

    min_a ||x - a m||^2 = ||x||^2 - max(<x, m>, 0)^2 / ||m||^2 (a profile likelihood, docs/method.md).
    """
    a = profiled_amplitude(x, shapes)
    sq = ((x ** 2).sum(-1, keepdim=True) - a ** 2 * (shapes ** 2).sum(-1)).clamp_min(0.0)
    n = x.shape[-1]
    return -0.5 * (n * (LOG_2PI + log_noise_var) + sq * torch.exp(-log_noise_var))


def gaussian_recon_log_likelihood(x: torch.Tensor, x_hat: torch.Tensor, log_var=0.0) -> torch.Tensor:
    """log N(X_i; mu_hat_i, sigma^2 I) for a data-driven modality (eq 12): (B,). ``log_var`` = 0 is the
    unit variance ERRATA 3's form implies; ``model.image_noise: learned`` passes a calibrated one."""
    d = (x - x_hat).flatten(1)
    log_var = torch.as_tensor(log_var, dtype=d.dtype, device=d.device)
    return -0.5 * (d.shape[1] * (LOG_2PI + log_var) + (d ** 2).sum(-1) * torch.exp(-log_var))


def moe_mean_var(weights: torch.Tensor, expert_means: torch.Tensor, noise_var: torch.Tensor,
                 amplitude: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Mixture-of-experts mean and variance of a scientific modality (eqs 13-14, ERRATA 4).

    E[X] = sum_c w_c E_c;  Var[X] = sum_c w_c (sigma_hat_c^2 + E_c^2) - E[X]^2.
    ``weights`` is pi (C,) for the marginal, or gamma (B, C) for a prediction given a sample.
    With a free amplitude, X | c = a E_c + noise and ``amplitude`` = (E[a | c], E[a^2 | c]), each
    (B, C): E[X] = sum_c w_c E[a|c] E_c, E[X^2] = sum_c w_c (sigma_hat_c^2 + E[a^2|c] E_c^2), so the
    amplitude's uncertainty widens the band (expert curves then in units with a zero offset).
    """
    if amplitude is None:
        mean = weights @ expert_means
        second = weights @ (noise_var.unsqueeze(-1) + expert_means ** 2)
    else:
        a1, a2 = amplitude
        mean = (weights * a1) @ expert_means
        second = weights @ noise_var.unsqueeze(-1) + (weights * a2) @ expert_means ** 2
    return mean, (second - mean ** 2).clamp_min(0.0)


def lognormal_moments(mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[a], E[a^2]) of a = exp(N(mean, exp(logvar)))."""
    var = logvar.exp()
    return torch.exp(mean + 0.5 * var), torch.exp(2.0 * mean + 2.0 * var)


def crossmodal_kl(mu: torch.Tensor, logvar: torch.Tensor, mu_uni: torch.Tensor, logvar_uni: torch.Tensor):
    """KL(q(z|X_1..X_D) || q~(z|X_i)) summed over latent components (eq 18, ERRATA 5): (B,).

    = 1/2 sum_k [log(s~^2 / s^2) - 1 + s^2 / s~^2 + (mu~ - mu)^2 / s~^2].
    """
    inv = torch.exp(-logvar_uni)
    return 0.5 * (logvar_uni - logvar - 1.0 + torch.exp(logvar) * inv + (mu_uni - mu) ** 2 * inv).sum(-1)


def cluster_distillation(log_gamma: torch.Tensor, log_gamma_uni: torch.Tensor) -> torch.Tensor:
    """KL(q(c | X) || p~(c | X_i)) per sample, (B,): not in the paper (docs/method.md).

    Eq 18 alone regresses the unimodal mean onto the multimodal one; where one modality is
    ambiguous the regression lands between clusters, often inside a third one. This term trains
    a unimodal cluster head on the multimodal cluster assignment itself (a distillation of eq 15).
    """
    return (log_gamma.exp() * (log_gamma - log_gamma_uni)).sum(-1)
