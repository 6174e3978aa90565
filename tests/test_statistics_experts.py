"""EM updates against direct weighted means; expert solves against scipy on the weighted data."""

import numpy as np
import pytest
from scipy.linalg import lstsq
from scipy.optimize import least_squares

from pima_hpc.model.experts import EXPERTS, LinearExpert, build_expert, register_expert
from pima_hpc.model.statistics import (StreamingStatistics, curve_statistics, expert_noise_variance,
                                       latent_statistics, m_step_means, m_step_variances, m_step_weights)


def _data(seed=0, n=300, c=4, l=3):
    rng = np.random.default_rng(seed)
    gamma = rng.dirichlet(np.ones(c), size=n)
    mu = rng.normal(size=(n, l)) * 2
    var = rng.uniform(0.1, 1.0, size=(n, l))
    return gamma, mu, var


def test_streamed_em_equals_direct_weighted_moments():
    gamma, mu, var = _data()
    st = StreamingStatistics({"n0": (4,), "n1": (4, 3), "n2": (4, 3), "count": ()})
    for a in range(0, 300, 37):  # uneven batches, as the last batch of an epoch is
        st.add(**latent_statistics(gamma[a:a + 37], mu[a:a + 37], var[a:a + 37]))
    means = m_step_means(st["n0"], st["n1"], np.zeros((4, 3)))
    for c in range(4):
        w = gamma[:, c]
        direct = (w[:, None] * mu).sum(0) / w.sum()
        np.testing.assert_allclose(means[c], direct, rtol=1e-12)
        direct_var = (w[:, None] * (var + (mu - direct) ** 2)).sum(0) / w.sum()
        np.testing.assert_allclose(m_step_variances(st["n0"], st["n1"], st["n2"], np.ones((4, 3)))[c],
                                   direct_var, rtol=1e-10)
    np.testing.assert_allclose(m_step_weights(st["n0"]), gamma.mean(0), rtol=1e-12)


def test_empty_cluster_keeps_previous_parameters():
    gamma, mu, var = _data()
    gamma[:, 2] = 0.0
    st = latent_statistics(gamma, mu, var)
    prev = np.full((4, 3), 7.0)
    assert np.all(m_step_means(st["n0"], st["n1"], prev)[2] == 7.0)
    assert np.all(m_step_variances(st["n0"], st["n1"], st["n2"], prev)[2] == 7.0)
    assert m_step_weights(st["n0"]).min() > 0


def test_forgetting_factor_decays_old_statistics():
    st = StreamingStatistics({"s": (2,)})
    st.add(s=np.array([1.0, 2.0]))
    st.decay(0.5)
    st.add(s=np.array([1.0, 1.0]))
    np.testing.assert_allclose(st["s"], [1.5, 2.0])


def _weighted_stacked(gamma_c, phi, x):
    """Rows sqrt(gamma_d) * (Phi, x_d) stacked over samples: the weighted problem of eq 17."""
    w = np.sqrt(gamma_c)
    return np.concatenate([wi * phi for wi in w]), np.concatenate([wi * xi for wi, xi in zip(w, x)])


def test_affine_expert_solve_equals_scipy_weighted_lstsq():
    rng = np.random.default_rng(1)
    t = np.linspace(0, 1, 20)
    x = rng.integers(0, 10, 200)[:, None] * t + 0.3 * rng.normal(size=(200, 20))
    gamma = rng.dirichlet(np.ones(3), size=200)
    expert = build_expert("affine", t)
    st = curve_statistics(gamma, x)
    theta = expert.solve(st["s0"], st["s1"], np.zeros((3, 1)))
    for c in range(3):
        a, b = _weighted_stacked(gamma[:, c], t[:, None], x)
        np.testing.assert_allclose(theta[c], lstsq(a, b)[0], rtol=1e-10)


def test_strain_hardening_solve_equals_scipy_least_squares():
    rng = np.random.default_rng(2)
    t = np.linspace(0, 0.3, 100)
    expert = build_expert("strain_hardening", t)
    truth = np.array([[2000.0, 0.02, 150.0], [800.0, 0.05, 40.0]])
    labels = rng.integers(0, 2, 120)
    x = expert.evaluate(truth[labels]) + 2.0 * rng.normal(size=(120, 100))
    gamma = np.eye(2)[labels] * 0.9 + 0.05
    st = curve_statistics(gamma, x)
    theta = expert.solve(st["s0"], st["s1"], np.zeros((2, 3)))
    for c in range(2):
        w = np.sqrt(gamma[:, c])

        def resid(p):
            return (w[:, None] * (x - expert.evaluate(p[None])[0])).ravel()

        ref = least_squares(resid, theta[c] * 1.02, x_scale=np.abs(theta[c]), xtol=1e-14, ftol=1e-14).x
        np.testing.assert_allclose(theta[c], ref, rtol=1e-5)
        assert 0 < theta[c, 1] < t[-1] and theta[c, 0] > 0 and theta[c, 2] >= 0


def test_strain_hardening_recovers_parameters_and_keeps_them_physical():
    t = np.linspace(0, 0.2, 100)
    expert = build_expert("strain_hardening", t)
    truth = np.array([[1500.0, 0.03, 100.0]])
    fit = expert.fit_samples(expert.evaluate(truth))
    np.testing.assert_allclose(fit[0], truth[0], rtol=0.03)
    # A softening curve cannot produce a negative hardening modulus.
    soft = expert.evaluate(np.array([[1500.0, 0.03, 0.0]])) - np.maximum(t - 0.03, 0) * 200
    theta = expert.solve(np.ones(1), soft, np.zeros((1, 3)))
    assert theta[0, 2] == 0.0 and theta[0, 0] > 0


def test_expert_noise_from_statistics_equals_direct_residuals():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8))
    gamma = rng.dirichlet(np.ones(2), size=50)
    curves = rng.normal(size=(2, 8))
    st = curve_statistics(gamma, x)
    var = expert_noise_variance(st["s0"], st["s1"], st["s2"], curves, np.ones(2), 1e-12)
    for c in range(2):
        direct = (gamma[:, c] * ((x - curves[c]) ** 2).sum(1)).sum() / (gamma[:, c].sum() * 8)
        assert var[c] == pytest.approx(direct, rel=1e-12)


def test_registering_a_new_expert_is_one_small_class():
    @register_expert("test_quadratic")
    class Quadratic(LinearExpert):
        param_names = ("a", "b")

        def design(self, t):
            return np.stack([t, t ** 2], axis=-1)

    try:
        t = np.linspace(0, 1, 10)
        e = build_expert("test_quadratic", t)
        theta = e.fit_samples(e.evaluate(np.array([[2.0, -1.0]])))
        np.testing.assert_allclose(theta, [[2.0, -1.0]], atol=1e-10)
        with pytest.raises(ValueError, match="already registered"):
            register_expert("test_quadratic")(Quadratic)
    finally:
        EXPERTS.pop("test_quadratic")
    with pytest.raises(ValueError, match="unknown expert 'nope'"):
        build_expert("nope", t)
