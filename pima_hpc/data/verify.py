"""The full integrity check of a dataset (``pima data info`` unless ``--no-verify``; :func:`describe_verified`).

The cheap structural checks run whenever a dataset is opened (:func:`~pima_hpc.data.layout.describe`);
this one also reads every byte: the SHA-256 of every shard against ``manifest.json``, then every
chunk, so HDF5 checks each chunk's Fletcher-32 checksum. A failure is one :class:`DataError`
naming the file, the dataset inside it and the fix.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pima_hpc.data.errors import DataError
from pima_hpc.data.layout import MANIFEST, DatasetInfo, check_part, describe, open_h5, read_rows, sha256_file


def describe_verified(path) -> DatasetInfo:
    """:func:`~pima_hpc.data.layout.describe` plus the full check of every byte."""
    info = describe(path)
    verify_dataset(info)
    return info


def verify_dataset(info: DatasetInfo) -> None:
    """Full integrity check: SHA-256 of every shard, then every chunk's Fletcher-32 checksum."""
    seen = set()
    for split in info.splits.values():
        for part in split.parts:
            if info.sharded:
                if part.sha256 and sha256_file(part.file) != part.sha256:
                    raise DataError(f"{part.file}: SHA-256 checksum does not match {MANIFEST} (corrupted or "
                                    "modified); re-copy the shard or rebuild the dataset")
            if part.file in seen and not info.sharded:
                continue
            seen.add(part.file)
            with open_h5(part.file) as f:
                if info.sharded:
                    check_part(info, split.name, part, f)
                groups = [f[split.name]] if info.sharded else [f[s] for s in info.splits]
                for g in groups:
                    for name, ds in _iter_datasets(g):
                        _read_all_chunks(ds, part.file)


def _iter_datasets(g: h5py.Group):
    for k, v in g.items():
        if isinstance(v, h5py.Dataset):
            yield k, v
        else:
            yield from _iter_datasets(v)


def _read_all_chunks(ds: h5py.Dataset, where: Path, block_bytes: int = 1 << 25) -> None:
    rows = max(1, block_bytes // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))))
    if ds.chunks:
        rows = max(ds.chunks[0], rows // ds.chunks[0] * ds.chunks[0])
    for a in range(0, ds.shape[0], rows):
        read_rows(ds, a, min(a + rows, ds.shape[0]), where)


__all__ = ["describe_verified", "verify_dataset"]
