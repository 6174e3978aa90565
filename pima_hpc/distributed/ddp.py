"""Data parallelism applied to a model from outside: the model code never imports this."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel


def wrap_ddp(module: torch.nn.Module, ctx) -> torch.nn.Module:
    """DDP around ``module`` on this rank's device; identity on one process.

    Buffers set in closed form (cluster means, expert parameters) are identical on every rank
    by construction, so DDP's buffer broadcast only keeps BatchNorm running statistics in step.
    """
    if ctx.world_size <= 1:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)
