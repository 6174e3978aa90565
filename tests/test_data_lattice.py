"""Lattice generator: Gibson-Ashby scaling from measured density, topologies tell apart, layout."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pima_hpc.data.verify import describe_verified
from pima_hpc.data import DataError, open_split, read_truth
from pima_hpc.data.lattice import (E_SOLID, GYROID, OCTET, SCALING, SIGMA_Y_SOLID, LatticeConfig, build_lattice,
                                   generate_specimen)

# the density-spread population: its within-topology density range is what the scaling laws are fitted over
SMALL = LatticeConfig(size=48, augment="none", population="spread")


def fit_linear_hardening(strain: np.ndarray, stress: np.ndarray):
    """Least-squares fit of stress = E*strain up to eps_y, then sigma_y + H*(strain - eps_y).

    Profiles over the last elastic point k: E through the origin on points <= k, a line on the
    rest; the yield point is where the two lines meet. Returns (E, sigma_y, H, eps_y).
    """
    best = (np.inf, None)
    for k in range(2, len(strain) - 3):
        e1, y1, e2, y2 = strain[:k], stress[:k], strain[k:], stress[k:]
        e = (e1 @ y1) / (e1 @ e1)
        (a, h), *_ = np.linalg.lstsq(np.stack([np.ones_like(e2), e2], 1), y2, rcond=None)
        sse = ((y1 - e * e1) ** 2).sum() + ((y2 - a - h * e2) ** 2).sum()
        if sse < best[0]:
            eps_y = a / (e - h)
            best = (sse, (e, e * eps_y, h, eps_y))
    return best[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = build_lattice(tmp_path_factory.mktemp("lat") / "lat.h5", 200, seed=3, cfg=SMALL, progress=False)
    rows = {}
    for split in ("train", "test"):
        r = open_split(out, split)
        b = r.read_batch(r.indices)
        rows[split] = {"curve": r.spec["curve"].to_physical(b["curve"].double().numpy()),
                       "image": b["image"].numpy()[:, 0], "label": b["label"].numpy(),
                       "truth": read_truth(out, split)}
    cat = {k: np.concatenate([rows[s][k] for s in rows]) for k in ("curve", "image", "label")}
    cat["truth"] = {k: np.concatenate([rows[s]["truth"][k] for s in rows]) for k in rows["train"]["truth"]}
    cat["fits"] = np.array([fit_linear_hardening(SMALL.strain, c) for c in cat["curve"]])
    return out, cat


def test_layout_and_normalisation(small):
    out, cat = small
    info = describe_verified(out)
    assert {s: v.count for s, v in info.splits.items()} == {"train": 160, "test": 40}
    assert info.spec.label_names == ("gyroid", "octet")
    assert info.storage == {"image": "uint8", "curve": "float32"}
    curve = info.spec["curve"]
    assert curve.offset == 0.0  # stress = E * strain stays linear through the origin
    assert (curve.units, curve.t_units, len(curve.t)) == ("MPa", "strain", 100)
    train = open_split(out, "train")
    c = train.read_batch(train.indices)["curve"].numpy()
    assert c.max() == pytest.approx(1.0, abs=1e-6)
    assert curve.scale == pytest.approx(cat["curve"][:160].max(), rel=1e-6)
    assert abs(float(np.median(c[:, 0]))) < 0.01  # the elastic line starts at the origin
    np.testing.assert_array_equal(cat["label"], cat["truth"]["topology"])
    assert set(info.splits["train"].truth_fields) >= {"topology", "relative_density", "E", "sigma_y", "H",
                                                       "cell_size", "eps_y", "specimen", "view"}


def test_measured_density_tracks_design(small):
    _, cat = small
    rho, target = cat["truth"]["relative_density"], cat["truth"]["target_density"]
    assert np.corrcoef(rho, target)[0, 1] > 0.95
    assert np.all(np.abs(rho / target - 1) < 0.35)
    assert 0.05 < rho.min() and rho.max() < 0.4


@pytest.mark.parametrize("topology", [GYROID, OCTET])
def test_curves_follow_gibson_ashby_scaling(small, topology):
    _, cat = small
    sel = cat["label"] == topology
    assert sel.sum() >= 60
    rho = cat["truth"]["relative_density"][sel]
    e, s, h, _ = cat["fits"][sel].T
    law = SCALING[topology]
    n_e, c_e = np.polyfit(np.log(rho), np.log(e / E_SOLID), 1)
    n_s, c_s = np.polyfit(np.log(rho), np.log(s / SIGMA_Y_SOLID), 1)
    assert n_e == pytest.approx(law.n_e, abs=0.1)     # octet E ~ rho, gyroid E ~ rho^2
    assert n_s == pytest.approx(law.n_s, abs=0.1)     # octet sigma_y ~ rho, gyroid ~ rho^1.5
    assert np.exp(c_e) == pytest.approx(law.c_e, rel=0.15)
    assert np.exp(c_s) == pytest.approx(law.c_s, rel=0.15)
    assert np.median(h / e) == pytest.approx(law.eta, rel=0.15)
    # the fitted curve parameters agree with the generator's stored ground truth
    assert np.median(np.abs(e / cat["truth"]["E"][sel] - 1)) < 0.02
    assert np.median(np.abs(s / cat["truth"]["sigma_y"][sel] - 1)) < 0.03


def test_topologies_distinguishable_from_curves(small):
    _, cat = small
    e, s, h, eps_y = cat["fits"].T
    features = np.stack([np.log(eps_y), h / e], 1)
    clf = make_pipeline(StandardScaler(), LogisticRegression())
    assert cross_val_score(clf, features, cat["label"], cv=5).mean() >= 0.97


def test_topologies_distinguishable_from_images(small):
    _, cat = small
    img = cat["image"] - cat["image"].mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(img)) ** 2
    n = img.shape[1]
    k = np.fft.fftfreq(n)
    kx, ky = np.meshgrid(k, k, indexing="ij")
    angle = np.minimum((np.mod(np.arctan2(ky, kx), np.pi) / np.pi * 12).astype(int), 11)
    radius = np.hypot(kx, ky)
    ring = np.minimum((radius / 0.5 * 4).astype(int), 3)
    feats = np.stack([(power * ((angle == a) & (ring == r) & (radius > 0.03))).sum((1, 2))
                      for a in range(12) for r in range(4)], 1)
    feats = np.log(feats / feats.sum(1, keepdims=True) + 1e-9)  # translation-invariant spectrum shape
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000))
    assert cross_val_score(clf, feats, cat["label"], cv=5).mean() >= 0.85


def test_design_population_splits_naturally_and_shares_the_other_draws():
    """Default population: each topology near its design density (print scatter only), so the curves of
    one topology have one modulus scale; the spread population differs in density alone."""
    design, spread = LatticeConfig(size=32, augment="none"), LatticeConfig(size=32, augment="none", population="spread")
    assert design.population == "design"
    specs = [generate_specimen(5, i, design) for i in range(40)]
    for topo in (GYROID, OCTET):
        rho = np.array([s["relative_density"] for s in specs if s["topology"] == topo])
        target = np.array([s["target_density"] for s in specs if s["topology"] == topo])
        assert len(rho) >= 10
        assert np.std(np.log(target)) == pytest.approx(design.density_cv, rel=0.5)
        assert abs(np.median(target) / design.design_density[topo] - 1) < 0.03
        e = np.array([s["E"] for s in specs if s["topology"] == topo])
        assert e.max() / e.min() < 1.8  # spread population: 3x (octet) to 9x (gyroid)
    other = generate_specimen(5, 3, spread)
    assert other["topology"] == specs[3]["topology"] and other["cell_mm"] == specs[3]["cell_mm"]
    assert other["target_density"] != specs[3]["target_density"]
    with pytest.raises(DataError, match="--population must be"):
        LatticeConfig(population="uniform")


def test_paper_defaults_quadrants_and_flips(tmp_path):
    cfg = LatticeConfig()
    assert (cfg.size, cfg.views, cfg.points) == (152, 12, 100)
    out = build_lattice(tmp_path / "paper", 5, seed=1, shard_size=24, progress=False)
    info = describe_verified(out)
    assert {s: v.count for s, v in info.splits.items()} == {"train": 48, "test": 12}
    assert info.spec["image"].shape == (1, 152, 152)
    r = open_split(out, "test")
    b = r.read_batch(r.indices)
    tr = read_truth(out, "test")
    assert np.all(tr["specimen"] == 4) and list(tr["view"]) == list(range(12))
    im = b["image"].numpy()[:, 0]
    for q in range(4):
        a = im[3 * q]
        np.testing.assert_array_equal(im[3 * q + 1], a[::-1, :])
        np.testing.assert_array_equal(im[3 * q + 2], a[:, ::-1])
    assert np.all(b["curve"].numpy() == b["curve"].numpy()[0])  # all views share the specimen's curve


def test_generation_is_reproducible_and_parallel_safe(tmp_path):
    a, b = generate_specimen(9, 4, SMALL), generate_specimen(9, 4, SMALL)
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["curve"], b["curve"])
    assert not np.array_equal(a["curve"], generate_specimen(9, 5, SMALL)["curve"])
    cfg = LatticeConfig(size=32, augment="none")
    seq = build_lattice(tmp_path / "seq.h5", 7, seed=2, cfg=cfg, block=2, progress=False)
    par = build_lattice(tmp_path / "par.h5", 7, seed=2, cfg=cfg, block=2, workers=2, progress=False)
    for split in ("train", "test"):
        x, y = open_split(seq, split), open_split(par, split)
        bx, by = x.read_batch(x.indices), y.read_batch(y.indices)
        for k in bx:
            np.testing.assert_array_equal(bx[k].numpy(), by[k].numpy())


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 1}, "--n must be >= 2"),
    ({"n": 3, "test_fraction": 0.05}, "leaves an empty split"),
    ({"n": 10, "test_fraction": 1.0}, "--test-fraction must be in"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        build_lattice(tmp_path / "x.h5", cfg=SMALL, progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="--augment must be"):
        LatticeConfig(augment="rotate")
