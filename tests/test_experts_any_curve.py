"""Experts for any curve: `free` (each cluster's mean curve), `polynomial`, `bspline` and user experts by
import path, solved from the same sufficient statistics as every linear expert (one collective)."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from scipy.interpolate import make_lsq_spline

from pima_hpc.config import load_config
from pima_hpc.errors import ConfigError
from pima_hpc.model.experts import build_expert

T = np.linspace(0.0, 2.0, 40)


def _stats(rng, n=300, c=3):
    x = np.sin(3 * T)[None] * rng.uniform(0.5, 2, (n, 1)) + T[None] ** 2 * rng.integers(0, 3, (n, 1)) \
        + 0.1 * rng.standard_normal((n, len(T)))
    gamma = rng.dirichlet(np.ones(c), n)
    return x, gamma, gamma.sum(0), gamma.T @ x, np.einsum("nc,ni,nj->cij", gamma, x, x)


def test_free_expert_is_the_weighted_mean_curve_and_its_principal_shape():
    x, gamma, s0, s1, m2 = _stats(np.random.default_rng(0))
    expert = build_expert("free", T)
    theta = expert.solve(s0, s1, np.zeros((3, len(T))))
    np.testing.assert_allclose(expert.evaluate(theta), s1 / s0[:, None], rtol=1e-10, atol=1e-12)
    free = build_expert("free", T, "free")
    shape = free.evaluate(free.solve(s0, s1, np.zeros((3, len(T))), m2=m2))
    for c in range(3):  # the top eigenvector of M2_c, scaled to unit mean amplitude
        w, v = np.linalg.eigh(m2[c])
        cos = abs(shape[c] @ v[:, -1]) / np.linalg.norm(shape[c])
        assert cos == pytest.approx(1.0, abs=1e-10)
        amps = x @ shape[c] / (shape[c] @ shape[c])
        assert (gamma[:, c] * amps).sum() == pytest.approx(s0[c], rel=1e-10)


def test_bspline_expert_equals_scipy_lsq_spline():
    x, gamma, s0, s1, _ = _stats(np.random.default_rng(1))
    expert = build_expert("bspline", T, options={"knots": 5})
    theta = expert.solve(s0, s1, np.zeros((3, expert.n_params)))
    for c in range(3):
        ref = make_lsq_spline(T, s1[c] / s0[c], expert.knot_vector, k=3)
        np.testing.assert_allclose(theta[c], ref.c, rtol=1e-8, atol=1e-10)
        # and to scipy's weighted spline least squares over every (sample, point) of the raw curves
        order = np.argsort(np.tile(T, len(x)), kind="stable")
        ts, xs = np.tile(T, len(x))[order], x.ravel()[order]
        ws = np.sqrt(np.repeat(gamma[:, c], len(T)))[order]
        ref_w = make_lsq_spline(ts, xs, expert.knot_vector, k=3, w=ws)
        np.testing.assert_allclose(theta[c], ref_w.c, rtol=1e-7, atol=1e-9)


def test_polynomial_expert_equals_numpy_polyfit_of_the_weighted_mean():
    x, gamma, s0, s1, _ = _stats(np.random.default_rng(2))
    expert = build_expert("polynomial", T, options={"degree": 4})
    fitted = expert.evaluate(expert.solve(s0, s1, np.zeros((3, 5))))
    for c in range(3):
        ref = np.polynomial.Polynomial.fit(T, s1[c] / s0[c], 4)(T)
        np.testing.assert_allclose(fitted[c], ref, rtol=1e-9, atol=1e-9)
        # weighted least squares over every (sample, point) of the raw curves gives the same curve
        vander = np.polynomial.polynomial.polyvander(np.tile(T, len(x)), 4)
        w = np.sqrt(np.repeat(gamma[:, c], len(T)))
        coef = np.linalg.lstsq(vander * w[:, None], x.ravel() * w, rcond=None)[0]
        np.testing.assert_allclose(fitted[c], np.polynomial.polynomial.polyval(T, coef), rtol=1e-8, atol=1e-8)


def test_user_expert_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_laws.py").write_text(textwrap.dedent("""
        import numpy as np
        from pima_hpc.model.experts import LinearExpert

        class Exponential(LinearExpert):
            param_names = ("a", "b")
            def __init__(self, t, amplitude="fixed", rate=1.0):
                super().__init__(t, amplitude)
                self.rate = rate
            def design(self, t):
                return np.stack([np.ones_like(t), np.exp(-self.rate * t)], axis=-1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config("configs/digits.yaml", ["model.expert=my_laws:Exponential", "model.expert_options={rate: 2.0}"])
    expert = build_expert(cfg.model.expert, T, options=cfg.model.expert_options)
    truth = np.array([[1.0, 3.0]])
    np.testing.assert_allclose(expert.solve(np.ones(1), expert.evaluate(truth), np.zeros((1, 2))), truth, rtol=1e-10)
    sys.modules.pop("my_laws", None)


@pytest.mark.parametrize("overrides, match", [
    (["model.expert=polynomial", "model.expert_options={degree: -1}"], "polynomial degree"),
    (["model.expert=bspline", "model.expert_options={knots: 100}"], "knots"),
    (["model.expert=bspline", "model.expert_options={knot: 3}"], "unexpected keyword"),
    (["model.expert=nowhere.mod:Law"], "cannot be imported"),
    (["model.expert=math:pi"], "not a subclass"),
    (["model.expert=spline"], "config key 'model.expert': must be one of"),
])
def test_bad_expert_configs_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/digits.yaml", overrides)
