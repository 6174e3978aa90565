"""The HDF5 layout, the writer and the per-rank readers (docs/data-format.md)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from pima_hpc.data.verify import describe_verified
from pima_hpc.data import DataError, describe, list_splits, make_loader, open_split, read_truth, verify_dataset
from pima_hpc.data.hdf5 import chunk_aware_order, partition_ranges
from pima_hpc.data.storage import ModalityLayout, TruthField
from pima_hpc.data.writer import DatasetWriter

T = np.linspace(0.0, 2.0, 12)
COUNTS = {"train": 203, "val": 37, "test": 61}


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for s, n in COUNTS.items():
        img = rng.integers(0, 256, (n, 1, 6, 5)).astype(np.uint8)
        if s == "train":  # 8-bit storage needs the training split to span 0..255
            img[0, 0, 0, 0], img[1, 0, 0, 0] = 0, 255
        data[s] = {"image": img, "curve": 3.0 * rng.normal(size=(n, len(T))) + 1.0,
                   "label": rng.integers(0, 3, n), "truth": rng.normal(size=n)}
    return data


MODS = [ModalityLayout("image", "image", (1, 6, 5), storage="uint8", units="gray"),
        ModalityLayout("curve", "curve", (len(T),), t=T, units="MPa", t_units="strain")]


def build(out, data, shard_size=None, block=50, chunk_bytes=256, **kw):
    with DatasetWriter(out, MODS, COUNTS, shard_size=shard_size, label_names=["a", "b", "c"],
                       truth=[TruthField("x", units="mm")], chunk_bytes=chunk_bytes, **kw) as w:
        for s in COUNTS:
            d = data[s]
            for a in range(0, COUNTS[s], block):
                sl = slice(a, a + block)
                w.write(s, {"image": d["image"][sl], "curve": d["curve"][sl]}, d["label"][sl], {"x": d["truth"][sl]})
    return out


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module", params=["file", "shards"])
def dataset(request, tmp_path_factory, data):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "file":
        return build(d / "ds.h5", data)
    return build(d / "ds", data, shard_size=50)


def leftovers(directory: Path, keep=()):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_values_and_metadata(dataset, data):
    info = describe_verified(dataset)
    assert list(info.splits) == ["train", "val", "test"]
    assert {s: info.splits[s].count for s in COUNTS} == COUNTS
    cur = info.spec["curve"]
    assert cur.offset == pytest.approx(data["train"]["curve"].min())
    assert cur.scale == pytest.approx(np.ptp(data["train"]["curve"]))
    np.testing.assert_allclose(cur.t, T)
    assert (cur.units, cur.t_units) == ("MPa", "strain")
    img = info.spec["image"]
    assert (img.offset, img.scale, info.storage["image"]) == (0.0, 255.0, "uint8")
    assert info.spec.label_names == ("a", "b", "c")
    for s in COUNTS:
        reader = open_split(dataset, s, in_memory="no")
        batch = reader.read_batch(reader.indices)
        assert batch["image"].dtype.is_floating_point
        np.testing.assert_allclose(batch["image"].numpy(), data[s]["image"] / 255.0, rtol=1e-7)
        np.testing.assert_array_equal(np.rint(batch["image"].numpy() * 255), data[s]["image"])
        np.testing.assert_allclose(cur.to_physical(batch["curve"].double().numpy()), data[s]["curve"],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(batch["label"].numpy(), data[s]["label"])
        np.testing.assert_array_equal(reader.labels(), data[s]["label"])
    train = open_split(dataset, "train", in_memory="no").read_batch(np.arange(COUNTS["train"]))
    assert float(train["curve"].min()) == pytest.approx(0.0, abs=1e-6)
    assert float(train["curve"].max()) == pytest.approx(1.0, abs=1e-6)


def test_in_memory_and_streaming_agree(dataset):
    mem = open_split(dataset, "train", 1, 2, in_memory="yes")
    disk = open_split(dataset, "train", 1, 2, in_memory="no")
    auto = open_split(dataset, "train", 1, 2)
    assert mem.in_memory and not disk.in_memory and auto.in_memory
    for a, b in zip(mem.batch_index_lists(16, 3, 5), disk.batch_index_lists(16, 3, 5)):
        np.testing.assert_array_equal(a, b)
        x, y = mem.read_batch(a), disk.read_batch(b)
        for k in x:
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy())


def test_read_truth(dataset, data):
    for world in (1, 2):
        got = [read_truth(dataset, "val", r, world) for r in range(world)]
        idx = np.concatenate([g["index"] for g in got])
        np.testing.assert_array_equal(idx, np.arange(COUNTS["val"]))
        np.testing.assert_allclose(np.concatenate([g["x"] for g in got]), data["val"]["truth"])
    assert describe(dataset).splits["val"].truth_fields == {"x": "mm"}


def test_list_splits(dataset):
    assert list_splits(dataset) == ["train", "val", "test"]


# --------------------------------------------------------------------------------------------
# Ranks, order, batches


@pytest.mark.parametrize("partition", ["block", "shard"])
@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_ranks_cover_every_sample_exactly_once(dataset, in_memory, partition):
    n = COUNTS["train"]
    if partition == "shard" and not describe(dataset).sharded:
        pytest.skip("whole-shard partition needs a shard directory")
    for world in (1, 2, 3):
        readers = [open_split(dataset, "train", r, world, in_memory=in_memory, partition=partition)
                   for r in range(world)]
        counts = [len(r) for r in readers]
        assert all(r.rank_counts == counts for r in readers)
        steps = {len(r.batch_index_lists(32, epoch=2, seed=1)) for r in readers}
        assert len(steps) == 1  # every rank runs the same number of steps
        seen = np.concatenate([b["index"].numpy() for r in readers for b in r.iter_batches(32, epoch=2, seed=1)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # no sample missing, none duplicated
        if partition == "block":
            assert max(counts) - min(counts) <= 1


def test_uneven_ranks_never_pad(dataset):
    readers = [open_split(dataset, "val", r, 2, partition="block") for r in range(2)]
    assert sorted(len(r) for r in readers) == [18, 19]
    sizes = [[len(b) for b in r.batch_index_lists(8)] for r in readers]
    assert len(sizes[0]) == len(sizes[1]) and all(min(s) >= 1 for s in sizes)
    np.testing.assert_array_equal(readers[0].global_counts(8), np.add(*map(np.array, sizes)))


def test_epoch_order_is_reproducible_permutation(dataset):
    r = open_split(dataset, "train", 0, 1, in_memory="no")
    orders = {e: np.concatenate(r.batch_index_lists(16, epoch=e, seed=7)) for e in (0, 1)}
    for o in orders.values():
        np.testing.assert_array_equal(np.sort(o), r.indices)
    again = np.concatenate(open_split(dataset, "train", in_memory="yes").batch_index_lists(16, epoch=0, seed=7))
    np.testing.assert_array_equal(orders[0], again)
    assert not np.array_equal(orders[0], orders[1])
    other_seed = np.concatenate(r.batch_index_lists(16, epoch=0, seed=8))
    assert not np.array_equal(orders[0], other_seed)
    for b in r.batch_index_lists(16, epoch=0, seed=7):
        assert np.all(np.diff(b) > 0)  # sorted within a batch: monotone HDF5 reads
    unshuffled = np.concatenate(r.batch_index_lists(16, shuffle=False))
    np.testing.assert_array_equal(unshuffled, r.indices)


def test_chunk_aware_order_touches_few_chunks():
    rng = np.random.default_rng(0)
    rows, window, n = 10, 40, 1000
    keys = np.arange(n) // rows
    order = chunk_aware_order(keys, window, rng)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    # a batch of 20 drawn from a window of 4 whole chunks touches at most 4 + 1 chunks
    touched = [len(np.unique(keys[order[a:a + 20]])) for a in range(0, n, 20)]
    assert max(touched) <= window // rows + 1
    # one sample per chunk: a plain uniform permutation, different per draw
    o1 = chunk_aware_order(np.arange(n), 1, np.random.default_rng(1))
    o2 = chunk_aware_order(np.arange(n), 1, np.random.default_rng(2))
    assert not np.array_equal(o1, o2) and np.array_equal(np.sort(o1), np.arange(n))


def test_partition_ranges_whole_shards():
    assert partition_ranges([50, 50, 50, 53], 2, "shard") == [(0, 100), (100, 203)]
    assert partition_ranges([10, 10, 100], 2, "shard") == [(0, 20), (20, 120)]
    with pytest.raises(DataError, match="at least one shard per rank"):
        partition_ranges([10, 10], 3, "shard")


def test_loader_with_workers_matches_plain(dataset):
    r = open_split(dataset, "train", 0, 2, in_memory="no")
    r.read_batch(r.indices[:4])  # open a handle in the parent: workers must not reuse it
    state = pickle.loads(pickle.dumps(r))
    assert state._files == {} and len(state) == len(r)
    plain = list(make_loader(r, 24, epoch=1, seed=3, num_workers=0))
    workers = list(make_loader(r, 24, epoch=1, seed=3, num_workers=2))
    assert len(plain) == len(workers) == r.steps(24)
    for a, b in zip(plain, workers):
        for k in a:
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


# --------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing left behind


def write_one(out, arrays, labels=None, counts=None, truth=None, **kw):
    with DatasetWriter(out, MODS, counts or {"train": 4}, label_names=["a", "b", "c"], **kw) as w:
        w.write("train", arrays, labels if labels is not None else np.zeros(4, int), truth)


def good_block(n=4):
    img = np.zeros((n, 1, 6, 5), np.uint8)
    img[0, 0, 0, 0] = 255
    return {"image": img, "curve": np.random.default_rng(0).normal(size=(n, len(T)))}


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.pop("curve"), r"modality 'curve' is missing"),
    (lambda b: b.update(curve=b["curve"][:3]), r"different sample counts"),
    (lambda b: b["curve"].__setitem__((2, 3), np.nan), r"non-finite .*NaN first in sample 2"),
    (lambda b: b["curve"].__setitem__((1, 0), np.inf), r"non-finite .*Inf first in sample 1"),
    (lambda b: b.update(curve=b["curve"][:, :5]), r"has shape \(4, 5\), expected \(4, 12\)"),
    (lambda b: b.update(curve=b["curve"].astype(str)), r"dtype <U.*expected real numbers"),
    (lambda b: b.update(image=b["image"].astype(np.float32) + 0.5), r"must hold integers"),
    (lambda b: b.update(image=b["image"].astype(np.int32) * 2), r"outside \[0, 255\]"),
])
def test_bad_arrays_raise_and_leave_nothing(tmp_path, mutate, message):
    block = good_block()
    mutate(block)
    with pytest.raises(DataError, match=message) as err:
        write_one(tmp_path / "bad.h5", block)
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path) == []


def test_bad_labels_and_declared_counts(tmp_path):
    with pytest.raises(DataError, match=r"labels values span \[0, 7\], outside \[0, 2\]"):
        write_one(tmp_path / "a.h5", good_block(), labels=np.array([0, 1, 2, 7]))
    with pytest.raises(DataError, match=r"received 4 of its 9 declared samples"):
        write_one(tmp_path / "b.h5", good_block(), counts={"train": 9})
    with pytest.raises(DataError, match=r"split 'test' would be empty"):
        write_one(tmp_path / "c.h5", good_block(), counts={"train": 4, "test": 0})
    with pytest.raises(DataError, match=r"8-bit codes.*spans 0\.\.0"):
        write_one(tmp_path / "d.h5", {**good_block(), "image": np.zeros((4, 1, 6, 5), np.uint8)})
    assert leftovers(tmp_path) == []


def test_crash_mid_build_leaves_no_dataset(tmp_path, data):
    class Crash(RuntimeError):
        pass

    for shard in (None, 40):
        out = tmp_path / ("x.h5" if shard is None else "x")
        with pytest.raises(Crash):
            with DatasetWriter(out, MODS, COUNTS, shard_size=shard, label_names=["a", "b", "c"],
                               truth=[TruthField("x")]) as w:
                d = data["train"]
                w.write("train", {"image": d["image"][:100], "curve": d["curve"][:100]}, d["label"][:100],
                        {"x": d["truth"][:100]})
                raise Crash
        assert leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path, data):
    out = build(tmp_path / "d.h5", data)
    with pytest.raises(DataError, match="already exists; choose another --out or pass --overwrite"):
        build(out, data)
    build(out, data, overwrite=True)
    assert leftovers(tmp_path) == ["d.h5"]
    with pytest.raises(DataError, match="needs a .h5 suffix"):
        build(tmp_path / "d.bin", data)
    with pytest.raises(DataError, match="is a directory; drop the .h5 suffix"):
        build(tmp_path / "e.h5", data, shard_size=10)


def test_truncated_and_non_hdf5_files(tmp_path, data):
    out = build(tmp_path / "d.h5", data)
    raw = out.read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"trunc\.h5 is truncated.*re-copy it or rebuild"):
        open_split(trunc, "train")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    with pytest.raises(DataError, match=r"notes\.h5 is not an HDF5 file"):
        open_split(text, "train")
    with pytest.raises(DataError, match=r"missing\.h5: no such file"):
        open_split(tmp_path / "missing.h5", "train")
    with pytest.raises(DataError, match=r"no split 'valid'; it has \['train', 'val', 'test'\]"):
        open_split(out, "valid")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="is not a pima-hpc dataset.*pima data convert"):
        open_split(foreign, "train")


def test_damaged_layout_in_file(tmp_path, data):
    out = build(tmp_path / "d.h5", data)
    with h5py.File(out, "r+") as f:
        del f["val/curve"]
    with pytest.raises(DataError, match=r"split '/val' is missing modality dataset /val/curve"):
        open_split(out, "train")
    out2 = build(tmp_path / "e.h5", data)
    with h5py.File(out2, "r+") as f:
        lab = f["test/label"][:]
        del f["test/label"]
        f["test/label"] = lab[:-1]
    with pytest.raises(DataError, match=r"mismatched sample counts"):
        describe(out2)
    out3 = build(tmp_path / "f.h5", data)
    with h5py.File(out3, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(DataError, match="marked incomplete"):
        describe(out3)


def test_shard_manifest_problems(tmp_path, data):
    out = build(tmp_path / "ds", data, shard_size=50)
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][1]["file"]
    # a shard listed in the manifest but missing
    (out / first).rename(tmp_path / "moved.h5")
    with pytest.raises(DataError, match=rf"shard {first} of split 'train' is listed in manifest.json but missing"):
        open_split(out, "train")
    (tmp_path / "moved.h5").rename(out / first)
    # a shard file the manifest does not list
    (out / "train-00099.h5").write_bytes((out / first).read_bytes())
    with pytest.raises(DataError, match=r"\['train-00099.h5'\] are not listed in manifest.json"):
        open_split(out, "train")
    (out / "train-00099.h5").unlink()
    # truncated shard: caught by the size check before HDF5 sees it
    path = out / first
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    with pytest.raises(DataError, match=rf"{first}: \d+ bytes, manifest.json records \d+ \(truncated"):
        open_split(out, "train")
    # same size, one byte changed in the data: the SHA-256 check names the shard
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    open_split(out, "test")  # other splits still open (cheap checks only)
    with pytest.raises(DataError, match=rf"{first}: SHA-256 checksum does not match manifest.json"):
        verify_dataset(describe(out))
    with pytest.raises(DataError, match="SHA-256"):
        open_split(out, "train", verify=True)
    path.write_bytes(good)
    verify_dataset(describe(out))
    # an empty split in the manifest
    empty = json.loads(json.dumps(manifest))
    empty["splits"]["val"] = {**empty["splits"]["val"], "count": 0, "shards": []}
    for sh in manifest["splits"]["val"]["shards"]:
        (out / sh["file"]).rename(tmp_path / sh["file"])
    (out / "manifest.json").write_text(json.dumps(empty))
    with pytest.raises(DataError, match=r"split 'val' shards hold 0 samples.*no empty splits allowed"):
        open_split(out, "train")
    for sh in manifest["splits"]["val"]["shards"]:
        (tmp_path / sh["file"]).rename(out / sh["file"])
    # a damaged manifest
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json is not valid JSON"):
        open_split(out, "train")
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="directory without manifest.json"):
        open_split(out, "train")


def test_corrupted_chunk_in_single_file_is_named(tmp_path, data):
    out = build(tmp_path / "d.h5", data)
    with h5py.File(out, "r") as f:
        offset = f["train/curve"].id.get_chunk_info(0).byte_offset
    raw = bytearray(out.read_bytes())
    raw[offset + 4] ^= 0xFF
    out.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"cannot read rows .* of dataset /train/curve .*corrupted"):
        verify_dataset(describe(out))


def test_too_many_ranks(dataset):
    with pytest.raises(DataError, match="fewer than the 100 ranks"):
        open_split(dataset, "val", 0, 100)
    with pytest.raises(DataError, match="rank 3 is outside a world of size 2"):
        open_split(dataset, "val", 3, 2)
    with pytest.raises(DataError, match="in_memory must be"):
        open_split(dataset, "val", in_memory="maybe")
