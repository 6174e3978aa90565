"""Experiment tracking: history.csv, TensorBoard event files read back with tensorboard's own reader, and
MLflow (file store) continuing the same run after the run directory is resumed."""

from __future__ import annotations

import csv
import json

import pytest

from pima_hpc.config import load_config
from pima_hpc.train.run import train_from_config


def _train(run_dir, *extra):
    cfg = load_config("configs/digits.yaml", [f"run_dir={run_dir}", "train.progress=false", "train.epochs=2",
                                              "crossmodal.epochs=2", *extra])
    assert train_from_config(cfg) == 0
    return json.loads((run_dir / "metrics.json").read_text())


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}, tags["images"]


def test_history_csv_and_tensorboard_after_a_resumed_run(tmp_path):
    run = tmp_path / "run"
    _train(run, "stages=[multimodal]", "figures=false")
    # the same run directory again, adding the cross-modal stage: a second writer resumes the records
    metrics = _train(run, "stages=[multimodal,crossmodal]")
    history = metrics["history"]
    assert [h.get("stage", "multimodal") for h in history] == ["multimodal"] * 2 + ["crossmodal"] * 2

    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["stage"] for r in rows] == ["multimodal", "multimodal", "crossmodal", "crossmodal"]
    assert float(rows[1]["val_elbo"]) == pytest.approx(history[1]["val_elbo"])
    assert rows[2]["val_elbo"] == "" and float(rows[3]["kl_image"]) == pytest.approx(history[3]["kl_image"])

    scalars, images = _scalars(run)
    # every epoch once (the re-logged last epoch replaced, not duplicated), on one step axis
    assert [s for s, _ in scalars["multimodal/train_elbo"]] == [1, 2]
    assert [v for _, v in scalars["multimodal/val_accuracy"]] == pytest.approx([h["val_accuracy"] for h in history[:2]])
    assert [s for s, _ in scalars["crossmodal/kl_curve"]] == [3, 4]
    assert scalars["test/multimodal"][0][1] == pytest.approx(metrics["multimodal"]["test"]["accuracy"])
    assert "figures/latent" in images and "figures/crossmodal_image_to_curve" in images


def test_no_tensorboard_when_switched_off(tmp_path):
    _train(tmp_path / "run", "logging.tensorboard=false", "figures=false", "stages=[multimodal]")
    assert not (tmp_path / "run" / "tensorboard").exists() and (tmp_path / "run" / "history.csv").is_file()


def test_mlflow_resumes_into_the_same_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="MLflow is optional (pip install mlflow-skinny)")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store: no server in a unit test
    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "run"
    common = [f"logging.mlflow={uri}", "logging.mlflow_experiment=unit", "figures=false"]
    _train(run, "stages=[multimodal]", *common)
    metrics = _train(run, "stages=[multimodal,crossmodal]", *common)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("unit")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "a resumed run directory must continue its MLflow run"
    elbo = client.get_metric_history(runs[0].info.run_id, "multimodal/train_elbo")
    assert sorted({m.step for m in elbo}) == [1, 2]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "crossmodal/kl_image")] == [3, 4]
    assert runs[0].data.params["model.n_clusters"] == "10"
    assert runs[0].data.metrics["test/multimodal"] == pytest.approx(metrics["multimodal"]["test"]["accuracy"])


def test_mlflow_missing_is_a_config_error(tmp_path, monkeypatch):
    import builtins

    from pima_hpc.errors import ConfigError
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    cfg = load_config("configs/digits.yaml", [f"run_dir={tmp_path / 'run'}", "logging.mlflow=file:///nowhere",
                                              "train.epochs=1", "stages=[multimodal]", "figures=false"])
    with pytest.raises(ConfigError, match="logging.mlflow.*not installed"):
        train_from_config(cfg)
