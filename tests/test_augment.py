"""train.augment=affine (pima_hpc/train/pretrain.py): the moves are the rotations and shifts they claim
to be (exact against torch.rot90 and a pixel shift), stay within their bounds, and pre-training with them
repeats exactly and differs from pre-training without them."""

from __future__ import annotations

import math

import pytest
import torch

from pima_hpc.config import ConfigError, load_config
from pima_hpc.train.augment import AUGMENT_DEGREES, AUGMENT_SHIFT, move_images, random_moves
from pima_hpc.train.pretrain import pretrain_autoencoder
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
