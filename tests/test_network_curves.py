"""`model.network_curves`: a curve decoded from z by a network (the paper's black-box decoder) instead of a
physics expert. Its likelihood is eq 12's Gaussian (checked against scipy), it has no expert, it trains in
both stages, and `pima predict` returns it decoded from the given modality, in physical units."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from scipy.stats import norm

from pima_hpc.cli import main as pima
from pima_hpc.config import load_config
from pima_hpc.data.digits import build_digits
from pima_hpc.errors import ConfigError
from pima_hpc.model.pima import PIMA
from pima_hpc.predict.trained import load_run_config, load_trained_run


def _model(*overrides) -> tuple[PIMA, dict]:
    spec, arrays = build_digits()
    cfg = load_config("configs/digits.yaml", list(overrides))
    torch.manual_seed(0)
    batch = {n: torch.as_tensor(arrays["train"][n][:16], dtype=torch.float32) for n in spec.names}
    return PIMA(spec, cfg.model), batch


def test_network_curve_adds_eq12_gaussian_and_no_expert():
    model, batch = _model("model.network_curves=[curve]")
    assert model.curve_names == [] and model.network_curve_names == ["curve"] and "curve" in model.decoders
    assert model.decoded_names == ["image", "curve"] and model.experts == {}
    model.set_recon_variance("curve", 0.3 ** 2)
    model.eval()
    with torch.no_grad():
        mu, logvar = model.encode(batch)
        means = model.decode(mu)
        terms = model._elbo_terms(batch, mu, logvar, mu, means, None, False)
    x, xhat = batch["curve"].double().numpy(), means["curve"].double().numpy()
    expected_curve = norm.logpdf(x, loc=xhat, scale=0.3).sum(1)
    image = model.recon_log_likelihood("image", batch["image"], means["image"]).double().numpy()
    np.testing.assert_allclose(terms["recon"].double().numpy(), image + expected_curve, rtol=1e-5)
    assert torch.all(terms["expert"] == 0)


def test_unknown_network_curve_names_the_key():
    with pytest.raises(ConfigError, match="model.network_curves.*'image'.*not curve modalities"):
        _model("model.network_curves=[image]")
    with pytest.raises(ConfigError, match="model.network_curves"):
        load_config("configs/digits.yaml", ["model.network_curves=[curve,curve]"])


def test_network_curve_trains_and_is_predicted_from_the_image(tmp_path):
    run = tmp_path / "net"
    assert pima(["train", "configs/digits.yaml", f"run_dir={run}", "model.network_curves=[curve]",
                 "model.image_noise=learned", "train.init=pretrain", "train.epochs=2", "crossmodal.epochs=2",
                 "train.progress=false", "figures=false"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "curve" not in metrics["experts"] and 0 < metrics["network_curve_noise_std"]["curve"] < 1
    spec, arrays = build_digits()
    test = arrays["test"]
    images = spec["image"].to_physical(test["image"].astype(np.float64))
    np.save(tmp_path / "images.npy", images[:, 0])
    assert pima(["predict", str(run), str(tmp_path / "images.npy"), "--out", str(tmp_path / "p")]) == 0
    trained = load_trained_run(load_run_config(run), torch.device("cpu"))
    with torch.no_grad():
        x = torch.as_tensor(spec["image"].to_normalised(images), dtype=torch.float32)
        z, _ = trained.crossmodal("image", x)
        mean, var = trained.model.decoded_curve("curve", z)
    with h5py.File(tmp_path / "p" / "predictions.h5") as f:
        got_mean, got_sd = f["curves/curve/mean"][()], f["curves/curve/sd"][()]
    np.testing.assert_allclose(got_mean, mean.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_sd, var.sqrt().numpy(), rtol=1e-5, atol=1e-7)
    truth = spec["curve"].to_physical(test["curve"].astype(np.float64))
    # the image carries its digit's slope: after 2 + 2 epochs R^2 is 0.56 here (the mean curve: 0)
    assert np.mean((got_mean - truth) ** 2) < 0.6 * np.mean((truth.mean(0) - truth) ** 2)
    # evaluation reports the same prediction's quality (R^2 over every point, physical units)
    quality = metrics["crossmodal_quality"]["image_to_curve"]["test"]
    spread = ((truth - truth.mean(0)) ** 2).sum()
    assert quality["r2"] == pytest.approx(1 - ((got_mean - truth) ** 2).sum() / spread, rel=1e-4)
