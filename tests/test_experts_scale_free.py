"""Scale-free (free-amplitude) experts and the exact strain-hardening solve.

Each solve is checked against an independent computation: the free-amplitude fit against the
profiled least squares evaluated directly on the samples and a dense global search; the exact
yield search against a dense grid of yield strains with scipy's NNLS at each one.
"""

import numpy as np
import pytest
import torch
from scipy.linalg import eigh
from scipy.optimize import nnls

from pima_hpc.model import elbo
from pima_hpc.model.experts import EXPERTS, LinearExpert, build_expert, register_expert
from pima_hpc.model.statistics import curve_statistics, profiled_noise_variance

T = np.linspace(0.0, 0.05, 60)
TRUTH = np.array([[3000.0, 0.006, 150.0], [4000.0, 0.0035, 80.0]])


def _lattice_like(seed, n=160, noise=3.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    amp = rng.uniform(0.3, 1.5, n)  # a density-like scale spread within each class
    x = amp[:, None] * build_expert("strain_hardening", T).evaluate(TRUTH[labels]) + noise * rng.normal(size=(n, len(T)))
    return rng, labels, x


def _gammas(rng, labels):
    return {"pure": np.eye(2)[labels], "mixed": rng.dirichlet(np.ones(2), len(labels))}


def _profiled_sse(gamma_c, x, curve):
    """sum_d gamma_d min_a ||x_d - a m||^2, evaluated sample by sample."""
    a = x @ curve / (curve @ curve)
    return float((gamma_c * ((x - a[:, None] * curve) ** 2).sum(1)).sum())


def _sse(gamma_c, x, curve):
    return float((gamma_c * ((x - curve) ** 2).sum(1)).sum())


def _dense_fixed(gamma_c, x, expert, n_eps=6001):
    """Global minimum over a dense yield-strain grid, NNLS in (E, H) at each (scipy)."""
    w = np.sqrt(gamma_c)
    best = (np.inf, None)
    for eps in np.linspace(expert.eps_bounds[0], expert.eps_bounds[1], n_eps):
        p = np.stack([np.minimum(T, eps), np.maximum(T - eps, 0.0)], 1)
        a = (w[:, None, None] * p[None]).reshape(-1, 2)
        beta, _ = nnls(a, (w[:, None] * x).ravel())
        theta = np.array([beta[0], eps, beta[1]])
        f = _sse(gamma_c, x, expert.evaluate(theta))
        if f < best[0]:
            best = (f, theta)
    return best


def _dense_free(m2, expert, n_eps=6001):
    """max over a dense yield-strain grid of the (E, H >= 0) Rayleigh quotient (scipy eigh, then rays)."""
    best = -np.inf
    for eps in np.linspace(expert.eps_bounds[0], expert.eps_bounds[1], n_eps):
        p = np.stack([np.minimum(T, eps), np.maximum(T - eps, 0.0)], 1)
        a, b = p.T @ m2 @ p, p.T @ p
        w, v = eigh(a, b)
        v = v[:, -1] * np.sign(v[0, -1])
        cands = [a[0, 0] / b[0, 0], a[1, 1] / b[1, 1]] + ([w[-1]] if v[1] >= 0 else [])
        best = max(best, max(cands))
    return best


@pytest.mark.parametrize("kind", ["pure", "mixed"])
def test_exact_yield_search_equals_dense_global_search(kind):
    rng, labels, x = _lattice_like(0)
    gamma = _gammas(rng, labels)[kind]
    expert = build_expert("strain_hardening", T)
    st = curve_statistics(gamma, x)
    theta = expert.solve(st["s0"], st["s1"], np.zeros((2, 3)))
    for c in range(2):
        ours = _sse(gamma[:, c], x, expert.evaluate(theta[c]))
        dense, ref = _dense_fixed(gamma[:, c], x, expert)
        # never worse than any point of the dense search, and equal to it up to its grid step
        assert ours <= dense * (1 + 1e-12)
        assert ours == pytest.approx(dense, rel=1e-6)
        np.testing.assert_allclose(theta[c], ref, rtol=2e-3)


def test_strain_hardening_honours_ridge():
    rng, labels, x = _lattice_like(1)
    gamma = np.eye(2)[labels]
    expert = build_expert("strain_hardening", T)
    st = curve_statistics(gamma, x)
    plain = expert.solve(st["s0"], st["s1"], np.zeros((2, 3)), ridge=0.0)
    ridge = 1e-3 * st["s0"].max() * (T ** 2).sum()
    shrunk = expert.solve(st["s0"], st["s1"], np.zeros((2, 3)), ridge=ridge)
    assert np.all(np.hypot(shrunk[:, 0], shrunk[:, 2]) < np.hypot(plain[:, 0], plain[:, 2]))
    # the ridge objective S0 ||xbar - E||^2 + ridge (E^2 + H^2) is minimised: no nearby point is better
    for c in range(2):
        def f(th):
            return _sse(gamma[:, c], x, expert.evaluate(th)) + ridge * (th[0] ** 2 + th[2] ** 2)
        for d in np.eye(3) * np.array([1e-3 * shrunk[c, 0], 1e-4 * shrunk[c, 1], 1e-3 * max(shrunk[c, 2], 1.0)]):
            assert f(shrunk[c]) <= min(f(shrunk[c] + d), f(shrunk[c] - d)) * (1 + 1e-12)


@pytest.mark.parametrize("kind", ["pure", "mixed"])
def test_free_amplitude_strain_hardening_is_the_profiled_least_squares(kind):
    rng, labels, x = _lattice_like(2)
    gamma = _gammas(rng, labels)[kind]
    expert = build_expert("strain_hardening", T, amplitude="free")
    st = curve_statistics(gamma, x, second_moment=True)
    theta = expert.solve(st["s0"], st["s1"], np.zeros((2, 3)), m2=st["m2"])
    for c in range(2):
        curve = expert.evaluate(theta[c])
        ours = _profiled_sse(gamma[:, c], x, curve)
        # tr(M2) - max Rayleigh quotient is the profiled residual sum, sample by sample
        dense = np.trace(st["m2"][c]) - _dense_free(st["m2"][c], expert)
        assert ours <= dense * (1 + 1e-12)
        assert ours == pytest.approx(dense, rel=1e-6)
        # scale convention: the gamma-weighted mean profiled amplitude is 1
        a = x @ curve / (curve @ curve)
        assert (gamma[:, c] * a).sum() / gamma[:, c].sum() == pytest.approx(1.0, rel=1e-10)
        assert theta[c, 0] > 0 and theta[c, 2] >= 0
    if kind == "pure":  # the shape is the generator's, whatever each sample's amplitude
        order = np.argsort(theta[:, 1])[::-1]
        np.testing.assert_allclose(theta[order, 1], TRUTH[:, 1], rtol=0.03)
        np.testing.assert_allclose(theta[order, 2] / theta[order, 0], TRUTH[:, 2] / TRUTH[:, 0], rtol=0.1)


def test_free_amplitude_linear_expert_equals_scipy_generalised_eigenproblem():
    @register_expert("test_poly2")
    class Poly2(LinearExpert):
        param_names = ("a", "b")

        def design(self, t):
            return np.stack([t, t ** 2], axis=-1)

    try:
        rng = np.random.default_rng(3)
        t = np.linspace(0, 1, 30)
        shapes = np.array([[1.0, 2.0], [3.0, -1.0]])
        labels = rng.integers(0, 2, 200)
        x = rng.uniform(0.5, 2.0, 200)[:, None] * (shapes[labels] @ np.stack([t, t ** 2])) + 0.05 * rng.normal(size=(200, 30))
        gamma = rng.dirichlet(np.ones(2) * 0.3, 200)
        expert = build_expert("test_poly2", t, amplitude="free")
        st = curve_statistics(gamma, x, second_moment=True)
        theta = expert.solve(st["s0"], st["s1"], np.zeros((2, 2)), m2=st["m2"])
        phi = expert.design(t)
        for c in range(2):
            m2 = (gamma[:, c, None, None] * x[:, :, None] * x[:, None, :]).sum(0)
            w, v = eigh(phi.T @ m2 @ phi, phi.T @ phi)
            ref = v[:, -1]
            cos = abs(theta[c] @ (phi.T @ phi) @ ref) / np.sqrt((theta[c] @ phi.T @ phi @ theta[c]) * (ref @ phi.T @ phi @ ref))
            assert cos == pytest.approx(1.0, abs=1e-12)
            curve = phi @ theta[c]
            assert _profiled_sse(gamma[:, c], x, curve) == pytest.approx(np.trace(m2) - w[-1], rel=1e-9)
    finally:
        EXPERTS.pop("test_poly2")


def test_profiled_noise_and_likelihood_match_direct_residuals():
    rng, labels, x = _lattice_like(4, n=50)
    gamma = rng.dirichlet(np.ones(2), 50)
    shapes = build_expert("strain_hardening", T).evaluate(TRUTH)
    st = curve_statistics(gamma, x, second_moment=True)
    var = profiled_noise_variance(st["s0"], st["m2"], shapes, np.ones(2), 1e-12)
    for c in range(2):
        direct = _profiled_sse(gamma[:, c], x, shapes[c]) / (gamma[:, c].sum() * len(T))
        assert var[c] == pytest.approx(direct, rel=1e-10)
    ll = elbo.profiled_expert_log_likelihood(torch.as_tensor(x), torch.as_tensor(shapes),
                                             torch.as_tensor(np.log(var))).numpy()
    for c in range(2):
        a = np.maximum(x @ shapes[c], 0) / (shapes[c] @ shapes[c])
        ref = -0.5 * (len(T) * np.log(2 * np.pi * var[c]) + ((x - a[:, None] * shapes[c]) ** 2).sum(1) / var[c])
        np.testing.assert_allclose(ll[:, c], ref, rtol=1e-10)


def test_moe_with_amplitude_reduces_to_eqs_13_14_and_matches_monte_carlo():
    rng = np.random.default_rng(5)
    w = torch.as_tensor(rng.dirichlet(np.ones(3), 4))
    curves = torch.as_tensor(rng.normal(size=(3, 7)))
    noise = torch.as_tensor(rng.uniform(0.1, 0.5, 3))
    ones = torch.ones(4, 3)
    plain = elbo.moe_mean_var(w, curves, noise)
    same = elbo.moe_mean_var(w, curves, noise, (ones, ones))
    for a, b in zip(plain, same):
        torch.testing.assert_close(a, b)
    mean, logvar = torch.as_tensor(rng.normal(0, 0.3, (4, 3))), torch.as_tensor(rng.normal(-2, 0.5, (4, 3)))
    m, v = elbo.moe_mean_var(w, curves, noise, elbo.lognormal_moments(mean, logvar))
    n = 400_000
    gen = np.random.default_rng(6)
    for i in range(2):
        c = gen.choice(3, n, p=w[i].numpy())
        a = np.exp(mean[i].numpy()[c] + np.exp(0.5 * logvar[i].numpy()[c]) * gen.normal(size=n))
        xs = a[:, None] * curves.numpy()[c] + np.sqrt(noise.numpy()[c])[:, None] * gen.normal(size=(n, 7))
        np.testing.assert_allclose(m[i].numpy(), xs.mean(0), atol=4e-3)
        np.testing.assert_allclose(v[i].numpy(), xs.var(0), rtol=2e-2, atol=2e-3)


def test_a_free_amplitude_needs_a_shape():
    from pima_hpc.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="expert_amplitude.*one parameter"):
        load_config(None, ["model.expert=affine", "model.expert_amplitude=free"])
    with pytest.raises(ValueError, match="needs the second-moment statistic"):
        build_expert("strain_hardening", T, "free").solve(np.ones(1), np.ones((1, len(T))), np.zeros((1, 3)))


def test_amplitude_regression_from_streamed_sums_equals_lstsq():
    from scipy.linalg import lstsq

    from pima_hpc.model.statistics import StreamingStatistics, regression_statistics, solve_regression
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(size=(300, 4)), np.ones((300, 1))], 1)
    y = x @ rng.normal(size=(5, 3)) + 0.2 * rng.normal(size=(300, 3))
    st = StreamingStatistics({"xtx": (5, 5), "xty": (5, 3), "yty": (3,), "n": ()})
    for a in range(0, 300, 41):
        st.add(**regression_statistics(x[a:a + 41], y[a:a + 41]))
    coef, var = solve_regression(st["xtx"], st["xty"], st["yty"], float(st["n"]), ridge=0.0)
    ref = lstsq(x, y)[0]
    np.testing.assert_allclose(coef, ref, rtol=1e-10)
    np.testing.assert_allclose(var, ((y - x @ ref) ** 2).mean(0), rtol=1e-9)
