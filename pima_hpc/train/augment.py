"""Images moved at random for the encoders (``train.augment: affine``): a rotation within 10 degrees and a shift
within 10 % of each side per image (the moves of DEC-DA's augmentation, Guo et al. 2018).

The encoders see the moved image; every likelihood (the decoders' reconstruction, the ELBO) scores the image as
stored. That is a denoising autoencoder whose noise is a small move: the code keeps a digit's shape and drops its
pose. The moves are drawn once per epoch for every sample of the split, indexed by global sample index, so they do
not depend on which rank reads a sample (N ranks train as one process) and a resumed epoch repeats them.
Evaluation, the EM pass and precise BatchNorm read the stored images; with ``train.statistics: streaming`` the EM
statistics are the training steps' own codes, so they come from the moved images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

AUGMENT_DEGREES = 10.0
AUGMENT_SHIFT = 0.1
# Streams of draws: the pre-training's and the training's moves differ for the same epoch number.
PRETRAIN_STREAM, TRAIN_STREAM = 37, 41


def random_moves(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles (n,) in radians within +-AUGMENT_DEGREES and shifts (n, 2) within +-AUGMENT_SHIFT of each side, in
    affine_grid's coordinates (they span [-1, 1], so a shift by a share s of the side is 2 s); float64."""
    angle = (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1) * math.radians(AUGMENT_DEGREES)
    shift = (2 * torch.rand(n, 2, generator=generator, dtype=torch.float64) - 1) * 2 * AUGMENT_SHIFT
    return angle, shift


def epoch_moves(augment: str, n_global: int, seed: int, epoch: int, stream: int):
    """One move per sample of a split of ``n_global`` samples for this epoch (the same on every rank), or None
    with ``augment="none"``."""
    if augment == "none":
        return None
    return random_moves(n_global, torch.Generator().manual_seed(seed + stream + 1009 * epoch))


def move_images(x: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) rotated by ``angle`` (N,) about its centre and shifted by ``shift`` (N, 2)
    (x, y in affine_grid's coordinates), bilinear, the border values carried outward."""
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def moved_batch(batch: dict[str, torch.Tensor], image_names, global_indices: np.ndarray,
                moves: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The batch the encoders see: its images moved by the moves of its samples (``global_indices``), the curves
    as they are; the batch itself when ``moves`` is None."""
    if moves is None:
        return batch
    rows = torch.as_tensor(np.asarray(global_indices), dtype=torch.long)
    return {n: move_images(v, moves[0][rows], moves[1][rows]) if n in image_names else v for n, v in batch.items()}
