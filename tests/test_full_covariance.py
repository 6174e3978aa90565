"""model.cluster_covariance=full: one full covariance per cluster in the mixture prior (eq 10), its closed-form
ELBO term against Monte Carlo and scipy, its M-step against the weighted moments, and training with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from pima_hpc.config import load_config
from pima_hpc.errors import ConfigError
from pima_hpc.model import elbo
from pima_hpc.model.statistics import latent_statistics, m_step_full_covariances, m_step_means

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prior():
    g = torch.Generator().manual_seed(3)
    b, c, l = 4, 3, 5
    mu, logvar = torch.randn(b, l, generator=g, dtype=torch.float64), 0.3 * torch.randn(b, l, generator=g, dtype=torch.float64)
    means = torch.randn(c, l, generator=g, dtype=torch.float64)
    a = torch.randn(c, l, l, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(l, dtype=torch.float64)
    return mu, logvar, means, cov


def test_full_log_density_is_scipys(prior):
    mu, _, means, cov = prior
    got = elbo.log_normal_full(mu, means, torch.linalg.cholesky(cov)).numpy()
    want = np.stack([multivariate_normal(means[k].numpy(), cov[k].numpy()).logpdf(mu.numpy()) for k in range(len(means))], 1)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_expected_log_prior_full_matches_monte_carlo(prior):
    mu, logvar, means, cov = prior
    got = elbo.expected_log_prior_z_full(mu, logvar, means, torch.linalg.cholesky(cov))
    g = torch.Generator().manual_seed(0)
    z = mu[:, None] + torch.randn(len(mu), 400_000, mu.shape[1], generator=g, dtype=torch.float64) * torch.exp(0.5 * logvar)[:, None]
    mc = torch.stack([torch.distributions.MultivariateNormal(means[k], cov[k]).log_prob(z) for k in range(len(means))], -1)
    se = mc.std(1) / np.sqrt(z.shape[1])
    assert torch.all((got - mc.mean(1)).abs() < 5 * se + 1e-9)


def test_full_covariance_with_a_diagonal_is_the_diagonal_term(prior):
    mu, logvar, means, _ = prior
    var = torch.rand(means.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.2
    full = elbo.expected_log_prior_z_full(mu, logvar, means, torch.diag_embed(var.sqrt()))
    torch.testing.assert_close(full, elbo.expected_log_prior_z(mu, logvar, means, var.log()), rtol=1e-12, atol=1e-12)


def test_m_step_is_the_weighted_covariance_plus_the_posterior_variance():
    rng = np.random.default_rng(0)
    n, c, l = 500, 3, 4
    gamma = rng.dirichlet(np.ones(c), size=n)
    mu, var = rng.normal(size=(n, l)) @ rng.normal(size=(l, l)), rng.uniform(0.01, 0.2, size=(n, l))
    halves = [latent_statistics(gamma[s], mu[s], var[s], full=True) for s in (slice(0, 200), slice(200, None))]
    stats = {k: halves[0][k] + halves[1][k] for k in halves[0]}   # statistics add across batches
    means = m_step_means(stats["n0"], stats["n1"], np.zeros((c, l)))
    cov = m_step_full_covariances(stats["n0"], stats["n1"], stats["n2_full"], np.zeros((c, l, l)), min_var=0.0)
    for k in range(c):
        w = gamma[:, k]
        want = np.cov(mu.T, aweights=w, bias=True) + np.diag(w @ var / w.sum())
        np.testing.assert_allclose(means[k], w @ mu / w.sum(), rtol=1e-12)
        np.testing.assert_allclose(cov[k], want, rtol=1e-10, atol=1e-12)


def test_full_covariance_needs_em_variances():
    with pytest.raises(ConfigError, match="cluster_covariance"):
        load_config(REPO / "configs" / "digits.yaml", ["model.cluster_covariance=full", "train.tied_variances=true"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(REPO / "configs" / "digits.yaml", ["model.cluster_covariance=banded"])


def test_training_with_full_covariances(tmp_path):
    """Digits from the pre-trained mixture with full covariances: the prior's covariances are full (EM sets
    the off-diagonals), the log-variances mirror their diagonal, and the latent clustering finds the digits."""
    from pima_hpc.train.trainer import Trainer
    cfg = load_config(REPO / "configs" / "digits.yaml", [
        "model.cluster_covariance=full", "train.init=pretrain", "train.pretrain_epochs=3", "train.epochs=4",
        f"run_dir={tmp_path / 'run'}", "stages=[multimodal]", "figures=false", "train.progress=false"])
    trainer = Trainer(cfg)
    try:
        metrics = trainer.run()
        model = trainer.model
        cov = model.covariances()
        off = cov[:, ~np.eye(cov.shape[1], dtype=bool)]
        assert np.abs(off).max() > 1e-3 * np.abs(np.diagonal(cov, axis1=1, axis2=2)).max()
        np.testing.assert_allclose(model.cluster_logvars.detach().double().exp().numpy(),
                                   np.diagonal(cov, axis1=1, axis2=2), rtol=1e-5)
        assert metrics["multimodal"]["test"]["accuracy"] >= 0.9
        saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert saved["multimodal"]["test"]["accuracy"] == metrics["multimodal"]["test"]["accuracy"]
    finally:
        trainer.close()
