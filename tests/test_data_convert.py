"""Users' own data: image folders + CSV/NPY curves, arrays from Python, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pima_hpc.data import DataError, describe, open_split, read_truth
from pima_hpc.data.convert import convert_arrays, convert_files, write_arrays

L = 8
T = np.linspace(0.0, 0.7, L)


def make_folder(tmp_path, n=30, seed=0, shape=(12, 10)):
    rng = np.random.default_rng(seed)
    d = tmp_path / "imgs"
    d.mkdir()
    images, curves, names = [], [], []
    for i in range(n):
        img = rng.integers(0, 256, shape).astype(np.uint8)
        name = f"spec{i:03d}"
        Image.fromarray(img).save(d / f"{name}.png")
        images.append(img)
        curves.append(rng.normal(size=L) * 10 + i)
        names.append(name)
    return d, np.array(images), np.array(curves), names


def write_csv(path, curves, names=None, header_t=None, order=None):
    order = range(len(curves)) if order is None else order
    lines = []
    if names is not None or header_t is not None:
        head = (["name"] if names is not None else []) + ([f"{v:.17g}" for v in header_t] if header_t is not None
                                                          else [f"p{j}" for j in range(curves.shape[1])])
        lines.append(",".join(head))
    for i in order:
        lines.append(",".join(([names[i]] if names is not None else []) + [repr(float(v)) for v in curves[i]]))
    path.write_text("\n".join(lines) + "\n")
    return path


def read_all(out):
    info = describe(out, verify=True)
    got = {}
    for s in info.splits:
        r = open_split(out, s)
        b = r.read_batch(r.indices)
        got[s] = {"image": info.spec["image"].to_physical(b["image"].double().numpy()),
                  "curve": info.spec["curve"].to_physical(b["curve"].double().numpy()),
                  "label": b["label"].numpy()}
    return info, got


def match_rows(got_curves, curves):
    """Row i of ``got_curves`` is row match[i] of ``curves`` (curves are distinct)."""
    d = np.abs(got_curves[:, None, :] - curves[None]).max(-1)
    assert np.all(d.min(1) < 1e-4)
    return d.argmin(1)


def test_folder_and_named_csv_round_trip(tmp_path):
    d, images, curves, names = make_folder(tmp_path)
    shuffled = np.random.default_rng(1).permutation(len(names))
    csv = write_csv(tmp_path / "c.csv", curves, names, header_t=T, order=shuffled)  # paired by name, not order
    labels = tmp_path / "labels.csv"
    labels.write_text("name,label\n" + "\n".join(f"{n},{'ab'[i % 2]}" for i, n in enumerate(names)) + "\n")
    out = convert_files(tmp_path / "mine.h5", d, csv, labels_file=labels, curve_units="N", t_units="mm",
                        progress=False)
    info, got = read_all(out)
    assert {s: v.count for s, v in info.splits.items()} == {"train": 24, "val": 3, "test": 3}
    np.testing.assert_allclose(info.spec["curve"].t, T)
    assert info.spec["curve"].units == "N" and info.spec.label_names == ("a", "b")
    for s, g in got.items():
        idx = match_rows(g["curve"], curves)
        np.testing.assert_allclose(g["image"][:, 0], images[idx], atol=1e-3)
        np.testing.assert_array_equal(g["label"], idx % 2)
    all_idx = np.concatenate([match_rows(g["curve"], curves) for g in got.values()])
    assert sorted(all_idx) == list(range(len(names)))


def test_npy_curves_with_grid_and_order_pairing(tmp_path):
    d, images, curves, _ = make_folder(tmp_path, n=20)
    np.save(tmp_path / "c.npy", curves)
    out = convert_files(tmp_path / "mine", d, tmp_path / "c.npy", t="0:0.7", val_fraction=0.0,
                        test_fraction=0.25, shard_size=6, curve_normalisation="zero-max", progress=False)
    info, got = read_all(out)
    assert info.sharded and set(info.splits) == {"train", "test"}
    assert info.spec["curve"].offset == 0.0
    np.testing.assert_allclose(info.spec["curve"].t, T)
    for g in got.values():
        idx = match_rows(g["curve"], curves)
        np.testing.assert_allclose(g["image"][:, 0], images[idx], atol=1e-3)


def test_arrays_from_python(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 2, 5, 6))
    curves = rng.normal(size=(40, L))
    labels = np.arange(40) % 4
    out = convert_arrays(tmp_path / "arr.h5", images, curves, T, labels, test_fraction=0.2, val_fraction=0.1)
    info, got = read_all(out)
    assert info.spec["image"].shape == (2, 5, 6)
    for s, g in got.items():
        idx = match_rows(g["curve"], curves)
        np.testing.assert_allclose(g["image"], images[idx], atol=1e-5)
        np.testing.assert_array_equal(g["label"], labels[idx])
        np.testing.assert_array_equal(read_truth(out, s)["source_index"], idx)  # maps back to the caller's rows
    # general form: any modality names, pre-split
    out2 = write_arrays(tmp_path / "gen.h5", {"train": {"photo": images[:30], "load": curves[:30]},
                                               "test": {"photo": images[30:], "load": curves[30:]}},
                        t={"load": T})
    assert describe(out2).spec.names == ["photo", "load"]
    r = open_split(out2, "train")
    stored = r.spec["load"].to_physical(r.read_batch(r.indices)["load"].double().numpy())
    src = read_truth(out2, "train")["source_index"]
    assert not np.array_equal(src, np.arange(30))  # stored in random order ...
    np.testing.assert_allclose(stored, curves[:30][src], atol=1e-5)  # ... and traceable


def leftovers(tmp_path, keep):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


def test_folder_errors_leave_nothing(tmp_path):
    d, images, curves, names = make_folder(tmp_path, n=12)
    keep = {"imgs", "c.csv", "c.npy", "bad.csv"}
    out = tmp_path / "o.h5"
    # an image without a curve
    write_csv(tmp_path / "c.csv", curves[1:], names[1:], header_t=T)
    with pytest.raises(DataError, match=r"no curve for image 'spec000'"):
        convert_files(out, d, tmp_path / "c.csv", progress=False)
    # a curve without an image
    write_csv(tmp_path / "c.csv", np.vstack([curves, curves[:1] + 100]), names + ["ghost"], header_t=T)
    with pytest.raises(DataError, match=r"no image for curve 'ghost'"):
        convert_files(out, d, tmp_path / "c.csv", progress=False)
    # NaN in a curve, named by sample
    bad = curves.copy()
    bad[5, 2] = np.nan
    write_csv(tmp_path / "bad.csv", bad, names, header_t=T)
    with pytest.raises(DataError, match=r"bad.csv: 1 NaN/Inf value\(s\), first in sample 'spec005'"):
        convert_files(out, d, tmp_path / "bad.csv", progress=False)
    # count mismatch without names
    np.save(tmp_path / "c.npy", curves[:-1])
    with pytest.raises(DataError, match=r"12 images in .* but 11 curves"):
        convert_files(out, d, tmp_path / "c.npy", t="0:1", progress=False)
    # unknown grid
    np.save(tmp_path / "c.npy", curves)
    with pytest.raises(DataError, match=r"grid t is unknown; pass --t"):
        convert_files(out, d, tmp_path / "c.npy", progress=False)
    # non-numeric cell
    (tmp_path / "bad.csv").write_text("1,2,3\n4,x,6\n")
    with pytest.raises(DataError, match=r"row 2 has a non-numeric value 'x'"):
        convert_files(out, d, tmp_path / "bad.csv", t="0:1", progress=False)
    # an image of another size, found while writing: the partial output is removed
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(d / "spec011.png")
    with pytest.raises(DataError, match=r"spec011.png: image shape \(1, 7, 7\) .* differs"):
        convert_files(out, d, tmp_path / "c.npy", t="0:1", progress=False)
    # a file that is not an image
    (d / "spec011.png").write_text("nope")
    with pytest.raises(DataError, match=r"spec011.png: cannot read the image"):
        convert_files(out, d, tmp_path / "c.npy", t="0:1", progress=False)
    assert leftovers(tmp_path, keep) == []


def test_array_errors(tmp_path):
    rng = np.random.default_rng(0)
    images, curves = rng.normal(size=(10, 4, 4)), rng.normal(size=(10, L))
    with pytest.raises(DataError, match="10 images but 9 curves"):
        convert_arrays(tmp_path / "a.h5", images, curves[:9], T)
    with pytest.raises(DataError, match=r"split 'test': modality 'curve' is missing"):
        write_arrays(tmp_path / "a.h5", {"train": {"image": images, "curve": curves}, "test": {"image": images}},
                     t={"curve": T})
    with pytest.raises(DataError, match=r"split 'train' has modalities \['image'\]; PIMA needs at least 2"):
        write_arrays(tmp_path / "a.h5", {"train": {"image": images}})
    with pytest.raises(DataError, match=r"a curve modality needs its grid"):
        write_arrays(tmp_path / "a.h5", {"train": {"image": images, "curve": curves}})
    with pytest.raises(DataError, match=r"has shape \(10,\); expected images"):
        write_arrays(tmp_path / "a.h5", {"train": {"image": images, "curve": curves[:, 0]}})
    obj = curves.astype(object)
    with pytest.raises(DataError, match=r"dtype object; expected real numbers"):
        write_arrays(tmp_path / "a.h5", {"train": {"image": images, "curve": obj}}, t={"curve": T})
    inf = images.copy()
    inf[3, 1, 1] = np.inf
    with pytest.raises(DataError, match=r"array 'images': images has 1 non-finite value\(s\) \(Inf first in sample 3\)"):
        convert_arrays(tmp_path / "a.h5", inf, curves, T, val_fraction=0, test_fraction=0.2)
    with pytest.raises(DataError, match=r"leave an empty test split"):
        convert_arrays(tmp_path / "a.h5", images[:3], curves[:3], T, val_fraction=0, test_fraction=0.1)
    assert list(tmp_path.iterdir()) == []
