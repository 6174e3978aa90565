"""What the trainer needs from a dataset: modality specs, and per-rank batches of one split.

Data flows one way: a reader yields batches ``{modality name: float32 tensor, "label": int64,
"index": int64}``; the model never sees files, ranks or shards.

Per-sample grids. A curve measured on its own grid (each specimen its own strain points and
length) is a modality with ``points = P > 0``: besides its values on the modality's reference
grid ``t`` (what the encoder reads), every sample keeps its measured points, padded to P. A
batch then also holds ``points_key(name, "t")`` (float64, physical), ``points_key(name, "x")``
(float32, normalised like the modality, 0 in the padding) and ``points_key(name, "mask")``
(float32, 1 on measured points); the physics experts see only those (docs/data-format.md).

Normalisation (ERRATA 7, Appendix A): every modality is stored normalised to [0, 1] with an affine
map fitted on the training split, ``x_norm = (x - offset) / scale``. Physics experts work in
physical units and map their predictions through the same affine map (see
:meth:`ModalitySpec.to_normalised`), so a law that passes through the origin stays exact.

Batch planning. Each rank owns a disjoint block of the split (no padding with duplicates:
padding would bias the EM counts). Every rank runs the same number of steps per epoch,
``ceil(max_rank_count / batch_size)``, and splits its own shuffled block into that many
near-equal batches, so no rank ever sees an empty batch and all ranks can compute the global
count of every step without communicating (:func:`global_batch_counts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

IMAGE = "image"
CURVE = "curve"
KINDS = (IMAGE, CURVE)
POINT_PARTS = ("t", "x", "mask")


def points_key(name: str, part: str) -> str:
    """The batch key of one part ("t", "x" or "mask") of a curve's per-sample points."""
    return f"{name}@{part}"


def measured_points(spec: "ModalitySpec", batch: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A curve of a batch as measured, in physical units, float64: (x, t, mask) (B, P) from its per-sample
    points, or (x, None, None) on the modality's shared grid (x (B, L))."""
    if not spec.points:
        return spec.to_physical(batch[spec.name].detach().double().cpu().numpy()), None, None
    x, t, mask = (batch[points_key(spec.name, p)].detach().double().cpu().numpy() for p in ("x", "t", "mask"))
    return spec.to_physical(x), t, mask


def points_from_stored(spec: "ModalitySpec", t: np.ndarray, x: np.ndarray, length: np.ndarray) -> dict:
    """Stored points (t and x physical, padded; the valid length of each row) -> the batch's tensors."""
    mask = np.arange(t.shape[1])[None, :] < np.asarray(length)[:, None]
    x = np.where(mask, spec.to_normalised(np.asarray(x, np.float64)), 0.0)
    return {points_key(spec.name, "t"): torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64)),
            points_key(spec.name, "x"): torch.from_numpy(x.astype(np.float32)),
            points_key(spec.name, "mask"): torch.from_numpy(mask.astype(np.float32))}


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: its kind, per-sample shape, curve grid and normalisation.

    ``shape`` is (C, H, W) for images and (L,) for curves. ``t`` is the curve's independent
    variable in physical units (length L), ``None`` for images. ``points`` > 0: every sample also
    keeps up to that many measured points on its own grid (module docstring).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    t: np.ndarray | None = None
    offset: float = 0.0
    scale: float = 1.0
    units: str = ""
    t_units: str = ""
    points: int = 0

    def __post_init__(self):
        if self.points < 0 or (self.points and self.kind != CURVE):
            raise ValueError(f"modality {self.name!r}: per-sample points are for curves, count >= 0 "
                             f"(got {self.kind} with {self.points})")
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == CURVE and (self.t is None or len(self.t) != self.shape[-1]):
            raise ValueError(f"curve modality {self.name!r} needs a grid t of length {self.shape[-1]}")
        if not self.scale > 0:
            raise ValueError(f"modality {self.name!r}: normalisation scale must be > 0, got {self.scale}")

    def to_normalised(self, x):
        return (x - self.offset) / self.scale

    def to_physical(self, x):
        return x * self.scale + self.offset


@dataclass(frozen=True)
class DatasetSpec:
    """The modalities of a dataset (in a fixed order) and its label names, if any."""

    modalities: tuple[ModalitySpec, ...]
    label_names: tuple[str, ...] | None = None
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.modalities) < 1:  # one modality is PIMA without fusion: VaDE on images alone
            raise ValueError("a dataset needs at least one modality")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")

    def __getitem__(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"no modality {name!r}; have {[m.name for m in self.modalities]}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modalities]


def spec_to_dict(spec: DatasetSpec) -> dict:
    """A JSON-able copy of ``spec`` (kept in checkpoints, so a trained run knows its inputs' units
    and normalisation without its training data)."""
    return {"label_names": None if spec.label_names is None else list(spec.label_names),
            "attrs": {k: v for k, v in spec.attrs.items() if isinstance(v, (str, int, float, bool))},
            "modalities": [{"name": m.name, "kind": m.kind, "shape": list(m.shape),
                            "t": None if m.t is None else np.asarray(m.t, dtype=np.float64).tolist(),
                            "offset": float(m.offset), "scale": float(m.scale), "units": m.units,
                            "t_units": m.t_units, "points": int(m.points)} for m in spec.modalities]}


def spec_from_dict(d: dict) -> DatasetSpec:
    """The inverse of :func:`spec_to_dict`."""
    mods = tuple(ModalitySpec(m["name"], m["kind"], tuple(m["shape"]),
                              None if m["t"] is None else np.asarray(m["t"], dtype=np.float64),
                              m["offset"], m["scale"], m["units"], m["t_units"], int(m.get("points", 0)))
                 for m in d["modalities"])
    labels = d.get("label_names")
    return DatasetSpec(mods, None if labels is None else tuple(labels), dict(d.get("attrs") or {}))


def rank_block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous [start, stop) block of ``n`` samples owned by ``rank`` (sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def steps_per_epoch(rank_counts: Sequence[int], batch_size: int) -> int:
    """Steps every rank runs in one epoch: enough for the largest rank at ``batch_size``."""
    return max(1, math.ceil(max(rank_counts) / batch_size))


def batch_sizes(count: int, steps: int) -> np.ndarray:
    """Split ``count`` samples into ``steps`` near-equal batches (as np.array_split does)."""
    base, extra = divmod(count, steps)
    return np.array([base + (1 if s < extra else 0) for s in range(steps)], dtype=np.int64)


def global_batch_counts(rank_counts: Sequence[int], batch_size: int) -> np.ndarray:
    """Samples in each step summed over ranks; every rank computes it without communicating."""
    steps = steps_per_epoch(rank_counts, batch_size)
    return sum(batch_sizes(c, steps) for c in rank_counts)


def epoch_permutation(n: int, seed: int, epoch: int, rank: int) -> np.ndarray:
    """A permutation of range(n), reproducible from (seed, epoch, rank), different per epoch."""
    return np.random.default_rng([seed, epoch, rank]).permutation(n)


class SplitReader:
    """One split of a dataset as seen by one rank. Subclasses implement :meth:`_read`.

    ``rank_counts`` holds every rank's sample count (for step planning); this rank owns the
    global indices ``self.indices`` (sorted).
    """

    spec: DatasetSpec
    rank: int
    world_size: int
    rank_counts: list[int]
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_global(self) -> int:
        return int(sum(self.rank_counts))

    def _read(self, global_indices: np.ndarray) -> dict[str, np.ndarray]:
        """Read sorted global indices -> {modality: array, "label": int array}."""
        raise NotImplementedError

    def steps(self, batch_size: int) -> int:
        return steps_per_epoch(self.rank_counts, batch_size)

    def global_counts(self, batch_size: int) -> np.ndarray:
        return global_batch_counts(self.rank_counts, batch_size)

    def batch_index_lists(self, batch_size: int, epoch: int = 0, seed: int = 0,
                          shuffle: bool = True) -> list[np.ndarray]:
        """This rank's batches for one epoch, as sorted arrays of global indices."""
        order = (epoch_permutation(len(self.indices), seed, epoch, self.rank) if shuffle
                 else np.arange(len(self.indices)))
        sizes = batch_sizes(len(self.indices), self.steps(batch_size))
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        # Sorted within a batch so HDF5 reads are monotone slices; order inside a batch is irrelevant.
        return [np.sort(self.indices[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]

    def read_batch(self, global_indices: np.ndarray) -> dict[str, torch.Tensor]:
        arrays = self._read(np.asarray(global_indices))
        batch = {name: torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=np.float32))
                 for name in self.spec.names}
        labels = arrays.get("label")
        batch["label"] = (torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None
                          else torch.full((len(global_indices),), -1, dtype=torch.int64))
        batch["index"] = torch.from_numpy(np.asarray(global_indices, dtype=np.int64))
        for m in self.spec.modalities:
            if m.points:
                batch.update(points_from_stored(m, *(arrays[f"points/{m.name}/{k}"] for k in ("t", "x", "length"))))
        return batch

    def iter_batches(self, batch_size: int, epoch: int = 0, seed: int = 0,
                     shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.batch_index_lists(batch_size, epoch, seed, shuffle):
            yield self.read_batch(idx)

    def labels(self) -> np.ndarray | None:
        """This rank's labels in ``self.indices`` order, or None if the split has none."""
        lab = self._read(self.indices).get("label")
        return None if lab is None else np.asarray(lab, dtype=np.int64)


class ModalitySubset:
    """A reader that shows only some of its dataset's modalities (``data.modalities``), e.g. the images
    alone for one-modality clustering; everything else (rank blocks, batch plans) is the reader's own."""

    def __init__(self, reader: SplitReader, names: Sequence[str]):
        missing = [n for n in names if n not in reader.spec.names]
        if missing:
            raise ValueError(f"no modality {missing[0]!r}; the dataset has {reader.spec.names}")
        self._reader = reader
        self.spec = DatasetSpec(tuple(m for m in reader.spec.modalities if m.name in names),
                                reader.spec.label_names, reader.spec.attrs)

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def __len__(self) -> int:
        return len(self._reader)

    def read_batch(self, global_indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self._reader.read_batch(global_indices)
        keep = set(self.spec.names) | {"label", "index"}
        keep |= {points_key(m.name, p) for m in self.spec.modalities if m.points for p in POINT_PARTS}
        return {k: v for k, v in batch.items() if k in keep}

    def iter_batches(self, batch_size: int, epoch: int = 0, seed: int = 0,
                     shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self._reader.batch_index_lists(batch_size, epoch, seed, shuffle):
            yield self.read_batch(idx)


class InMemorySplit(SplitReader):
    """A split held in memory as arrays (already normalised), sharded by contiguous rank blocks.

    ``points`` maps a curve modality with ``points > 0`` to its (t, x, length): padded (N, P)
    grids and values in physical units and the valid length of each row.
    """

    def __init__(self, spec: DatasetSpec, arrays: dict[str, np.ndarray], labels: np.ndarray | None = None,
                 rank: int = 0, world_size: int = 1, points: dict | None = None):
        n = {name: len(arrays[name]) for name in spec.names}
        if len(set(n.values())) != 1:
            raise ValueError(f"modalities have different sample counts: {n}")
        total = next(iter(n.values()))
        if total == 0:
            raise ValueError("empty split: no samples")
        for m in spec.modalities:
            if tuple(arrays[m.name].shape[1:]) != tuple(m.shape):
                raise ValueError(f"modality {m.name!r}: per-sample shape {arrays[m.name].shape[1:]} "
                                 f"does not match its spec {m.shape}")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.rank_counts = [b - a for a, b in (rank_block(total, r, world_size) for r in range(world_size))]
        start, stop = rank_block(total, rank, world_size)
        self.indices = np.arange(start, stop)
        self._arrays = {k: np.asarray(arrays[k], dtype=np.float32) for k in spec.names}
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        for m in spec.modalities:
            if m.points and m.name not in (points or {}):
                raise ValueError(f"modality {m.name!r} keeps per-sample points: pass points={{{m.name!r}: (t, x, length)}}")
        for name, (t, x, length) in (points or {}).items():
            self._arrays[f"points/{name}/t"] = np.asarray(t, np.float64)
            self._arrays[f"points/{name}/x"] = np.asarray(x, np.float64)
            self._arrays[f"points/{name}/length"] = np.asarray(length, np.int64)

    def _read(self, global_indices):
        out = {k: v[global_indices] for k, v in self._arrays.items()}
        if self._labels is not None:
            out["label"] = self._labels[global_indices]
        return out


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``ds[index_array] -> batch dict``."""

    def __init__(self, reader: SplitReader):
        self.reader = reader

    def __getitem__(self, idx):
        return self.reader.read_batch(idx)


class _Plain:
    """The in-process iterator over one epoch's batches (``len`` is the number of steps)."""

    def __init__(self, reader, lists):
        self.reader, self.lists = reader, lists

    def __len__(self):
        return len(self.lists)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.lists:
            yield self.reader.read_batch(idx)


def batch_loader(reader: SplitReader, index_lists: list, num_workers: int = 0, prefetch_factor: int = 2):
    """An iterable over the batches ``reader.read_batch(idx)`` for ``idx`` in ``index_lists``, in order.

    With ``num_workers > 0`` the batches are read by a torch DataLoader (``batch_size=None`` over
    the list of index arrays), each worker opening its own file handles, while this process trains;
    the batches and their order are identical to the plain iterator's.
    """
    if num_workers <= 0:
        return _Plain(reader, index_lists)
    if hasattr(reader, "close"):
        reader.close()  # the parent's handles must not be inherited by forked workers
    return torch.utils.data.DataLoader(_Batches(reader), batch_size=None, sampler=index_lists, shuffle=False,
                                       num_workers=num_workers, prefetch_factor=prefetch_factor,
                                       persistent_workers=False)
