"""train.augment=affine (pima_hpc/train/augment.py): the moves are the rotations and shifts they claim to be
(exact against torch.rot90 and a pixel shift) and stay within their bounds; the encoders read the moved images
while every likelihood scores the stored ones; pre-training and training with them repeat exactly and differ from
runs without them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pima_hpc.config import ConfigError, load_config
from pima_hpc.model import elbo
from pima_hpc.train.augment import (AUGMENT_DEGREES, AUGMENT_SHIFT, TRAIN_STREAM, epoch_moves, move_images,
                                    moved_batch, random_moves)
from pima_hpc.train.pretrain import pretrain_autoencoder
from pima_hpc.train.run import train_from_config
from pima_hpc.train.trainer import Trainer


def _images(n=3, size=28, seed=0):
    """Random images whose border rows and columns are zero, so 'border' padding and zeros agree."""
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[..., :4, :] = x[..., -4:, :] = x[..., :, :4] = x[..., :, -4:] = 0.0
    return x


def test_a_quarter_turn_is_rot90():
    x = _images()
    out = move_images(x, torch.full((3,), math.pi / 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    # output pixel (i, j) samples the input at the point rotated by +90 degrees: rot90 over (H, W) with k=1
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(2, 3)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("pixels", [1, 3])
def test_a_shift_of_whole_pixels_moves_the_image_by_those_pixels(pixels):
    x = _images()
    size = x.shape[-1]
    shift = torch.tensor([[2.0 * pixels / size, 0.0], [0.0, 2.0 * pixels / size], [2.0 * pixels / size] * 2],
                         dtype=torch.float64)  # affine_grid units: the side spans 2
    out = move_images(x, torch.zeros(3, dtype=torch.float64), shift)
    # output pixel j samples input pixel j + pixels, so the content moves by -pixels
    torch.testing.assert_close(out[0], torch.roll(x[0], -pixels, dims=2), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[1], torch.roll(x[1], -pixels, dims=1), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[2], torch.roll(x[2], (-pixels, -pixels), dims=(1, 2)), atol=1e-12, rtol=0)


def test_random_moves_fill_their_bounds_and_repeat():
    angle, shift = random_moves(20000, torch.Generator().manual_seed(5))
    bound = math.radians(AUGMENT_DEGREES)
    assert angle.abs().max() <= bound and angle.abs().max() > 0.99 * bound
    assert shift.abs().max() <= 2 * AUGMENT_SHIFT and shift.abs().max() > 0.99 * 2 * AUGMENT_SHIFT
    assert abs(float(angle.mean())) < 0.01 * bound  # centred: no turn preferred
    again = random_moves(20000, torch.Generator().manual_seed(5))
    assert torch.equal(angle, again[0]) and torch.equal(shift, again[1])


def _pretrained(tmp_path, augment):
    cfg = load_config("configs/digits.yaml", ["data.modalities=[image]", "train.init=pretrain",
                                              f"run_dir={tmp_path}", "train.progress=false"])
    trainer = Trainer(cfg)
    model, reader, t = trainer.model, trainer.train_data, cfg.train
    torch.manual_seed(0)
    info = pretrain_autoencoder(model, reader, trainer.ctx, 2, t.batch_size, t.lr, 0, augment=augment)
    return info["pretrain_losses"], [p.detach().clone() for p in model.encoders.parameters()]


def test_pretraining_with_moves_repeats_exactly_and_differs_from_none(tmp_path):
    moved, weights = _pretrained(tmp_path / "a", "affine")
    again, weights_again = _pretrained(tmp_path / "b", "affine")
    plain, _ = _pretrained(tmp_path / "c", "none")
    assert moved == again and all(torch.equal(a, b) for a, b in zip(weights, weights_again))
    assert moved != plain


def test_unknown_augment_is_a_config_error():
    with pytest.raises(ConfigError, match="train.augment"):
        load_config("configs/digits.yaml", ["train.augment=mixup"])


def test_augment_without_images_is_a_config_error(tmp_path):
    cfg = load_config("configs/digits.yaml", [f"run_dir={tmp_path}", "data.modalities=[curve]", "train.augment=affine"])
    with pytest.raises(ConfigError, match="train.augment.*set train.augment=none"):
        Trainer(cfg)
    assert not (tmp_path / "checkpoints").exists()  # nothing half-written


def test_no_moves_leave_the_batch_as_it_is():
    batch = {"image": _images()}
    assert epoch_moves("none", 3, 0, 0, TRAIN_STREAM) is None
    assert moved_batch(batch, ["image"], [0, 1, 2], None) is batch


def test_the_encoders_read_the_moved_images_and_the_likelihood_scores_the_stored_ones(tmp_path):
    cfg = load_config("configs/digits.yaml", [f"run_dir={tmp_path}", "train.progress=false"])
    trainer = Trainer(cfg)
    model, reader = trainer.model.eval(), trainer.train_data
    idx = reader.indices[:16]
    batch = reader.read_batch(idx)
    moved = moved_batch(batch, model.image_names, idx, epoch_moves("affine", reader.num_global, 0, 0, TRAIN_STREAM))
    assert not torch.equal(moved["image"], batch["image"])
    assert all(torch.equal(moved[n], batch[n]) for n in model.curve_names)  # curves are never moved
    with torch.no_grad():
        terms = model(batch, torch.Generator().manual_seed(3), seen=moved)
        # by hand: the code of the moved images, its sample, the stored images' likelihood
        mu, logvar = model.encode(moved)
        z = elbo.reparameterize(mu, logvar, torch.Generator().manual_seed(3))
        recon = model.recon_log_likelihood("image", batch["image"], model.decoders["image"](z))
        plain_mu, _ = model.encode(batch)
    torch.testing.assert_close(terms["recon"], recon)
    torch.testing.assert_close(terms["entropy_z"], elbo.entropy_q_z(logvar))
    assert not torch.allclose(mu, plain_mu)  # the code is the moved images', not the stored ones'


def _trained(run_dir, augment):
    cfg = load_config("configs/digits.yaml", [f"run_dir={run_dir}", "train.progress=false", "figures=false",
                                              "data.modalities=[image]", "train.init=pretrain", "train.epochs=1",
                                              "train.pretrain_epochs=1", f"train.augment={augment}"])
    assert train_from_config(cfg) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics["init"]["pretrain_losses"], [h["train_elbo"] for h in metrics["history"] if "train_elbo" in h]


def test_training_with_moves_repeats_exactly_and_differs_from_none(tmp_path):
    moved, again, plain = (_trained(tmp_path / name, aug) for name, aug in
                           (("a", "affine"), ("b", "affine"), ("c", "none")))
    assert moved == again
    assert moved[0] != plain[0] and moved[1] != plain[1]
