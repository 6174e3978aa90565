"""train.precision: the arithmetic the networks use in training steps (fp32, bf16 autocast, TF32).

Only the networks' forward passes change: the model casts their outputs to float32 and computes the
ELBO's closed forms in float32 (PIMA.forward), and the EM statistics, evaluation and checkpoints do
not run under this context at all.
"""

from __future__ import annotations

import contextlib

import torch

from pima_hpc.errors import ConfigError


def configure_precision(precision: str, device: torch.device) -> None:
    """Check that ``device`` supports ``precision``; TF32 is a process-wide switch of CUDA's matmuls."""
    if precision == "tf32":
        if device.type != "cuda":
            raise ConfigError("config key 'train.precision': tf32 is a mode of CUDA's matmuls and convolutions; "
                              "on CPU use bf16 (AMX/AVX512-BF16) or fp32")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(precision: str, device: torch.device):
    """The context a training step's networks run in: bfloat16 autocast for bf16, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
