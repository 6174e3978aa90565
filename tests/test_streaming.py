"""train.statistics=streaming (pima_hpc/train/streaming.py): EM statistics and the experts' recursive
least squares gathered inside the training pass, on the embedded digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pima_hpc.config import ConfigError, load_config
from pima_hpc.model.statistics import latent_statistics
from pima_hpc.train.signals import StopRequested
from pima_hpc.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = ["stages=[multimodal]", "train.epochs=3", "train.batch_size=32", "threads=1", "figures=false",
         "train.progress=false", "train.statistics=streaming", "train.rls_sync_steps=4", "logging.tensorboard=false"]


def _cfg(run: Path, *extra: str):
    return load_config(REPO / "configs/digits.yaml", [f"run_dir={run}", *SMALL, *extra])


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_streaming_sums_are_the_training_steps_own_posteriors(tmp_path, monkeypatch):
    """What the pass accumulates is gamma at z = mu of each step's forward, and the experts re-solved
    every rls_sync_steps steps equal the batch solve of exactly those steps' information."""
    trainer = Trainer(_cfg(tmp_path / "r"))
    trainer.multimodal.initialise()
    seen = []
    real_add = trainer.streaming.add

    def spy(model, batch, mu, logvar):
        with torch.no_grad():
            gamma = model.cluster_log_posterior(batch, mu, logvar, mu).exp().double().numpy()
        seen.append((gamma, mu.detach().double().numpy(), logvar.detach().exp().double().numpy(),
                     model.spec["curve"].to_physical(batch["curve"].double().numpy())))
        real_add(model, batch, mu, logvar)

    solves = []
    real_solve = trainer.streaming.solve_experts
    monkeypatch.setattr(trainer.streaming, "add", spy)
    monkeypatch.setattr(trainer.streaming, "solve_experts",
                        lambda *a, **k: (real_solve(*a, **k), solves.append(trainer.model.theta("curve").copy())))
    trainer.multimodal.train_epoch(0)
    steps = len(seen)
    assert steps > 4 and len(solves) == (steps - 1) // 4  # mid-epoch syncs only; the epoch's end syncs in EM
    # the experts after the first sync: weighted least squares of the first 4 steps' curves
    gamma = np.concatenate([s[0] for s in seen[:4]])
    x = np.concatenate([s[3] for s in seen[:4]])
    t = trainer.model.experts["curve"].t
    slope = (gamma.T @ x @ t) / (gamma.sum(0) * (t @ t) + trainer.cfg.train.ridge)
    np.testing.assert_allclose(solves[0][:, 0], slope, rtol=1e-10)
    trainer.streaming.sync(trainer.collective)
    expected = latent_statistics(np.concatenate([s[0] for s in seen]), np.concatenate([s[1] for s in seen]),
                                 np.concatenate([s[2] for s in seen]))
    for k, v in expected.items():
        np.testing.assert_allclose(trainer.streaming.latent[k], v, rtol=1e-12)


def test_streaming_run_learns_the_slopes_and_resumes_bitwise_after_a_mid_epoch_stop(tmp_path, monkeypatch):
    ref = Trainer(_cfg(tmp_path / "ref"))
    metrics = ref.run()
    ref.close()
    np.testing.assert_allclose(sorted(metrics["experts"]["curve"]["slope"]), np.arange(10), atol=0.05)
    assert metrics["multimodal"]["test"]["accuracy"] > 0.5

    interrupted = Trainer(_cfg(tmp_path / "run"))
    calls = {"n": 0}
    real_add = interrupted.streaming.add

    def stop_after_some_steps(*args):
        real_add(*args)
        calls["n"] += 1
        if calls["n"] == 50:  # in the second epoch, between two syncs: pending sums are saved
            interrupted.signals.requested = True

    monkeypatch.setattr(interrupted.streaming, "add", stop_after_some_steps)
    with pytest.raises(StopRequested):
        interrupted.run()
    interrupted.close()
    saved = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("ckpt-multimodal-e0001-*.pt"))[-1],
                       weights_only=True)
    assert saved["state"]["step"] > 0 and "pending" in saved["streaming"]
    resumed = Trainer(_cfg(tmp_path / "run"))
    resumed.run()
    resumed.close()
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
    assert drop(a.pop("history")) == drop(b.pop("history"))
    for k in ("wall_seconds_this_process",):
        a.pop(k), b.pop(k)
    assert a == b


def test_streaming_needs_an_expert_with_an_information_form(tmp_path, monkeypatch):
    from pima_hpc.model import experts

    class Opaque(experts.Expert):
        param_names = ("slope",)

        def evaluate(self, theta):
            return np.asarray(theta)[..., :1] * self.t

        def solve_fixed(self, s0, s1, ridge):
            return (s1 @ self.t / (s0 * (self.t @ self.t)))[:, None]

    monkeypatch.setitem(experts.EXPERTS, "opaque_test", Opaque)
    Opaque.name = "opaque_test"
    with pytest.raises(ConfigError, match="streaming needs experts with an information form"):
        Trainer(_cfg(tmp_path / "r", "model.expert=opaque_test"))
