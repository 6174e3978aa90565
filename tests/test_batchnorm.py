"""Precise BatchNorm statistics: closed forms, the rank average, and no change without data."""

from __future__ import annotations

import numpy as np
import torch

from pima_hpc.collective import Collective
from pima_hpc.train.batchnorm import precise_batchnorm


class PlusOtherRank(Collective):
    """A two-rank sum where the other rank's arrays are known in advance."""

    world_size = 2

    def __init__(self, other):
        self.other = other

    def allreduce_sum(self, arrays):
        return [np.asarray(a, dtype=np.float64) + b for a, b in zip(arrays, self.other)]


class Recording(Collective):
    def allreduce_sum(self, arrays):
        self.seen = [np.array(a, dtype=np.float64) for a in arrays]
        return super().allreduce_sum(arrays)


def batches(seed, n, size=16, dim=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, dim, generator=g) * (1 + i) + i for i in range(n)]


def layer():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3, momentum=0.1)
    with torch.no_grad():  # some training history that precise BN must replace
        bn.train()
        for x in batches(9, 5):
            bn(x * 7)
    return bn


def test_statistics_are_the_plain_average_of_the_batches():
    bn, xs = layer(), batches(1, 4)
    precise_batchnorm(bn, bn, xs, Collective())
    assert not bn.training and bn.momentum == 0.1 and int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0, unbiased=True) for x in xs]).mean(0))


def test_ranks_get_equal_weight_per_batch():
    other_xs, mine = batches(2, 3), batches(3, 1)
    rec = Recording()
    other = layer()
    precise_batchnorm(other, other, other_xs, rec)
    bn = layer()
    precise_batchnorm(bn, bn, mine, PlusOtherRank(rec.seen))
    every = other_xs + mine
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in every]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in every]).mean(0))
    assert int(bn.num_batches_tracked) == 4


def test_no_batches_keeps_the_old_statistics():
    bn = layer()
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    precise_batchnorm(bn, bn, [], Collective())
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == count and bn.momentum == 0.1
