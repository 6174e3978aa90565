"""Read one split of an HDF5 dataset as one rank's disjoint part (the SplitReader contract).

Partition. Each rank owns one contiguous range of the split's global indices: either a
near-equal block (``partition="block"``, sizes differ by at most one) or whole shard files
(``partition="shard"``, consecutive shards balanced by count). Nothing is ever padded with
duplicates, which would bias the EM sufficient statistics; uneven counts are handled by the
base class's step planning (every rank runs the same number of steps with near-equal batches).

Order. An epoch's order is a permutation of the rank's samples reproducible from (seed, epoch,
rank). It is chunk-aware: the chunks of the rank's part are permuted, then samples are shuffled
inside windows of about :data:`SHUFFLE_WINDOW_BYTES`, so a shuffled batch touches few chunks and
each chunk is decompressed about once per epoch (the HDF5 chunk cache is sized to one window).
Builders write samples in random order, so shuffling within windows of whole chunks is as good
as a global shuffle. The order does not depend on whether the part is held in memory.

Files. Handles are opened lazily in the process that reads and reopened after a fork, so a reader
can be pickled or forked into DataLoader workers (HDF5 handles must not cross a fork). With
``in_memory`` the rank's part (only that part) is loaded once, in its stored dtype.
"""

from __future__ import annotations

import os

import numpy as np

from pima_hpc.data.base import SplitReader, batch_loader, batch_sizes, rank_block
from pima_hpc.data.errors import DataError
from pima_hpc.data.verify import verify_dataset
from pima_hpc.data.layout import (LABEL, POINTS_GROUP, STORAGE_DTYPES, TRUTH_GROUP, UINT8_DIVISOR, DatasetInfo,
                                  check_part, describe, list_splits, open_h5, point_datasets, read_rows,
                                  stored_bytes_per_sample)

IN_MEMORY_LIMIT = 1 << 30          # "auto": load the rank's part if its stored size is below this
SHUFFLE_WINDOW_BYTES = 32 << 20    # samples shuffled together; also the per-rank HDF5 chunk cache budget


def partition_ranges(counts: list[int], world_size: int, partition: str = "block") -> list[tuple[int, int]]:
    """Each rank's contiguous [start, stop) of global indices, for parts with the given counts.

    "block": near-equal blocks that may cross shard boundaries. "shard": whole shards, cut where
    the cumulative count is nearest to each rank's equal share (needs >= world_size shards).
    """
    total = int(sum(counts))
    if partition == "block":
        return [rank_block(total, r, world_size) for r in range(world_size)]
    if partition != "shard":
        raise DataError(f"partition must be 'block' or 'shard', got {partition!r}")
    if len(counts) < world_size:
        raise DataError(f"partition='shard' needs at least one shard per rank: {len(counts)} shard(s) for "
                        f"{world_size} ranks; use partition='block' or rebuild with a smaller --shard-size")
    edges = np.concatenate([[0], np.cumsum(counts)])
    cuts = [0]
    for r in range(1, world_size):
        j = int(np.argmin(np.abs(edges - total * r / world_size)))
        # every rank keeps at least one shard
        j = min(max(j, cuts[-1] + 1), len(counts) - (world_size - r))
        cuts.append(j)
    cuts.append(len(counts))
    return [(int(edges[a]), int(edges[b])) for a, b in zip(cuts[:-1], cuts[1:])]


def chunk_aware_order(chunk_keys: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of positions 0..n-1 that permutes chunks, then shuffles within windows.

    ``chunk_keys`` is non-decreasing (positions of one chunk are adjacent). Whole chunks are put
    in random order; the resulting sequence is cut into windows of ``window`` samples and each
    window is shuffled. With one sample per chunk this is a uniform random permutation.
    """
    n = len(chunk_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, chunk_keys[1:] != chunk_keys[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    group_rank = np.empty(len(starts), dtype=np.int64)
    group_rank[rng.permutation(len(starts))] = np.arange(len(starts))
    seq = np.lexsort((np.arange(n), group_rank[group]))
    win = np.arange(n) // max(1, window)
    return seq[np.lexsort((rng.random(n), win))]


class H5SplitReader(SplitReader):
    """One rank's part of one split of an HDF5 dataset (a file or a shard directory)."""

    def __init__(self, info: DatasetInfo, split: str, rank: int = 0, world_size: int = 1,
                 in_memory: str | bool = "auto", partition: str = "block"):
        if split not in info.splits:
            raise DataError(f"{info.path}: no split {split!r}; it has {list(info.splits)} (choose one, e.g. "
                            "via data.train_split / data.val_split / data.test_split)")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise DataError(f"rank {rank} is outside a world of size {world_size}")
        self.info = info
        self.split = split
        self.spec = info.spec
        self.rank, self.world_size = rank, world_size
        sinfo = info.splits[split]
        self.parts = sinfo.parts
        self.chunk_rows = sinfo.chunk_rows
        self.has_labels = sinfo.has_labels
        self.truth_fields = dict(sinfo.truth_fields)
        self._offsets = np.array([p.offset for p in self.parts], dtype=np.int64)
        ranges = partition_ranges([p.count for p in self.parts], world_size, partition)
        self.rank_counts = [b - a for a, b in ranges]
        if min(self.rank_counts) == 0:
            raise DataError(f"{info.path}: split {split!r} has {sinfo.count} samples, fewer than the "
                            f"{world_size} ranks; use fewer ranks or a larger split")
        self.start, self.stop = ranges[rank]
        self.indices = np.arange(self.start, self.stop, dtype=np.int64)
        self._my_parts = [i for i, p in enumerate(self.parts)
                          if p.offset < self.stop and p.offset + p.count > self.start]
        self._sample_bytes = stored_bytes_per_sample(info)
        self._files: dict[int, object] = {}
        self._datasets: dict[tuple, object] = {}
        self._pid = None
        self._mem: dict[str, np.ndarray] | None = None
        if info.sharded:  # check the shards this rank reads against the manifest, before any fork
            for i in self._my_parts:
                with open_h5(self.parts[i].file) as f:
                    check_part(info, split, self.parts[i], f)
        mode = {True: "yes", False: "no"}.get(in_memory, in_memory)
        if mode not in ("yes", "no", "auto"):
            raise DataError(f"in_memory must be 'yes', 'no' or 'auto', got {in_memory!r}")
        if mode == "yes" or (mode == "auto" and len(self.indices) * self._sample_bytes < IN_MEMORY_LIMIT):
            self._load()

    # -- files ---------------------------------------------------------------------------------

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_datasets"], state["_pid"] = {}, {}, None
        return state

    def _file(self, i: int):
        if self._pid != os.getpid():  # first use, or a forked child: never reuse inherited handles
            self._files, self._datasets, self._pid = {}, {}, os.getpid()
        f = self._files.get(i)
        if f is None:
            # room for this file's share of a shuffle window, with slack for uneven shares
            cache = (1 << 20) + 2 * SHUFFLE_WINDOW_BYTES // max(1, len(self._my_parts))
            f = self._files[i] = open_h5(self.parts[i].file, rdcc_nbytes=cache, rdcc_nslots=100003)
        return f

    def _dataset(self, i: int, name: str):
        """The open dataset ``name`` of part ``i``, kept open: HDF5's chunk cache lives as long as
        the dataset handle, so reopening it per batch would decompress every chunk again."""
        f = self._file(i)
        key = (i, name)
        ds = self._datasets.get(key)
        if ds is None:
            ds = self._datasets[key] = f[self.split][name]
        return ds

    def close(self) -> None:
        """Close this process's file handles (they reopen on the next read)."""
        if self._pid == os.getpid():
            self._datasets.clear()
            for f in self._files.values():
                f.close()
        self._files, self._datasets, self._pid = {}, {}, None

    @property
    def in_memory(self) -> bool:
        return self._mem is not None

    def _stored_names(self) -> list[str]:
        """The datasets a batch reads: every modality, per-sample points where kept, labels."""
        points = [p for m in self.spec.modalities if m.points for p in point_datasets(m.name)]
        return list(self.spec.names) + points + ([LABEL] if self.has_labels else [])

    def _load(self):
        self._mem = self._read_stored(self.indices, self._stored_names())
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def _dataset_spec(self, name):
        if name == LABEL:
            return np.dtype(np.int64), ()
        if name.startswith((TRUTH_GROUP + "/", POINTS_GROUP + "/")):
            return None, ()
        m = self.spec[name]
        return STORAGE_DTYPES[self.info.storage[name]], tuple(m.shape)

    def _read_stored(self, idx: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Rows ``idx`` (sorted global indices) of each named dataset, in stored dtype.

        Indices are grouped by file and then into runs of adjacent chunks; each run is one
        contiguous hyperslab read, so every touched chunk is decompressed once per call.
        """
        out = {}
        part_of = np.searchsorted(self._offsets, idx, side="right") - 1
        for name in names:
            dtype, shape = self._dataset_spec(name)
            res = None
            for i in np.unique(part_of):
                sel = np.flatnonzero(part_of == i)
                local = idx[sel] - self._offsets[i]
                ds = self._dataset(int(i), name)
                if res is None:
                    res = np.empty((len(idx), *ds.shape[1:]), dtype=dtype or ds.dtype)
                ck = local // self.chunk_rows
                cuts = np.flatnonzero(np.diff(ck) > 1) + 1
                for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(local)]):
                    a, b = int(local[s]), int(local[e - 1]) + 1
                    d = int(sel[s])
                    if b - a == e - s and int(sel[e - 1]) - d == e - s - 1:
                        # a dense run (sequential reads, loading a part): straight into the output
                        read_rows(ds, a, b, self.parts[i].file, out=res[d:d + b - a])
                    else:
                        block = read_rows(ds, a, b, self.parts[i].file)
                        res[sel[s:e]] = block[local[s:e] - a]
            out[name] = res
        return out

    def _read(self, global_indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(global_indices, dtype=np.int64)
        order = None
        if len(idx) > 1 and np.any(idx[1:] < idx[:-1]):
            order = np.argsort(idx, kind="stable")
            idx = idx[order]
        if len(idx) and (idx[0] < 0 or idx[-1] >= self.num_split):
            raise IndexError(f"indices outside split {self.split!r} of {self.num_split} samples")
        names = self._stored_names()
        if self._mem is not None and len(idx) and idx[0] >= self.start and idx[-1] < self.stop:
            raw = {k: v[idx - self.start] for k, v in self._mem.items()}
        else:
            raw = self._read_stored(idx, names)
        out = {}
        for k, v in raw.items():
            if k != LABEL and v.dtype == np.uint8:
                v = v.astype(np.float32) / UINT8_DIVISOR  # correctly rounded code / 255
            if order is not None:
                v = v[np.argsort(order)]
            out[k] = v
        return out

    @property
    def num_split(self) -> int:
        return int(sum(p.count for p in self.parts))

    def labels(self) -> np.ndarray | None:
        if not self.has_labels:
            return None
        if self._mem is not None:
            return self._mem[LABEL].copy()
        return self._read_stored(self.indices, [LABEL])[LABEL]

    def read_truth(self, fields: list[str] | None = None) -> dict[str, np.ndarray] | None:
        """This rank's per-sample ground truth (``self.indices`` order), or None if the split has none."""
        if not self.truth_fields:
            return None
        fields = list(self.truth_fields) if fields is None else list(fields)
        unknown = [f for f in fields if f not in self.truth_fields]
        if unknown:
            raise DataError(f"{self.info.path}: no ground-truth field {unknown[0]!r} in split {self.split!r}; "
                            f"it has {sorted(self.truth_fields)}")
        out = self._read_stored(self.indices, [f"{TRUTH_GROUP}/{k}" for k in fields])
        return {k.split("/", 1)[1]: v for k, v in out.items()}

    # -- epoch order ---------------------------------------------------------------------------

    def shuffle_window(self) -> int:
        return int(max(self.chunk_rows, SHUFFLE_WINDOW_BYTES // max(1, self._sample_bytes)))

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """Positions into ``self.indices`` for one epoch (a permutation; see the module docstring)."""
        part_of = np.searchsorted(self._offsets, self.indices, side="right") - 1
        keys = part_of * (1 << 40) + (self.indices - self._offsets[part_of]) // self.chunk_rows
        rng = np.random.default_rng([seed, epoch, self.rank])
        return chunk_aware_order(keys, self.shuffle_window(), rng)

    def batch_index_lists(self, batch_size: int, epoch: int = 0, seed: int = 0,
                          shuffle: bool = True) -> list[np.ndarray]:
        order = self.epoch_order(epoch, seed) if shuffle else np.arange(len(self.indices))
        sizes = batch_sizes(len(self.indices), self.steps(batch_size))
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [np.sort(self.indices[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]

    def __repr__(self):
        return (f"H5SplitReader({str(self.info.path)!r}, split={self.split!r}, rank={self.rank}/{self.world_size}, "
                f"samples={len(self.indices)}, in_memory={self.in_memory})")


def open_split(path, split: str, rank: int = 0, world_size: int = 1, in_memory: str | bool = "auto", *,
               partition: str = "block", verify: bool = False) -> H5SplitReader:
    """Open ``split`` of the dataset at ``path`` (a .h5 file or a shard directory) for ``rank``.

    ``in_memory``: "yes" loads this rank's part, "no" streams from disk, "auto" loads it when
    its stored size is below 1 GiB. ``verify`` checks every shard's SHA-256 and every chunk's
    checksum first (slow for big data; `pima data info` does the same).
    """
    info = describe(path)
    if verify:
        verify_dataset(info)
    return H5SplitReader(info, split, rank, world_size, in_memory, partition)


def read_truth(path, split: str, rank: int = 0, world_size: int = 1, fields: list[str] | None = None,
               partition: str = "block") -> dict[str, np.ndarray] | None:
    """Per-sample ground truth (e.g. the lattice generator's topology, density, E, sigma_y, H).

    Returns {field: array} for this rank's samples in global-index order plus "index" (the
    global indices), or None if the dataset stores no ground truth. Units: see
    ``pima data info PATH``.
    """
    reader = H5SplitReader(describe(path), split, rank, world_size, in_memory="no", partition=partition)
    try:
        out = reader.read_truth(fields)
    finally:
        reader.close()
    if out is not None:
        out["index"] = reader.indices.copy()
    return out


def make_loader(reader: SplitReader, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True,
                num_workers: int = 0, prefetch_factor: int = 2):
    """An iterable over one epoch's batches (the same dicts as ``reader.read_batch``), in order
    (:func:`batch_loader` over ``reader.batch_index_lists``)."""
    return batch_loader(reader, reader.batch_index_lists(batch_size, epoch, seed, shuffle), num_workers,
                        prefetch_factor)


__all__ = ["open_split", "list_splits", "read_truth", "batch_loader", "make_loader", "H5SplitReader", "partition_ranges",
           "chunk_aware_order"]
