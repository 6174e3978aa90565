"""One modality (PIMA without fusion, VaDE-like), the initialisation from every modality
(autoencoder pre-training + a Gaussian mixture on the fused means) and calibrated image likelihoods."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pima_hpc.config import ConfigError, load_config
from pima_hpc.train import em
from pima_hpc.train.run import train_from_config
from pima_hpc.train.trainer import Trainer


def _cfg(run_dir, *extra):
    return load_config("configs/digits.yaml", [f"run_dir={run_dir}", "train.progress=false", "figures=false",
                                               "train.epochs=2", "train.pretrain_epochs=2", *extra])


def test_images_alone_train_evaluate_and_predict(tmp_path):
    from pima_hpc.cli import main as pima
    from pima_hpc.data.digits import build_digits
    run = tmp_path / "run"
    assert train_from_config(_cfg(run, "data.modalities=[image]", "train.init=pretrain", "train.pretrain_epochs=10",
                                  "model.image_noise=learned")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(k for k in metrics if isinstance(metrics[k], dict) and "test" in metrics[k]) == {"multimodal"}  # no curve, no cross-modal read-outs
    assert set(metrics["baselines"]) == {"kmeans_image"}
    assert metrics["multimodal"]["test"]["accuracy"] > 0.4  # far above chance (0.1); one cluster would be 0.1
    assert not any(h.get("stage") == "crossmodal" for h in metrics["history"])
    spec, arrays = build_digits()
    np.save(tmp_path / "img.npy", spec["image"].to_physical(arrays["test"]["image"][:, 0].astype(np.float64)))
    assert pima(["predict", str(run), str(tmp_path / "img.npy"), "--out", str(tmp_path / "pred")]) == 0
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())["readout"] == "multimodal"


def test_pretrain_initialisation_never_reads_labels(tmp_path, monkeypatch):
    def initialised(scramble: bool):
        trainer = Trainer(_cfg(tmp_path / f"r{scramble}", "train.init=pretrain"))
        if scramble:
            real = trainer.train_data.read_batch
            monkeypatch.setattr(trainer.train_data, "read_batch",
                                lambda idx: {**real(idx), "label": torch.full((len(idx),), -1)})
        trainer.multimodal.initialise()
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}, trainer.state.init
    (a, info), (b, _) = initialised(False), initialised(True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert info["gmm_converged"] and len(info["pretrain_losses"]) == 2
    assert info["pretrain_losses"][1] < info["pretrain_losses"][0]


def test_learned_image_noise_is_the_mean_squared_residual(tmp_path):
    trainer = Trainer(_cfg(tmp_path / "r", "model.image_noise=learned"))
    model, reader = trainer.model.eval(), trainer.train_data
    em.update_image_noise(model, reader, 64, trainer.collective, trainer.device)
    with torch.no_grad():
        b = reader.read_batch(reader.indices)
        mu, _ = model.encode(b)
        mse = float(((b["image"] - model.decoders["image"](mu)) ** 2).mean())
    var = float(model.log_recon_var_image.exp())
    assert var == pytest.approx(max(mse, 1e-4), rel=1e-5)
    # and the likelihood uses it: log N(x; x_hat, var I) summed over pixels
    x, x_hat = b["image"][:3], model.decoders["image"](mu[:3]).detach()
    d = (x - x_hat).flatten(1)
    expected = -0.5 * (d.shape[1] * np.log(2 * np.pi * var) + (d ** 2).sum(1) / var)
    np.testing.assert_allclose(model.recon_log_likelihood("image", x, x_hat).numpy(), expected.numpy(), rtol=1e-5)


def test_unknown_modality_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.modalities.*no modality 'photo'"):
        Trainer(_cfg(tmp_path / "r", "data.modalities=[photo]"))


def _metrics_without_timing(run_dir) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    for h in m["history"]:
        h.pop("seconds", None)
    return {k: v for k, v in m.items() if k not in ("init", "wall_seconds_this_process")}


def test_auto_initialisation_keeps_the_winner_as_initialised(tmp_path, monkeypatch):
    """train.init=auto tries both seeds, scores each by the validation ELBO after a trial epoch, and then
    trains from the winner exactly as train.init=<winner> would; labels are never read."""
    auto = tmp_path / "auto"
    assert train_from_config(_cfg(auto, "train.init=auto", "crossmodal.epochs=0", "stages=[multimodal]")) == 0
    info = json.loads((auto / "metrics.json").read_text())["init"]
    assert info["method"] == "auto" and set(info["trial_elbo"]) == {"experts", "pretrain"}
    chosen = max(info["trial_elbo"], key=info["trial_elbo"].get)
    assert info["chosen"] == chosen and "validation ELBO" in info["why"]
    plain = tmp_path / "plain"
    assert train_from_config(_cfg(plain, f"train.init={chosen}", "crossmodal.epochs=0", "stages=[multimodal]")) == 0
    assert _metrics_without_timing(auto) == _metrics_without_timing(plain)

    trainer = Trainer(_cfg(tmp_path / "scrambled", "train.init=auto"))
    real = trainer.train_data.read_batch
    monkeypatch.setattr(trainer.train_data, "read_batch", lambda idx: {**real(idx), "label": torch.full((len(idx),), -1)})
    trainer.multimodal.initialise()
    assert trainer.state.init["trial_elbo"] == info["trial_elbo"]


def test_a_stop_during_the_auto_trial_checkpoints_the_model_before_any_candidate(tmp_path):
    from pima_hpc.train.signals import StopRequested
    cfg = _cfg(tmp_path / "r", "train.init=auto")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.signals.requested = True  # as if SIGTERM arrived: the first trial step checkpoints and stops
    with pytest.raises(StopRequested):
        trainer.multimodal.initialise()
    resumed = Trainer(cfg)
    assert resumed.try_resume() and not resumed.state.initialized
    after = resumed.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
