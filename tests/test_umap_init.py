"""The UMAP-embedded initialisation (train.pretrain_embedding=umap, pima_hpc/train/pretrain.py): it finds
clusters a Gaussian mixture on the codes cannot, its prior is the M-step of its responsibilities, it never
reads labels, and a missing umap-learn is one config error before any training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.mixture import GaussianMixture

from pima_hpc.config import ConfigError, load_config
from pima_hpc.train.pretrain import (fit_latent_mixture, mean_log_likelihood, mixture_from_responsibilities,
                                     most_reproducible, pretrain_autoencoder, restart_seeds, umap_mixture,
                                     umap_mixtures)
from pima_hpc.train.run import train_from_config
from pima_hpc.train.trainer import Trainer


def _accuracy(y, p, k):
    m = np.zeros((k, k))
    np.add.at(m, (p, y), 1)
    r, c = linear_sum_assignment(-m)
    return m[r, c].sum() / len(y)


def _rings(n=600, seed=0):
    """Two concentric noisy rings in 2-D: separated by neighbourhoods, not by any pair of Gaussians."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat([0, 1], n // 2))
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = np.where(y == 0, 1.0, 3.0) + 0.1 * rng.standard_normal(n)
    return np.c_[radius * np.cos(angle), radius * np.sin(angle)], y


def test_umap_mixture_separates_rings_a_gaussian_mixture_cannot():
    x, y = _rings()
    gmm = GaussianMixture(2, covariance_type="diag", n_init=3, random_state=0).fit(x)
    assert _accuracy(y, gmm.predict(x), 2) < 0.75
    resp = umap_mixture(x, 2, seed=0, neighbors=15)
    assert resp.shape == (len(x), 2) and np.allclose(resp.sum(1), 1.0)
    assert _accuracy(y, resp.argmax(1), 2) > 0.99
    assert np.array_equal(umap_mixture(x, 2, seed=0, neighbors=15), resp)  # deterministic for a seed
    # restarts run one after another in one child; each is what its random state gives alone
    again = umap_mixtures(x, 2, [1000, 0], neighbors=15)
    assert np.array_equal(again[1], resp) and np.array_equal(again[0], umap_mixture(x, 2, seed=1000, neighbors=15))


def test_umap_child_is_killed_on_a_stop_and_its_failure_is_one_error(tmp_path):
    """A stop request ends the UMAP child at once (None, no orphan); a failure in the child is a RuntimeError
    carrying its traceback, not a hang or a bare end of file."""
    import multiprocessing
    import time
    x, _ = _rings()
    tic = time.monotonic()
    assert umap_mixtures(x, 2, [0, 1000, 2000], neighbors=15, stop_requested=lambda: True, poll_s=0.05) is None
    assert time.monotonic() - tic < 5  # numba's compilation alone takes longer: the child did not finish
    assert not multiprocessing.active_children()
    with pytest.raises(RuntimeError, match=r"UMAP failed in its child process:\n(.|\n)*Traceback"):
        umap_mixtures(x[:3], 2, [0], neighbors=15)  # fewer points than neighbours: UMAP cannot embed them
    # a child that dies before it has read its arguments (here: a script without the __main__ guard, which the
    # spawned child runs again) is an error at once; with megabytes of codes among its arguments it used to hang
    script = tmp_path / "unguarded.py"
    script.write_text("import numpy as np\nfrom pima_hpc.train.pretrain import umap_mixtures\n"
                      "umap_mixtures(np.random.default_rng(0).normal(size=(20000, 10)), 2, [0], neighbors=5)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0 and "the UMAP child process died (exit code 1)" in proc.stderr, proc.stderr[-2000:]
    # a child that has sent its result exits on its own: killed then, its semaphore (joblib's) would leak
    script.write_text("import numpy as np\nfrom pima_hpc.train.pretrain import umap_mixtures\nif __name__ == '__main__':\n"
                      "    umap_mixtures(np.random.default_rng(0).normal(size=(300, 3)), 2, [0], neighbors=5)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "leaked" not in proc.stderr, proc.stderr[-2000:]


def test_prior_is_the_m_step_of_the_responsibilities():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3))
    resp = rng.dirichlet(np.ones(4), size=200)
    fit = mixture_from_responsibilities(x, resp, reg=0.0)
    for c in range(4):
        w = resp[:, c]
        mean = np.average(x, axis=0, weights=w)
        assert np.allclose(fit["means"][c], mean, atol=1e-12)
        assert np.allclose(fit["covariances"][c], np.average((x - mean) ** 2, axis=0, weights=w), atol=1e-12)
    assert np.allclose(fit["weights"], resp.mean(0))
    # its log-likelihood is scikit-learn's for the same diagonal mixture
    gmm = GaussianMixture(4, covariance_type="diag")
    gmm.weights_, gmm.means_, gmm.covariances_ = fit["weights"], fit["means"], fit["covariances"]
    gmm.precisions_cholesky_ = 1 / np.sqrt(fit["covariances"])
    assert mean_log_likelihood(x, fit) == pytest.approx(gmm.score(x), rel=1e-12)


def _cfg(run_dir, *extra):
    return load_config("configs/digits.yaml", [f"run_dir={run_dir}", "train.progress=false", "figures=false",
                                               "train.epochs=1", "train.pretrain_epochs=2", "train.init=pretrain",
                                               "train.pretrain_embedding=umap", "train.umap_neighbors=10", *extra])


def test_images_alone_train_from_the_umap_start(tmp_path):
    run = tmp_path / "run"
    assert train_from_config(_cfg(run, "data.modalities=[image]", "stages=[multimodal]", "train.pretrain_epochs=10",
                                  "model.image_noise=learned")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["init"]["embedding"] == "umap" and metrics["multimodal"]["test"]["accuracy"] > 0.4


def test_umap_mixture_never_reads_labels(tmp_path, monkeypatch):
    """The pre-training's label-blindness is tested in tests/test_one_modality.py; here the UMAP mixture is fitted
    twice from the same pre-trained model, once with the labels scrambled, and must come out identical."""
    trainer = Trainer(_cfg(tmp_path / "run"))
    t, model, reader = trainer.cfg.train, trainer.model, trainer.train_data
    pretrain_autoencoder(model, reader, trainer.ctx, 2, t.batch_size, t.lr, 0)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def fitted():
        model.load_state_dict(start)
        info = fit_latent_mixture(model, reader, 64, trainer.collective, trainer.device, 0, embedding="umap",
                                  neighbors=10)
        return {k: v.clone() for k, v in model.state_dict().items()}, info
    (a, info), real = fitted(), reader.read_batch
    monkeypatch.setattr(reader, "read_batch", lambda idx: {**real(idx), "label": torch.full((len(idx),), -1)})
    b, _ = fitted()
    assert all(torch.equal(a[k], b[k]) for k in a) and info["embedding"] == "umap"
    means = a["cluster_means"].double()  # the prior is set from the embedding's clusters: no two means coincide
    assert torch.cdist(means, means).add(torch.eye(len(means)) * 1e9).min() > 1e-3
    assert not torch.equal(a["cluster_means"], start["cluster_means"])


def test_umap_missing_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec

    def no_umap(name, *args, **kwargs):  # umap-learn uninstalled, as find_spec sees it
        return None if name == "umap" else real_find_spec(name, *args, **kwargs)
    monkeypatch.setattr(importlib.util, "find_spec", no_umap)
    with pytest.raises(ConfigError, match=r"train.pretrain_embedding.*pima-hpc\[umap\]"):
        umap_mixture(np.zeros((10, 2)), 2, 0, 5)
    with pytest.raises(ConfigError, match=r"train.pretrain_embedding.*pima-hpc\[umap\]"):  # before any training
        Trainer(_cfg(tmp_path / "run"))


def test_bad_embedding_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.pretrain_embedding"):
        _cfg(tmp_path, "train.pretrain_embedding=tsne")


def test_most_reproducible_keeps_the_clustering_its_restarts_agree_on():
    """Four restarts find the three classes (labels permuted, a few points moved); one merged classes 0 and 1 and
    split class 2. The merged one has the lowest mean adjusted Rand index and is never kept."""
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], 100)
    good = []
    for r in range(4):
        p = rng.permutation(3)[truth]
        moved = rng.choice(len(p), 5, replace=False)
        p[moved] = rng.integers(0, 3, 5)
        good.append(p)
    merged = np.where(truth == 1, 0, truth)
    merged[200:250] = 1  # class 2 split in two
    for at in range(5):
        parts = good[:at] + [merged] + good[at:]
        chosen, mean = most_reproducible(parts)
        assert chosen != at and mean[at] == mean.min() and mean.argmax() == chosen
    assert most_reproducible([good[0], good[0].copy(), good[0].copy()])[0] == 0  # ties go to the earlier
    assert most_reproducible([merged])[0] == 0


def test_umap_restarts_keep_one_restart_and_say_which(tmp_path):
    """train.umap_restarts=3: the prior is the M-step of the kept restart's responsibilities (umap_mixture with
    that random state), and the choice is recorded; 2 restarts are one config error."""
    trainer = Trainer(_cfg(tmp_path / "run"))
    t, model, reader = trainer.cfg.train, trainer.model, trainer.train_data
    pretrain_autoencoder(model, reader, trainer.ctx, 2, t.batch_size, t.lr, 0)
    from pima_hpc.collective import gather_subsample
    from pima_hpc.train.pretrain import fused_means
    # the codes the mixture is fitted to (fitting it changes the encoders' variances, so the fused means too)
    sample = gather_subsample(trainer.collective, fused_means(model, reader, 64, trainer.device), 20000)
    info = fit_latent_mixture(model, reader, 64, trainer.collective, trainer.device, 7, embedding="umap",
                              neighbors=10, restarts=3)
    record = info["umap_restarts"]
    assert record["random_states"] == restart_seeds(7, 3) == [7, 1007, 2007] and len(record["mean_ari"]) == 3
    assert record["chosen"] == record["random_states"][int(np.argmax(record["mean_ari"]))]
    fit = mixture_from_responsibilities(sample, umap_mixture(sample, model.cfg.n_clusters, record["chosen"], 10),
                                        full=model.full_covariance)
    assert np.allclose(model.cluster_means.double().numpy(), fit["means"], atol=1e-5)
    with pytest.raises(ConfigError, match="train.umap_restarts"):
        _cfg(tmp_path / "bad", "train.umap_restarts=2")
