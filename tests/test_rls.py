"""Recursive least squares in information form (pima_hpc/model/rls.py) against the exact batch solve,
the covariance (gain) form of RLS, stacked weighted least squares, and a drifting law."""

import numpy as np
import pytest
from scipy.optimize import nnls

from pima_hpc.model.experts import build_expert
from pima_hpc.model.rls import ExpertRLS, batch_information
from pima_hpc.model.statistics import curve_statistics, expert_noise_variance, profiled_noise_variance

T = np.linspace(0.01, 0.2, 24)
C = 3


def _curves(expert_name, amplitude, rng, n=300):
    """Curves from three clusters of the law, with noise, and soft responsibilities."""
    if expert_name == "strain_hardening":
        truth = np.array([[900.0, 0.05, 80.0], [500.0, 0.11, 10.0], [1500.0, 0.033, 200.0]])
        curves = build_expert(expert_name, T).evaluate(truth)
    else:
        curves = np.stack([np.sin(8 * T) * (1 + c) + c * T for c in range(C)])
    labels = rng.integers(0, C, n)
    amp = rng.uniform(0.5, 2.0, n)[:, None] if amplitude == "free" else 1.0
    x = amp * curves[labels] + rng.normal(0, 0.02 * np.abs(curves).mean(), (n, len(T)))
    gamma = np.full((n, C), 0.05)
    gamma[np.arange(n), labels] = 0.9
    return gamma, x


EXPERTS = [("affine", {}), ("polynomial", {"degree": 3}), ("bspline", {"knots": 4}), ("free", {}),
           ("strain_hardening", {})]


@pytest.mark.parametrize("amplitude", ["fixed", "free"])
@pytest.mark.parametrize("name,options", EXPERTS)
def test_rls_without_forgetting_equals_the_batch_solve(name, options, amplitude):
    rng = np.random.default_rng(0)
    gamma, x = _curves(name, amplitude, rng)
    expert = build_expert(name, T, amplitude, options)
    rls = ExpertRLS(expert, C)
    for lo in range(0, len(x), 64):  # five steps, one sync at the end (an epoch)
        rls.add(gamma[lo:lo + 64], x[lo:lo + 64])
    rls.sums.absorb(rls.sums.pending_arrays())
    st = curve_statistics(gamma, x, second_moment=True)
    prev = np.zeros((C, expert.n_params))
    exact = expert.solve(st["s0"], st["s1"], prev, ridge=1e-6, m2=st["m2"] if amplitude == "free" else None)
    theta = rls.solve(prev, ridge=1e-6)
    np.testing.assert_allclose(theta, exact, rtol=1e-10, atol=1e-10 * np.abs(exact).max())
    # the noise estimate equals the one from the statistics (same units here)
    curves = expert.evaluate(theta)
    if amplitude == "fixed":
        ref = expert_noise_variance(st["s0"], st["s1"], st["s2"], curves, np.ones(C), 0.0)
    else:
        ref = profiled_noise_variance(st["s0"], st["m2"], curves, np.ones(C), 0.0)
    np.testing.assert_allclose(rls.noise_variance(theta, np.ones(C), 0.0), ref, rtol=1e-8)


def _stacked_wls(gamma_c, designs, xs):
    """Weighted least squares on the stacked sqrt(gamma)-weighted rows of every curve's own points."""
    rows = np.concatenate([np.sqrt(g) * d for g, d in zip(gamma_c, designs)])
    rhs = np.concatenate([np.sqrt(g) * x for g, x in zip(gamma_c, xs)])
    return rows, rhs


def _ragged(rng, n=120):
    """Curves with their own grids and lengths, padded to 24 points with a mask (and junk padding)."""
    t = np.zeros((n, len(T)))
    mask = np.zeros((n, len(T)))
    for i in range(n):
        m = rng.integers(10, len(T) + 1)
        t[i, :m] = np.sort(rng.uniform(0.01, 0.2, m))
        mask[i, :m] = 1
    return t, mask


@pytest.mark.parametrize("name,options", [("affine", {}), ("polynomial", {"degree": 2}), ("bspline", {"knots": 3})])
def test_per_sample_grids_equal_stacked_weighted_least_squares(name, options):
    rng = np.random.default_rng(1)
    expert = build_expert(name, T, "fixed", options)
    t, mask = _ragged(rng)
    truth = rng.normal(0, 1, (C, expert.n_params))
    labels = rng.integers(0, C, len(t))
    x = np.stack([expert.candidate_designs(np.where(m > 0, row, T[0]))[0] @ truth[c]
                  for row, m, c in zip(t, mask, labels)])
    x += rng.normal(0, 0.05, x.shape)
    x[mask == 0] = 1e6  # padding must not matter
    gamma = rng.dirichlet(np.ones(C), len(t))
    rls = ExpertRLS(expert, C, shared_grid=False)
    rls.add(gamma[:70], x[:70], t[:70], mask[:70])
    rls.add(gamma[70:], x[70:], t[70:], mask[70:])
    rls.sums.absorb(rls.sums.pending_arrays())
    theta = rls.solve(np.zeros((C, expert.n_params)))
    for c in range(C):
        keep = [mask[i] > 0 for i in range(len(t))]
        designs = [expert.candidate_designs(t[i][keep[i]])[0] for i in range(len(t))]
        rows, rhs = _stacked_wls(gamma[:, c], designs, [x[i][keep[i]] for i in range(len(t))])
        ref, *_ = np.linalg.lstsq(rows, rhs, rcond=None)
        np.testing.assert_allclose(theta[c], ref, rtol=1e-9, atol=1e-9)
        sse = ((rows @ theta[c] - rhs) ** 2).sum()
        np.testing.assert_allclose(rls.residual_sum(theta)[c], sse, rtol=1e-8)
        # and the covariance is sigma^2 (X^T W X)^-1 of the stacked problem
        var = rls.noise_variance(theta, np.ones(C), 0.0)
        np.testing.assert_allclose(rls.covariance(theta, var)[c], var[c] * np.linalg.inv(rows.T @ rows), rtol=1e-8)


def test_strain_hardening_on_per_sample_grids_is_the_best_yield_point_of_the_reference_grid():
    rng = np.random.default_rng(2)
    expert = build_expert("strain_hardening", T)
    t, mask = _ragged(rng, 80)
    truth = np.array([[900.0, T[7], 80.0], [500.0, T[14], 10.0], [1500.0, T[4], 200.0]])
    labels = rng.integers(0, C, len(t))
    law = lambda tt, th: th[0] * np.minimum(tt, th[1]) + th[2] * np.maximum(tt - th[1], 0.0)
    x = np.stack([law(row, truth[c]) for row, c in zip(t, labels)]) + rng.normal(0, 1.0, t.shape)
    gamma = rng.dirichlet(np.ones(C) * 0.3, len(t))
    rls = ExpertRLS(expert, C, shared_grid=False)
    rls.add(gamma, x, t, mask)
    rls.sums.absorb(rls.sums.pending_arrays())
    theta = rls.solve(np.zeros((C, 3)))
    for c in range(C):
        best = (np.inf, None)
        for eps in T[1:-1]:  # brute force: non-negative (E, H) least squares at every reference yield point
            keep = mask > 0
            rows = np.concatenate([np.sqrt(gamma[i, c]) * np.stack([np.minimum(t[i][keep[i]], eps),
                                                                    np.maximum(t[i][keep[i]] - eps, 0)], 1)
                                   for i in range(len(t))])
            rhs = np.concatenate([np.sqrt(gamma[i, c]) * x[i][keep[i]] for i in range(len(t))])
            coef, res = nnls(rows, rhs)
            if res ** 2 < best[0]:
                best = (res ** 2, (coef[0], eps, coef[1]))
        np.testing.assert_allclose(theta[c], best[1], rtol=1e-8)
        np.testing.assert_allclose(rls.residual_sum(theta)[c], best[0], rtol=1e-8)


def test_information_form_equals_the_gain_form_of_rls_with_forgetting():
    """Classic block RLS: P_s = (lambda P_{s-1}^-1 + Phi^T W Phi)^-1, theta_s = theta_{s-1} + P_s Phi^T W (y - Phi theta)."""
    rng = np.random.default_rng(3)
    expert = build_expert("polynomial", T, "fixed", {"degree": 2})
    phi = expert.design(T)
    lam = 0.8
    rls = ExpertRLS(expert, C, forgetting=lam)
    theta_gain, p_gain = None, None
    for s in range(12):
        gamma = rng.dirichlet(np.ones(C), 40)
        x = rng.normal(0, 1, (C, 3))[rng.integers(0, C, 40)] @ phi.T + rng.normal(0, 0.1, (40, len(T)))
        rls.add(gamma, x)
        rls.sums.absorb(rls.sums.pending_arrays())  # a sync every step
        theta = rls.solve(np.zeros((C, 3)))
        if s == 0:  # start the gain form from the first step's exact solution
            theta_gain = theta.copy()
            p_gain = np.linalg.inv(rls.sums["q"][:, 0])
            continue
        for c in range(C):
            a = gamma[:, c].sum() * phi.T @ phi
            p_gain[c] = np.linalg.inv(lam * np.linalg.inv(p_gain[c]) + a)
            resid = gamma[:, c] @ (x - theta_gain[c] @ phi.T)
            theta_gain[c] = theta_gain[c] + p_gain[c] @ phi.T @ resid
        np.testing.assert_allclose(theta, theta_gain, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.linalg.inv(rls.sums["q"][:, 0]), p_gain, rtol=1e-8, atol=1e-12)


def test_forgetting_tracks_a_drifting_expert():
    rng = np.random.default_rng(4)
    expert = build_expert("affine", T)
    errors = {}
    for lam in (1.0, 0.7):
        rls = ExpertRLS(expert, 1, forgetting=lam)
        err = []
        for s in range(60):
            slope = 1.0 + 0.05 * s  # the law drifts step by step
            x = slope * T + rng.normal(0, 0.01, (32, len(T)))
            rls.add(np.ones((32, 1)), x)
            rls.sums.absorb(rls.sums.pending_arrays())
            err.append(abs(rls.solve(np.zeros((1, 1)))[0, 0] - slope))
        errors[lam] = np.mean(err[30:])
    # without forgetting the estimate is the running mean, ~half the drift behind; lambda = 0.7 keeps up
    assert errors[1.0] > 0.5
    assert errors[0.7] < 0.2 * errors[1.0]


def test_workers_syncing_every_k_steps_equal_one_process():
    """Two workers each see half of every global batch and sum their pending information every 3
    steps (any order of summation): the totals equal one process over the global batches."""
    rng = np.random.default_rng(5)
    expert = build_expert("strain_hardening", T, "free")
    single = ExpertRLS(expert, C, forgetting=0.9)
    workers = [ExpertRLS(expert, C, forgetting=0.9) for _ in range(2)]
    for s in range(10):
        gamma, x = _curves("strain_hardening", "free", rng, n=64)
        single.add(gamma, x)
        for w, half in zip(workers, (slice(0, 29), slice(29, 64))):  # uneven shares
            w.add(gamma[half], x[half])
        if (s + 1) % 3 == 0 or s == 9:
            summed = [a + b for a, b in zip(*(w.sums.pending_arrays() for w in workers))]
            for w in workers:
                w.sums.absorb(summed)
    single.sums.absorb(single.sums.pending_arrays())
    for w in workers:
        for k, v in single.sums.total.items():
            np.testing.assert_allclose(w.sums.total[k], v, rtol=1e-12, atol=1e-12 * np.abs(v).max())
        np.testing.assert_allclose(w.solve(np.zeros((C, 3))), single.solve(np.zeros((C, 3))), rtol=1e-9)


def test_free_amplitude_needs_the_shared_grid_and_experts_need_an_information_form():
    expert = build_expert("affine", T, "free")
    with pytest.raises(ValueError, match="free-amplitude expert needs every curve on the expert's grid"):
        batch_information(expert, np.ones((2, 1)), np.ones((2, len(T))), np.ones((2, len(T))))

    from pima_hpc.model.experts import Expert

    class Opaque(Expert):
        param_names = ("a",)

    with pytest.raises(ValueError, match="has no information form"):
        ExpertRLS(Opaque(T), 2)
