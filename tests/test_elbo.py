"""Closed-form ELBO terms against Monte Carlo, PoE against the analytic product, gamma's stability."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from pima_hpc.model import elbo

N_MC = 200_000


@pytest.fixture(autouse=True)
def float64():
    """Float64 here only: sampling error, not rounding, should set the tolerances."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def gaussians():
    g = torch.Generator().manual_seed(0)
    l, c = 3, 4
    return dict(
        mu=torch.randn(1, l, generator=g), logvar=0.5 * torch.randn(1, l, generator=g),
        means=torch.randn(c, l, generator=g) * 2, logvars=0.3 * torch.randn(c, l, generator=g),
        log_pi=torch.log_softmax(torch.randn(c, generator=g), 0),
    )


def _mc(values):
    """Monte Carlo mean and a 6-sigma tolerance from the sample's own spread."""
    return values.mean(0), 6 * values.std(0) / math.sqrt(len(values)) + 1e-12


def _samples(mu, logvar, n=N_MC, seed=1):
    g = torch.Generator().manual_seed(seed)
    return mu + torch.randn(n, mu.shape[-1], generator=g) * torch.exp(0.5 * logvar)


def test_expected_log_prior_z_matches_monte_carlo(gaussians):
    g = gaussians
    closed = elbo.expected_log_prior_z(g["mu"], g["logvar"], g["means"], g["logvars"])[0]
    z = _samples(g["mu"], g["logvar"])
    mc, tol = _mc(elbo.log_normal_diag(z.unsqueeze(1), g["means"], g["logvars"]))
    assert torch.all((closed - mc).abs() < tol), (closed, mc, tol)


def test_entropy_q_z_matches_monte_carlo(gaussians):
    g = gaussians
    z = _samples(g["mu"], g["logvar"])
    mc, tol = _mc(-elbo.log_normal_diag(z, g["mu"], g["logvar"]))
    assert abs(float(elbo.entropy_q_z(g["logvar"])[0] - mc)) < float(tol)


def test_categorical_terms_match_monte_carlo(gaussians):
    g = gaussians
    gamma = torch.softmax(torch.tensor([[0.3, -1.0, 2.0, 0.1]]), -1)
    gen = torch.Generator().manual_seed(2)
    c = torch.multinomial(gamma[0], N_MC, replacement=True, generator=gen)
    mc, tol = _mc(g["log_pi"][c])
    assert abs(float(elbo.expected_log_prior_c(gamma, g["log_pi"])[0] - mc)) < float(tol)
    mc, tol = _mc(-torch.log(gamma[0, c]))
    assert abs(float(elbo.entropy_q_c(gamma, gamma.log())[0] - mc)) < float(tol)


def test_expert_log_likelihood_is_the_gaussian_density():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g)
    curves = torch.randn(3, 7, generator=g)
    log_noise = torch.tensor([-1.0, 0.0, 0.7])
    got = elbo.expert_log_likelihood(x, curves, log_noise)
    for c in range(3):
        ref = multivariate_normal(curves[c].numpy(), np.exp(log_noise[c].item()) * np.eye(7)).logpdf(x.numpy())
        np.testing.assert_allclose(got[:, c].numpy(), ref, rtol=1e-10)


def test_whole_elbo_matches_monte_carlo_of_its_definition(gaussians):
    """The sum of closed-form terms equals E_q[log p(z,c) - log q(z) - log q(c)] by sampling (eq 1)."""
    g = gaussians
    gamma = torch.softmax(torch.tensor([[1.0, 0.2, -0.5, 0.0]]), -1)
    closed = ((gamma * elbo.expected_log_prior_z(g["mu"], g["logvar"], g["means"], g["logvars"])).sum()
              + elbo.expected_log_prior_c(gamma, g["log_pi"]).sum() + elbo.entropy_q_z(g["logvar"]).sum()
              + elbo.entropy_q_c(gamma, gamma.log()).sum())
    z = _samples(g["mu"], g["logvar"], seed=4)
    c = torch.multinomial(gamma[0], N_MC, replacement=True, generator=torch.Generator().manual_seed(5))
    integrand = (g["log_pi"][c] + elbo.log_normal_diag(z, g["means"][c], g["logvars"][c])
                 - elbo.log_normal_diag(z, g["mu"], g["logvar"]) - torch.log(gamma[0, c]))
    mc, tol = _mc(integrand)
    assert abs(float(closed - mc)) < float(tol)


def test_crossmodal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(6)
    mu, lv, mu2, lv2 = (torch.randn(1, 3, generator=g) for _ in range(4))
    z = _samples(mu, lv, seed=7)
    mc, tol = _mc(elbo.log_normal_diag(z, mu, lv) - elbo.log_normal_diag(z, mu2, lv2))
    assert abs(float(elbo.crossmodal_kl(mu, lv, mu2, lv2)[0] - mc)) < float(tol)
    assert float(elbo.crossmodal_kl(mu, lv, mu, lv)[0]) == pytest.approx(0.0, abs=1e-12)


def test_product_of_experts_is_the_normalised_product():
    g = torch.Generator().manual_seed(8)
    mus = [torch.randn(1, 2, generator=g) for _ in range(3)]
    lvs = [torch.randn(1, 2, generator=g) for _ in range(3)]
    mu, lv = elbo.product_of_experts(mus, lvs)
    # Product of densities on a grid, renormalised, has the fused mean and variance (eqs 7-8).
    for j in range(2):
        grid = torch.linspace(-8, 8, 40001)
        logp = sum(-0.5 * (grid - m[0, j]) ** 2 / torch.exp(v[0, j]) for m, v in zip(mus, lvs))
        p = torch.exp(logp - logp.max())
        p = p / p.sum()
        mean = (grid * p).sum()
        var = ((grid - mean) ** 2 * p).sum()
        assert float(mean) == pytest.approx(float(mu[0, j]), abs=1e-6)
        assert float(var) == pytest.approx(float(lv[0, j].exp()), rel=1e-5)


def test_product_of_experts_mask_and_prior_expert():
    mus = [torch.tensor([[1.0]]), torch.tensor([[5.0]])]
    lvs = [torch.tensor([[0.0]]), torch.tensor([[0.0]])]
    mu, lv = elbo.product_of_experts(mus, lvs, mask=torch.tensor([[1.0, 0.0]]))
    assert float(mu) == pytest.approx(1.0) and float(lv) == pytest.approx(0.0)
    mu, lv = elbo.product_of_experts(mus, lvs, mask=torch.tensor([[0.0, 0.0]]), prior_expert=True)
    assert float(mu) == 0.0 and float(lv) == pytest.approx(0.0)
    mu, _ = elbo.product_of_experts(mus, lvs, prior_expert=True)
    assert float(mu) == pytest.approx(2.0)  # (1 + 5 + 0) / 3


def test_gamma_sums_to_one_and_is_finite_far_from_every_centre(gaussians):
    g = gaussians
    z = torch.tensor([[1e4, -1e4, 3e3], [0.0, 0.0, 0.0], [1e8, 1e8, 1e8]])
    log_gamma = elbo.log_responsibilities(z, g["log_pi"], g["means"], g["logvars"])
    gamma = log_gamma.exp()
    assert torch.isfinite(log_gamma).all()
    np.testing.assert_allclose(gamma.sum(-1).numpy(), 1.0, rtol=1e-12)
    # The naive product of exponentials (the authors' form) is 0/0 here.
    naive = torch.exp(elbo.log_joint_clusters(z, g["log_pi"], g["means"], g["logvars"]))
    assert torch.isnan(naive / naive.sum(-1, keepdim=True)).any()


def test_moe_variance_matches_sampling():
    """Eqs 13-14 with ERRATA 4's sign against samples of the mixture."""
    w = torch.tensor([0.2, 0.5, 0.3])
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 1.0]])
    noise = torch.tensor([0.1, 0.4, 0.2])
    mean, var = elbo.moe_mean_var(w, means, noise)
    gen = torch.Generator().manual_seed(9)
    c = torch.multinomial(w, N_MC, replacement=True, generator=gen)
    x = means[c] + torch.randn(N_MC, 2, generator=gen) * noise[c].sqrt().unsqueeze(1)
    np.testing.assert_allclose(mean.numpy(), x.mean(0).numpy(), atol=0.01)
    np.testing.assert_allclose(var.numpy(), x.var(0).numpy(), rtol=0.02)
