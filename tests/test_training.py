"""Short real training runs on the embedded digits: accuracy, cross-modal stage, resume, outputs."""

import json

import numpy as np
import pytest
import torch

from pima_hpc.config import load_config
from pima_hpc.train.trainer import Trainer


def _cfg(tmp_path, *extra):
    return load_config("configs/digits.yaml", [f"run_dir={tmp_path}", "train.progress=false", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits")
    cfg = _cfg(run)  # configs/digits.yaml as shipped: 10 + 40 epochs
    trainer = Trainer(cfg)
    metrics = trainer.run()
    return trainer, metrics, run


def test_multimodal_accuracy_on_held_out_digits(trained):
    _, metrics, _ = trained
    # Embedded digits, 10 epochs: the clean curve makes the clusters; >= 97% held out (measured 99.4%).
    assert metrics["multimodal"]["test"]["accuracy"] >= 0.97
    assert metrics["multimodal"]["val"]["accuracy"] >= 0.95
    slopes = sorted(metrics["experts"]["curve"]["slope"])
    np.testing.assert_allclose(slopes, np.arange(10), atol=0.05)  # the physics: theta_c = c


def test_crossmodal_single_modality_accuracy(trained):
    _, metrics, _ = trained
    # Measured on this config: curve alone 100%, image alone 97.5% with the cluster heads and precise
    # BatchNorm statistics; the paper's p(c|z=mu~) path measured 92% and 71% (docs/method.md).
    assert metrics["crossmodal_curve"]["test"]["accuracy"] >= 0.97
    assert metrics["crossmodal_image"]["test"]["accuracy"] >= 0.93
    assert {"crossmodal_latent_curve", "crossmodal_latent_image"} <= set(metrics)
    assert metrics["bayes_curve"]["test"]["accuracy"] >= 0.99  # eq 19 on clean curves


def test_run_directory_outputs(trained):
    _, metrics, run = trained
    assert (run / "config.yaml").is_file()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["multimodal"]["test"]["accuracy"] == metrics["multimodal"]["test"]["accuracy"]
    figs = {p.name for p in (run / "figures").glob("*.png")}
    assert {"latent.png", "experts_curve.png", "generated_image.png", "confusion_multimodal.png",
            "crossmodal_image_to_curve.png"} <= figs
    assert list((run / "checkpoints").glob("ckpt-*.pt"))


def test_evaluation_is_deterministic(trained):
    trainer, _, _ = trained
    batch = trainer.test_data.read_batch(trainer.test_data.indices[:64])
    a = trainer.model.predict(batch)
    b = trainer.model.predict(batch)
    assert torch.equal(a, b)
    # eval mode throughout: a sample's cross-modal prediction does not depend on its batch
    for name in trainer.spec.names:
        predict = trainer.evaluator.crossmodal_predict
        whole = predict(batch, name)
        alone = torch.cat([predict({name: batch[name][i:i + 1]}, name) for i in range(8)])
        assert torch.equal(whole[:8], alone)


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    """Resume a 3-epoch run from its epoch-2 checkpoint: bitwise the parameters of the run straight through."""
    straight = Trainer(_cfg(tmp_path / "a", "train.epochs=3", "stages=[multimodal]", "figures=false",
                            "train.keep_checkpoints=10"))
    straight.run()
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("ckpt-multimodal-e0002-*.pt"))
    assert ckpts
    import shutil
    resumed_dir = tmp_path / "c"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpts[0], resumed_dir / "checkpoints" / ckpts[0].name)
    resumed = Trainer(_cfg(resumed_dir, "train.epochs=3", "stages=[multimodal]", "figures=false",
                           "train.keep_checkpoints=10"))
    resumed.run()
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in t.state.history] for t in (straight, resumed)]
    assert len(untimed[0]) == 3 and untimed[0] == untimed[1]  # epoch 3's metrics too, not only the weights
    for (k, v), (k2, v2) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_loader_workers_train_exactly_as_the_training_process(tmp_path):
    """data.num_workers=2: both stages read their batches in DataLoader workers, and the run is
    bitwise the one that reads them itself (same batches, same order)."""
    def history(name, *extra):
        trainer = Trainer(_cfg(tmp_path / name, "train.epochs=2", "crossmodal.epochs=1", "figures=false", *extra))
        trainer.run()
        return [{k: v for k, v in h.items() if k != "seconds"} for h in trainer.state.history], trainer.model

    plain, plain_model = history("plain")
    workers, workers_model = history("workers", "data.num_workers=2")
    assert len(plain) == 3 and plain == workers
    for (k, v), (_, v2) in zip(plain_model.state_dict().items(), workers_model.state_dict().items()):
        assert torch.equal(v, v2), k


def test_bf16_autocast_runs_the_networks_in_bf16_and_the_elbo_in_float32(tmp_path):
    """train.precision=bf16: under autocast the networks' outputs are bfloat16, the ELBO terms the
    model returns are float32 and within bf16's rounding of the fp32 terms; a short run trains."""
    trainer = Trainer(_cfg(tmp_path / "unit", "stages=[multimodal]", "figures=false"))
    model = trainer.model.eval()
    batch = trainer.train_data.read_batch(trainer.train_data.indices[:64])
    name = model.image_names[0]
    with torch.no_grad():
        exact = model(batch, torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.encoders[name](batch[name])[0].dtype == torch.bfloat16
            low = model(batch, torch.Generator().manual_seed(0))
    for k, v in exact.items():
        assert low[k].dtype == torch.float32, k
        np.testing.assert_allclose(low[k].numpy(), v.numpy(), rtol=0.05, atol=0.05 * float(v.abs().mean()) + 1e-6,
                                   err_msg=k)
    short = Trainer(_cfg(tmp_path / "run", "train.epochs=2", "crossmodal.epochs=1", "figures=false",
                         "train.precision=bf16"))
    metrics = short.run()
    assert all(np.isfinite(v) for h in short.state.history for k, v in h.items() if k != "stage")
    assert metrics["multimodal"]["test"]["accuracy"] > 0.5


def test_tf32_on_cpu_is_a_config_error(tmp_path):
    from pima_hpc.errors import ConfigError
    with pytest.raises(ConfigError, match="tf32 is a mode of CUDA"):
        Trainer(_cfg(tmp_path, "train.precision=tf32"))
