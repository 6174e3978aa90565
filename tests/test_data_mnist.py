"""Multimodal MNIST builder: IDX parsing, splits, X2 = c t + eps (ERRATA 7), the real files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pima_hpc.data.verify import describe_verified
from pima_hpc.data import DataError, describe, open_split
from pima_hpc.data.mnist import FILES, build_mnist, parse_noise, read_idx
from pima_hpc.data.splits import stratified_split

REAL = Path("/work/shared/data/mnist")


def write_idx(path: Path, arr: np.ndarray, gz: bool):
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    raw = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def fake_mnist(d: Path, n_train=300, n_test=60, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        images[0, 0, 0], images[1, 0, 0] = 0, 255
        write_idx(d / FILES[f"{part}_images"], images, gz)
        write_idx(d / FILES[f"{part}_labels"], labels, gz)
    return d


def slopes(reader) -> np.ndarray:
    """Least-squares slope of X2 through the origin, in physical units (X2 = c t + eps)."""
    spec = reader.spec["curve"]
    x = spec.to_physical(reader.read_batch(reader.indices)["curve"].double().numpy())
    return x @ spec.t / (spec.t @ spec.t)


def test_read_idx_gzip_or_not(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        p = write_idx(tmp_path / f"x{gz}-idx3-ubyte", a, gz)
        np.testing.assert_array_equal(read_idx(p), a)


def test_read_idx_errors(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = write_idx(tmp_path / "a-idx3-ubyte", a, False)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"a-idx3-ubyte: 19 data bytes, the header's shape \(2, 3, 4\) needs 24"):
        read_idx(p)
    q = tmp_path / "b-idx3-ubyte"
    q.write_bytes(b"hello world")
    with pytest.raises(DataError, match="is not an IDX file"):
        read_idx(q)
    g = write_idx(tmp_path / "c-idx3-ubyte", a, True)
    g.write_bytes(g.read_bytes()[:20])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(g)


def test_parse_noise():
    assert parse_noise("clean") == 0.01 and parse_noise("noisy") == 0.5 and parse_noise("0.2") == 0.2
    with pytest.raises(DataError, match="--noise must be"):
        parse_noise("loud")
    with pytest.raises(DataError, match="--noise must be"):
        parse_noise("-1")


def test_stratified_split_is_exact_and_balanced():
    labels = np.repeat(np.arange(10), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    keep, held = stratified_split(labels, 0.1, np.random.default_rng(0))
    assert len(held) == 6000 and len(keep) == 54000
    assert len(np.intersect1d(keep, held)) == 0
    expected = np.bincount(labels) * 0.1
    assert np.all(np.abs(np.bincount(labels[held]) - expected) < 1)


def test_synthetic_build_and_noise(tmp_path):
    src = fake_mnist(tmp_path / "idx", gz=False)
    out = build_mnist(src, tmp_path / "m.h5", "noisy", progress=False)
    info = describe_verified(out)
    assert {s: v.count for s, v in info.splits.items()} == {"train": 270, "val": 30, "test": 60}
    train = open_split(out, "train")
    spec = train.spec["curve"]
    x = spec.to_physical(train.read_batch(train.indices)["curve"].double().numpy())
    resid = x - train.labels()[:, None] * spec.t
    assert resid.std() == pytest.approx(0.5, rel=0.05)  # ERRATA 7: 0.5 is a standard deviation
    assert info.provenance["curve_noise_std"] == 0.5
    assert {f["file"].rsplit("/", 1)[-1] for f in info.provenance["sources"].values()} == set(FILES.values())


def test_pairs_curve_law_names_only_the_pair(tmp_path):
    """--curve-law pairs: the slope is floor(c / 2), so the curve tells 0 from 2 but not 0 from 1."""
    src = fake_mnist(tmp_path / "idx", gz=False)
    out = build_mnist(src, tmp_path / "m.h5", "clean", progress=False, curve_law="pairs")
    train = open_split(out, "train")
    np.testing.assert_allclose(slopes(train), train.labels() // 2, atol=0.02)
    assert describe(out).provenance["curve_law"] == "pairs"
    with pytest.raises(DataError, match="--curve-law must be one of"):
        build_mnist(src, tmp_path / "n.h5", progress=False, curve_law="triples")
    assert not (tmp_path / "n.h5").exists()


def test_missing_idx_file_is_named(tmp_path):
    src = fake_mnist(tmp_path / "idx")
    (src / (FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte\\[.gz\\]"):
        build_mnist(src, tmp_path / "m.h5", progress=False)
    assert not (tmp_path / "m.h5").exists()


def test_mismatched_counts_are_named(tmp_path):
    src = fake_mnist(tmp_path / "idx")
    write_idx(src / FILES["train_labels"], np.zeros(299, np.uint8), True)
    with pytest.raises(DataError, match="300 images but 299 labels"):
        build_mnist(src, tmp_path / "m.h5", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


@pytest.fixture(scope="module")
def real_clean(tmp_path_factory):
    if not all(any((REAL / (f + s)).is_file() for s in ("", ".gz")) for f in FILES.values()):
        pytest.skip(f"MNIST IDX files not found in {REAL}")
    return build_mnist(REAL, tmp_path_factory.mktemp("mnist") / "mnist.h5", "clean", progress=False)


def test_real_mnist_counts_and_balance(real_clean):
    info = describe(real_clean)
    assert {s: v.count for s, v in info.splits.items()} == {"train": 54000, "val": 6000, "test": 10000}
    lab = {s: open_split(real_clean, s, in_memory="no").labels() for s in info.splits}
    standard_train = np.array([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    standard_test = np.array([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    np.testing.assert_array_equal(np.bincount(lab["train"]) + np.bincount(lab["val"]), standard_train)
    np.testing.assert_array_equal(np.bincount(lab["test"]), standard_test)
    assert np.all(np.abs(np.bincount(lab["val"]) - standard_train / 10) < 1)  # stratified 90/10


def test_real_mnist_normalisation_and_slopes(real_clean):
    train = open_split(real_clean, "train")
    spec = train.spec
    assert (spec["image"].offset, spec["image"].scale) == (0.0, 255.0)
    b = train.read_batch(train.indices)
    assert float(b["curve"].min()) == pytest.approx(0.0, abs=1e-6)
    assert float(b["curve"].max()) == pytest.approx(1.0, abs=1e-6)
    assert float(b["image"].min()) == 0.0 and float(b["image"].max()) == 1.0
    assert len(spec["curve"].t) == 20 and spec["curve"].t[0] == 0.0 and spec["curve"].t[-1] == 1.0
    for split in ("train", "val", "test"):
        r = open_split(real_clean, split)
        assert np.mean(np.rint(slopes(r)) == r.labels()) == 1.0  # clean X2 encodes the digit exactly


def test_real_mnist_two_ranks(real_clean):
    readers = [open_split(real_clean, "val", r, 2, in_memory="no") for r in range(2)]
    labels = np.concatenate([r.labels() for r in readers])
    np.testing.assert_array_equal(labels, open_split(real_clean, "val").labels())
