"""Know before you train: per-sample fit quality of every expert, its ranking, and the training warning."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.metrics import r2_score

from pima_hpc.cli import main as pima
from pima_hpc.config import load_config
from pima_hpc.model.experts import build_expert
from pima_hpc.model.fit_quality import per_sample_r2


@pytest.fixture(scope="module", params=["shared", "per-sample"])
def lattice(tmp_path_factory, request):
    """Generated lattices, each test on the shared strain grid or on its own (fitted on its measured points)."""
    from pima_hpc.data.lattice import LatticeConfig, build_lattice
    return build_lattice(tmp_path_factory.mktemp("fit") / "l.h5", 16, seed=0,
                         cfg=LatticeConfig(size=48, grids=request.param), progress=False)


def test_per_sample_r2_equals_scikit_learn():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 30)
    x = rng.uniform(1, 3, (20, 1)) * t + 0.1 * rng.standard_normal((20, 30)) + rng.uniform(-1, 1, (20, 1))
    expert = build_expert("affine", t)
    fits = expert.evaluate(expert.fit_samples(x))
    np.testing.assert_allclose(per_sample_r2(expert, x), [r2_score(a, b) for a, b in zip(x, fits)], rtol=1e-12)


def test_fit_experts_ranks_the_known_law_first(lattice, capsys):
    assert pima(["data", "fit-experts", str(lattice), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["curve"]
    ranked = [r["expert"] for r in report["experts"] if r["ranked"]]
    assert ranked[0] == "strain_hardening" and report["recommended"] == "strain_hardening"
    assert report["experts"][-1]["expert"] == "free"  # fits anything: listed, never recommended
    best = report["experts"][0]
    assert best["median_r2"] > 0.99 and best["p10_r2"] > 0.95


def test_digits_curves_recommend_the_simplest_exact_law(tmp_path, capsys):
    from pima_hpc.data.convert import write_arrays
    from pima_hpc.data.digits import build_digits
    spec, arrays = build_digits()
    splits = {s: {n: spec[n].to_physical(arrays[s][n].astype(np.float64)) for n in spec.names} for s in ("train", "test")}
    path = write_arrays(tmp_path / "d.h5", splits, t={"curve": spec["curve"].t})
    assert pima(["data", "fit-experts", str(path), "--expert", "affine", "--expert", "polynomial", "--json",
                 "--options", '{"polynomial": {"degree": 3}}']) == 0
    report = json.loads(capsys.readouterr().out)["curve"]
    # X2 = c t fits exactly with one parameter; the cubic fits as well but is not simpler
    assert report["recommended"] == "affine"
    assert {r["expert"]: r["params"] for r in report["experts"]} == {"affine": 1, "polynomial": 4}


def test_training_warns_when_the_expert_fits_poorly(lattice, tmp_path, caplog):
    from pima_hpc.train.run import train_from_config
    cfg = load_config("configs/lattice.yaml", [f"data.path={lattice}", f"run_dir={tmp_path / 'run'}",
                                               "model.expert=affine", "model.expert_amplitude=fixed", "train.epochs=1",
                                               "stages=[multimodal]", "figures=false", "model.image_channels=[4,8]",
                                               "train.progress=false"])
    with caplog.at_level(logging.WARNING, logger="pima"):
        assert train_from_config(cfg) == 0
    assert any("model.expert=affine fits the curves of modality 'curve' poorly" in r.message for r in caplog.records)


def test_fit_experts_bad_inputs(lattice, capsys):
    assert pima(["data", "fit-experts", str(lattice), "--expert", "nope"]) == 2
    assert "unknown expert 'nope'" in capsys.readouterr().err
    assert pima(["data", "fit-experts", str(lattice), "--options", "{bad"]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert pima(["data", "fit-experts", str(lattice), "--modality", "image"]) == 2
    assert "no curve modality named 'image'" in capsys.readouterr().err
