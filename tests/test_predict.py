"""`pima predict`: a trained run applied to new samples, checked against the model's own read-outs.

Full input reproduces `pima evaluate`'s test assignments (and its confusion table) exactly; one
modality alone gives the cross-modal networks' clusters and the MoE curve (eqs 13-14); datasets,
folders and arrays give the same rows; two ranks equal one process; bad inputs get one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pima_hpc.cli import main as pima
from pima_hpc.config import load_config
from pima_hpc.data.digits import build_digits
from pima_hpc.evaluation.metrics import contingency, table_metrics
from pima_hpc.predict.trained import load_run_config, load_trained_run
from pima_hpc.train.run import train_from_config

BIN = Path(sys.executable).parent


def _train(root: Path, name: str, *extra) -> Path:
    run = root / name
    cfg = load_config("configs/digits.yaml", [f"run_dir={run}", "train.progress=false", "figures=false",
                                              "train.epochs=3", "crossmodal.epochs=3", *extra])
    assert train_from_config(cfg) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    spec, arrays = build_digits()
    test = arrays["test"]
    physical = {n: spec[n].to_physical(test[n].astype(np.float64)) for n in spec.names}
    np.savez(root / "test.npz", **physical)
    np.save(root / "images.npy", physical["image"][:, 0])      # (N, H, W): a channel is added
    np.save(root / "curves.npy", physical["curve"])
    return {"root": root, "run": _train(root, "run"), "physical": physical, "labels": test["label"],
            "mm_only": _train(root, "mm_only", "stages=[multimodal]")}


def _predict(runs, out, *inputs, extra=()):
    assert pima(["predict", str(runs["run"]), *map(str, inputs), "--out", str(out), *extra]) == 0
    with h5py.File(out / "predictions.h5") as f:
        data = {k: f[k][()] for k in ("cluster", "probabilities")}
        data["curves"] = {n: (f[f"curves/{n}/mean"][()], f[f"curves/{n}/sd"][()]) for n in f.get("curves", {})}
        data["images"] = {n: f[f"images/{n}/generated"][()] for n in f.get("images", {})}
    data["summary"] = json.loads((out / "summary.json").read_text())
    data["csv"] = np.genfromtxt(out / "clusters.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    return data


def _model(runs, name="run"):
    return load_trained_run(load_run_config(runs[name]), torch.device("cpu"))


def _normalised(run, physical):
    return {n: torch.as_tensor(run.spec[n].to_normalised(x), dtype=torch.float32) for n, x in physical.items()}


def test_every_modality_reproduces_evaluate_assignments(runs, tmp_path):
    pred = _predict(runs, tmp_path / "p", runs["root"] / "test.npz")
    run = _model(runs)
    batch = _normalised(run, runs["physical"])
    batch["image"] = batch["image"]
    expected = run.model.predict(batch).numpy()
    np.testing.assert_array_equal(pred["cluster"], expected)
    np.testing.assert_array_equal(pred["csv"]["cluster"], expected)
    assert pred["summary"]["readout"] == "multimodal" and pred["summary"]["samples"] == len(expected)
    # the same confusion table `pima evaluate` wrote for the test split
    metrics = json.loads((runs["run"] / "metrics.json").read_text())["multimodal"]
    table = contingency(pred["cluster"], runs["labels"], 10, 10)
    assert table_metrics(table, np.asarray(metrics["mapping"]))["confusion"] == metrics["test"]["confusion"]
    np.testing.assert_allclose(pred["probabilities"].sum(1), 1.0, atol=1e-5)
    assert not pred["curves"] and not pred["images"]


def test_image_alone_gives_crossmodal_clusters_and_moe_curve(runs, tmp_path):
    pred = _predict(runs, tmp_path / "p", runs["root"] / "images.npy")
    run = _model(runs)
    x = _normalised(run, {"image": runs["physical"]["image"]})["image"]
    with torch.no_grad():
        log_post = run.crossmodal.log_cluster_posterior(run.model, "image", x)
        mean, var = run.crossmodal.predict_curve(run.model, "image", "curve", x)
    np.testing.assert_array_equal(pred["cluster"], log_post.argmax(-1).numpy())
    np.testing.assert_allclose(pred["probabilities"], log_post.exp().numpy(), rtol=1e-5, atol=1e-7)
    got_mean, got_sd = pred["curves"]["curve"]
    np.testing.assert_allclose(got_mean, mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_sd, var.sqrt().numpy(), rtol=1e-5, atol=1e-6)
    # physical units: the predicted curves track the measured ones (slope = digit, X2 = c t)
    truth = runs["physical"]["curve"]
    assert np.mean(np.abs(got_mean - truth) <= 2 * got_sd + 1e-6) > 0.8
    assert pred["summary"]["readout"] == "crossmodal_image"


def test_curve_alone_generates_images_in_physical_units(runs, tmp_path):
    pred = _predict(runs, tmp_path / "p", f"curve={runs['root'] / 'curves.npy'}")
    run = _model(runs)
    x = _normalised(run, {"curve": runs["physical"]["curve"]})["curve"]
    with torch.no_grad():
        mu, _ = run.crossmodal("curve", x)
        expected = run.spec["image"].to_physical(run.model.decoders["image"](mu)).numpy()
    gen = pred["images"]["image"]
    assert gen.shape == (len(x), 1, 8, 8)
    np.testing.assert_allclose(gen, expected, rtol=1e-5, atol=1e-4)
    assert 0 <= gen.min() and gen.max() <= 16.0 + 1e-3  # grey levels, the digits' units


def test_dataset_folder_and_array_inputs_agree(runs, tmp_path):
    from PIL import Image

    from pima_hpc.data.convert import write_arrays
    phys, labels = runs["physical"], runs["labels"]
    spec, arrays = build_digits()
    train = {n: spec[n].to_physical(arrays["train"][n].astype(np.float64)) for n in spec.names}
    ds = write_arrays(tmp_path / "ds.h5", {"train": {**train, "label": arrays["train"]["label"]},
                                           "test": {**phys, "label": labels}},
                      t={"curve": spec["curve"].t}, label_names=list(spec.label_names), shuffle=False)
    by_array = _predict(runs, tmp_path / "a", runs["root"] / "test.npz")
    by_dataset = _predict(runs, tmp_path / "d", ds, extra=["--split", "test"])
    np.testing.assert_array_equal(by_dataset["cluster"], by_array["cluster"])
    np.testing.assert_allclose(by_dataset["probabilities"], by_array["probabilities"], atol=1e-4)
    assert list(by_dataset["csv"]["split"][:2]) == ["test", "test"]
    assert [str(v) for v in by_dataset["csv"]["label"]] == [str(v) for v in labels]

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(phys["image"][:, 0]):
        Image.fromarray(im.astype(np.uint8)).save(folder / f"s{i:04d}.png")  # grey levels 0..16 are integers
    by_folder = _predict(runs, tmp_path / "f", folder)
    by_npy = _predict(runs, tmp_path / "n", runs["root"] / "images.npy")
    np.testing.assert_array_equal(by_folder["cluster"], by_npy["cluster"])
    np.testing.assert_allclose(by_folder["curves"]["curve"][0], by_npy["curves"]["curve"][0], rtol=1e-6)
    assert list(by_folder["csv"]["id"][:2]) == ["s0000", "s0001"]


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason=f"torchrun not installed beside {sys.executable}")
def test_two_ranks_equal_one_process(runs, tmp_path):
    one = _predict(runs, tmp_path / "one", runs["root"] / "images.npy")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "pima_hpc", "predict",
                           str(runs["run"]), str(runs["root"] / "images.npy"), "--out", str(tmp_path / "two"),
                           "--batch-size", "50"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(tmp_path / "two" / "predictions.h5") as f:
        np.testing.assert_array_equal(f["cluster"][()], one["cluster"])
        np.testing.assert_allclose(f["curves/curve/mean"][()], one["curves"]["curve"][0], rtol=1e-6, atol=1e-6)
        assert json.loads(f.attrs["summary"])["world_size"] == 2
    assert (tmp_path / "two" / "clusters.csv").read_text() == (tmp_path / "one" / "clusters.csv").read_text()
    assert not (tmp_path / "two.partial").exists()


def _error(capsys, argv) -> str:
    assert pima(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pima: error: "), err
    return err[0]


def test_bad_inputs_get_one_line(runs, tmp_path, capsys):
    run, root = str(runs["run"]), runs["root"]
    np.save(tmp_path / "big.npy", np.zeros((4, 9, 9)))
    assert "trained on (1, 8, 8)" in _error(capsys, ["predict", run, str(tmp_path / "big.npy"), "--out", str(tmp_path / "o")])
    assert "not a modality of the run" in _error(capsys, ["predict", run, f"spectrum={root / 'curves.npy'}",
                                                          "--out", str(tmp_path / "o")])
    assert "no finished cross-modal stage" in _error(capsys, ["predict", str(runs["mm_only"]), str(root / "images.npy"),
                                                              "--out", str(tmp_path / "o")])
    np.savez(tmp_path / "short.npz", image=runs["physical"]["image"][:5], curve=runs["physical"]["curve"][:4])
    assert "different sample counts" in _error(capsys, ["predict", run, str(tmp_path / "short.npz"),
                                                        "--out", str(tmp_path / "o")])
    bad = runs["physical"]["image"][:, 0].copy()
    bad[7, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert "sample 7 has NaN" in _error(capsys, ["predict", run, str(tmp_path / "nan.npy"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()  # nothing half-written
    assert "not a run directory" in _error(capsys, ["predict", str(tmp_path), str(root / "images.npy"),
                                                    "--out", str(tmp_path / "o")])
    _predict(runs, tmp_path / "done", root / "images.npy")
    assert "already exists" in _error(capsys, ["predict", run, str(root / "images.npy"), "--out", str(tmp_path / "done")])
    _predict(runs, tmp_path / "done", root / "images.npy", extra=["--overwrite"])


def test_unknown_normalisation_is_named(runs, tmp_path, capsys):
    """A checkpoint without stored specs whose training data is gone: the units are unknown."""
    import shutil

    from pima_hpc.train.checkpoint import load_checkpoint, save_checkpoint
    old = tmp_path / "old"
    shutil.copytree(runs["run"], old)
    for ckpt in (old / "checkpoints").glob("*.pt"):
        payload = load_checkpoint(ckpt)
        payload.pop("spec")
        save_checkpoint(ckpt, payload)
    import yaml
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    cfg["data"].update(source="hdf5", path=str(tmp_path / "gone.h5"))
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    msg = _error(capsys, ["predict", str(old), str(runs["root"] / "images.npy"), "--out", str(tmp_path / "o")])
    assert "normalisation" in msg and "gone.h5" in msg
