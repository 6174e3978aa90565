"""`pima data ...` end to end: build, inspect, errors (exit 2, nothing left), and the trainer reads it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_data_mnist import fake_mnist

from pima_hpc.data import describe, open_split


def pima(argv):
    from pima_hpc.cli import main
    return main(argv)


def test_module_entry_point(tmp_path):
    """`python -m pima_hpc data ...` is `pima data ...` (for machines where the script is not on PATH)."""
    out = tmp_path / "a.h5"
    run = subprocess.run([sys.executable, "-m", "pima_hpc", "data", "lattice", "--n", "3", "--size", "16", "--augment",
                          "none", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    bad = subprocess.run([sys.executable, "-m", "pima_hpc", "data", "info", str(tmp_path / "missing.h5")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("pima: error: ") and "missing.h5: no such file" in bad.stderr


def test_lattice_and_info(tmp_path, capsys):
    out = tmp_path / "lat"
    assert pima(["data", "lattice", "--n", "6", "--size", "32", "--augment", "quadrants", "--shard-size", "8",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "6/6" in err  # tqdm progress on stderr
    assert {s: v.count for s, v in describe(out).splits.items()} == {"train": 20, "test": 4}
    assert pima(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shard directory" in text and "checksums OK" in text and "gyroid:" in text
    assert "x_norm = (x - 0) /" in text and "ground truth:" in text
    assert pima(["data", "info", str(out), "--json", "--no-verify"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["count"] == 20 and summary["verified"] is False
    assert [m["name"] for m in summary["modalities"]] == ["image", "curve"]


def test_mnist_command(tmp_path, capsys):
    src = fake_mnist(tmp_path / "idx")
    out = tmp_path / "m.h5"
    assert pima(["data", "mnist", "--idx-dir", str(src), "--noise", "noisy", "--out", str(out), "--quiet"]) == 0
    assert describe(out).provenance["curve_noise_std"] == 0.5
    assert pima(["data", "mnist", "--idx-dir", str(src), "--noise", "0.2", "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_convert_command(tmp_path):
    from PIL import Image
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (9, 9)).astype(np.uint8)).save(d / f"s{i}.png")
    np.save(tmp_path / "c.npy", rng.normal(size=(10, 5)))
    out = tmp_path / "mine.h5"
    assert pima(["data", "convert", "--images", str(d), "--curves", str(tmp_path / "c.npy"), "--t", "0:1",
                 "--out", str(out), "--quiet", "--val-fraction", "0.2"]) == 0
    assert set(describe(out).splits) == {"train", "val", "test"}


@pytest.mark.parametrize("argv, message", [
    (["data", "lattice", "--n", "1", "--out", "{tmp}/x.h5"], "--n must be >= 2"),
    (["data", "lattice", "--n", "4", "--out", "{tmp}/x"], "needs a .h5 suffix"),
    (["data", "mnist", "--idx-dir", "{tmp}/nowhere", "--out", "{tmp}/x.h5"], "no such directory"),
    (["data", "info", "{tmp}/notes.txt"], "no such file or directory"),
    (["data", "convert", "--images", "{tmp}", "--curves", "{tmp}/c.csv", "--out", "{tmp}/x.h5"], "no image files"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert pima(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pima: error:") and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_trainer_reads_built_dataset(tmp_path):
    import pima_hpc.train.trainer as trainer_mod  # the project's own module: never a reason to skip
    from pima_hpc.config import load_config
    from pima_hpc.train.splits import has_split, open_run_split
    src = fake_mnist(tmp_path / "idx", n_train=400, n_test=100)
    out = tmp_path / "m"
    assert pima(["data", "mnist", "--idx-dir", str(src), "--out", str(out), "--shard-size", "128", "--quiet"]) == 0
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source=hdf5", f"data.path={out}",
                             "data.in_memory='no'", "train.epochs=1", "train.batch_size=64", "train.progress=false",
                             "stages=[multimodal]", "figures=false", "model.n_clusters=10"])
    train = open_run_split(cfg.data, "train", 1, 2)
    assert len(train) == 180 and has_split(cfg.data, "val") and has_split(cfg.data, "test")
    metrics = trainer_mod.Trainer(cfg).run()
    assert np.isfinite(metrics["multimodal"]["test"]["accuracy"])
    assert open_split(out, "test").num_global == 100
