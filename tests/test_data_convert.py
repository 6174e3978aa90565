"""Users' own data: image folders + CSV/NPY curves, arrays from Python, and their errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from pima_hpc.data.verify import describe_verified
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
    info = describe_verified(out)
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


# --------------------------------------------------------------------------------------------
# Images from one array file (.npy / .npz / .txt), sharing the folder's writer loop


def paired_samples(n=40, shape=(8, 8), seed=0):
    """n images (uint8 for 2-D shapes, so they round-trip through PNG), distinct curves, 2 classes."""
    rng = np.random.default_rng(seed)
    images = (rng.integers(0, 256, (n, *shape)).astype(np.uint8) if len(shape) == 2
              else rng.normal(size=(n, *shape)).astype(np.float32))
    return images, rng.normal(size=(n, L)) + np.arange(n)[:, None], np.arange(n) % 2


def write_folder(d, images, as_png):
    d.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(d / f"s{i:03d}.png") if as_png else np.save(d / f"s{i:03d}.npy", img)
    return d


def stored(out):
    """Everything written per split, as stored (normalised arrays, labels, truth), plus the normalisation."""
    import h5py
    info = describe_verified(out)
    with h5py.File(out, "r") as f:
        data = {s: {k: f[s][k][()] for k in ("image", "curve", "label", "truth/source_index")} for s in info.splits}
    return info, data, [(m.offset, m.scale, m.shape) for m in info.spec.modalities]


@pytest.mark.parametrize("kind, shape", [("npy", (8, 8)), ("npz", (3, 8, 8)), ("txt", (8, 8)), ("txt", (3, 8, 8)),
                                         ("python", (3, 8, 8))])
def test_array_file_gives_the_same_dataset_as_a_folder(tmp_path, kind, shape):
    images, curves, labels = paired_samples(shape=shape)
    folder = write_folder(tmp_path / "imgs", images, as_png=len(shape) == 2)
    np.save(tmp_path / "c.npy", curves)
    (tmp_path / "labels.txt").write_text("\n".join("ab"[k] for k in labels) + "\n")
    common = dict(t="0:0.7", labels_file=tmp_path / "labels.txt", seed=3, val_fraction=0.2, test_fraction=0.2,
                  progress=False)
    ref = convert_files(tmp_path / "folder.h5", folder, tmp_path / "c.npy", **common)
    extra = {}
    if kind == "npy":
        np.save(arr := tmp_path / "x.npy", images)
    elif kind == "npz":
        np.savez(arr := tmp_path / "x.npz", pixels=images)
    elif kind == "txt":
        np.savetxt(arr := tmp_path / "x.txt", images.reshape(len(images), -1), fmt="%.17g")  # exact digits
        extra["image_shape"] = ",".join(map(str, shape))
    if kind == "python":
        got = convert_arrays(tmp_path / "array.h5", images, curves, T, labels, seed=3, val_fraction=0.2,
                             test_fraction=0.2, label_names=["a", "b"])
    else:
        got = convert_files(tmp_path / "array.h5", arr, tmp_path / "c.npy", **extra, **common)
    info, want, norm = stored(ref)
    info2, have, norm2 = stored(got)
    assert norm2 == norm and info2.spec.label_names == info.spec.label_names == ("a", "b")
    assert {s: len(v["label"]) for s, v in have.items()} == {"train": 24, "val": 8, "test": 8}
    for s in want:
        for k in want[s]:
            np.testing.assert_array_equal(have[s][k], want[s][k], err_msg=f"{s}/{k}")
        # and both are right: stored row i is input sample source_index[i]
        idx = have[s]["truth/source_index"]
        phys = info2.spec["image"].to_physical(have[s]["image"].astype(np.float64))
        np.testing.assert_allclose(phys.reshape(len(idx), *shape), images[idx], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(have[s]["label"], labels[idx])


def test_npy_images_are_memory_mapped_and_npz_key_chosen(tmp_path):
    from pima_hpc.data.sources import open_images
    images, curves, _ = paired_samples(shape=(2, 8, 8))
    np.save(tmp_path / "x.npy", images)
    src = open_images(tmp_path / "x.npy")
    assert isinstance(src.array, np.memmap) and len(src) == 40 and src.shape == (2, 8, 8)
    np.testing.assert_array_equal(src.read(np.array([5, 2])), images[[5, 2]])
    mapped = convert_arrays(tmp_path / "mapped.h5", np.load(tmp_path / "x.npy", mmap_mode="r"), curves, T)
    assert describe_verified(mapped).spec["image"].shape == (2, 8, 8)
    np.savez(tmp_path / "x.npz", curves=curves, images=images)
    np.save(tmp_path / "c.npy", curves)
    out = convert_files(tmp_path / "ds", tmp_path / "x.npz", tmp_path / "c.npy", images_key="images", t="0:1",
                        shard_size=10, progress=False)
    assert describe(out).spec["image"].shape == (2, 8, 8) and describe(out).sharded


def test_output_is_checked_before_any_image_is_read(tmp_path, monkeypatch):
    import pima_hpc.data.convert as conv
    import pima_hpc.data.sources as sources
    images, curves, _ = paired_samples()
    folder = write_folder(tmp_path / "imgs", images, as_png=True)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "c.npy", curves)
    reads = []
    monkeypatch.setattr(sources, "read_image", lambda p: reads.append(p))
    monkeypatch.setattr(sources, "load_image_array", lambda *a: reads.append(a))
    monkeypatch.setattr(conv, "read_curves", lambda p: reads.append(p))
    missing = tmp_path / "no" / "such" / "x.h5"
    for src in (folder, tmp_path / "x.npy"):
        with pytest.raises(DataError, match=rf"--out {missing}: parent directory {missing.parent} does not exist; "
                                            "create it first"):
            convert_files(missing, src, tmp_path / "c.npy", t="0:1", progress=False)
        (tmp_path / "there.h5").write_text("")
        with pytest.raises(DataError, match=r"there.h5 already exists; choose another --out or pass --overwrite"):
            convert_files(tmp_path / "there.h5", src, tmp_path / "c.npy", t="0:1", progress=False)
        with pytest.raises(DataError, match=r"a single-file dataset needs a .h5 suffix"):
            convert_files(tmp_path / "plain", src, tmp_path / "c.npy", t="0:1", progress=False)
        with pytest.raises(DataError, match=r"there.h5/x.h5: .*there.h5 is a file, not a directory"):
            convert_files(tmp_path / "there.h5" / "x.h5", src, tmp_path / "c.npy", t="0:1", progress=False)
    with pytest.raises(DataError, match=r"parent directory .* does not exist"):
        convert_arrays(missing, images, curves, T)
    assert reads == []


def test_shard_directory_parents_are_created_only_once_inputs_pass(tmp_path):
    images, curves, _ = paired_samples()
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "c.npy", curves[:-1])
    with pytest.raises(DataError, match=r"40 images in .*x.npy but 39 curves"):
        convert_files(tmp_path / "new" / "sub" / "ds", tmp_path / "x.npy", tmp_path / "c.npy", t="0:1",
                      shard_size=16, progress=False)
    assert not (tmp_path / "new").exists()
    np.save(tmp_path / "c.npy", curves)
    out = convert_files(tmp_path / "new" / "sub" / "ds", tmp_path / "x.npy", tmp_path / "c.npy", t="0:1",
                        shard_size=16, progress=False)
    assert describe_verified(out).sharded


def pima(argv):
    from pima_hpc.cli import main
    return main(argv)


def bad_inputs(tmp):
    """Input files for the CLI error cases, keyed by case."""
    images, curves, _ = paired_samples()
    np.save(tmp / "c.npy", curves)
    np.save(tmp / "c39.npy", curves[:39])
    write_csv(tmp / "named.csv", curves, [f"s{i:03d}" for i in range(40)], header_t=T)
    np.save(tmp / "flat.npy", images.reshape(40, -1))
    np.save(tmp / "five.npy", images.reshape(40, 1, 1, 8, 8))
    np.save(tmp / "x.npy", images)
    np.savez(tmp / "two.npz", a=images, b=images)
    nan = images.astype(np.float32)
    nan[7, 3, 3] = np.nan
    np.save(tmp / "nan.npy", nan)
    np.savetxt(tmp / "x.txt", images.reshape(40, -1), fmt="%d")
    (tmp / "words.txt").write_text("1 2 x\n")


@pytest.mark.parametrize("images, extra, message", [
    ("five.npy", [], r"five.npy: images array has shape \(40, 1, 1, 8, 8\); expected N x H x W or N x C x H x W"),
    ("flat.npy", [], r"flat.npy: array of shape \(40, 64\) holds 64 values per sample; pass --image-shape H,W"),
    ("x.npy", ["--curves", "{tmp}/c39.npy"],
     r"40 images in {tmp}/x.npy but 39 curves in {tmp}/c39.npy; every sample needs both \(array rows pair in order"),
    ("x.npy", ["--curves", "{tmp}/named.csv"],
     r"named.csv: the curves are named \(a 'name' column\) but --images {tmp}/x.npy is an array, which pairs with "
     r"curves by row order; drop the name column or pass a folder"),
    ("two.npz", [], r"--images {tmp}/two.npz: holds 2 arrays \['a', 'b'\]; choose one with --images-key KEY"),
    ("two.npz", ["--images-key", "c"], r"--images-key 'c': no such array in {tmp}/two.npz; it holds \['a', 'b'\]"),
    ("x.npy", ["--images-key", "a"], r"--images-key 'a': only an .npz holds several arrays"),
    ("nan.npy", [], r"nan.npy: image row 7 has non-finite values \(NaN/Inf"),
    ("x.txt", [], r"x.txt: a text file holds one flattened image per row; pass --image-shape H,W \(or C,H,W\)"),
    ("x.txt", ["--image-shape", "3,8,8"], r"samples of 64 values .* do not fit --image-shape 3,8,8 \(192 values\)"),
    ("x.txt", ["--image-shape", "8"], r"--image-shape '8': expected H,W or C,H,W"),
    ("words.txt", ["--image-shape", "1,3"], r"words.txt: not a readable .txt file"),
    ("x.csv", [], r"x.csv: no such directory or file"),
    ("x.npy", ["--out", "{tmp}/no/x.h5"], r"--out {tmp}/no/x.h5: parent directory {tmp}/no does not exist; create it"),
])
def test_array_input_errors_exit_2_with_one_line(tmp_path, capsys, images, extra, message):
    bad_inputs(tmp_path)
    before = sorted(tmp_path.iterdir())
    argv = ["data", "convert", "--images", f"{tmp_path}/{images}", "--curves", f"{tmp_path}/c.npy", "--t", "0:1",
            "--out", f"{tmp_path}/out.h5", "--quiet", *extra]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert pima(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pima: error: "), err
    assert re.search(message.replace("{tmp}", re.escape(str(tmp_path))), err[0]), err[0]
    assert sorted(tmp_path.iterdir()) == before  # nothing written, no partial files left


def test_array_file_through_the_cli(tmp_path, capsys):
    images, curves, labels = paired_samples(shape=(3, 8, 8))
    np.savez(tmp_path / "x.npz", imgs=images, other=curves)
    np.savetxt(tmp_path / "c.csv", curves, delimiter=",")
    (tmp_path / "y.txt").write_text("\n".join(map(str, labels)) + "\n")
    out = tmp_path / "mine.h5"
    assert pima(["data", "convert", "--images", str(tmp_path / "x.npz"), "--images-key", "imgs", "--curves",
                 str(tmp_path / "c.csv"), "--t", "0:1", "--labels", str(tmp_path / "y.txt"), "--out", str(out),
                 "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    info = describe_verified(out)
    assert info.spec["image"].shape == (3, 8, 8) and sum(s.count for s in info.splits.values()) == 40
    assert info.provenance["images_key"] == "imgs"


def test_convert_functions_are_exported_by_the_package():
    import subprocess
    import sys

    import pima_hpc.data
    import pima_hpc.data.convert as conv
    assert {"convert_arrays", "convert_files", "write_arrays"} <= set(pima_hpc.data.__all__)
    assert pima_hpc.data.convert_arrays is conv.convert_arrays and pima_hpc.data.write_arrays is conv.write_arrays
    assert pima_hpc.data.convert_files is conv.convert_files
    # in a fresh interpreter, so an import cycle would show
    code = "from pima_hpc.data import convert_arrays, convert_files, write_arrays; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
