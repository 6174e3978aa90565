"""What `pima predict` reads: any subset of a trained run's modalities, from a dataset, a folder of
images, an array file or a curves file, in rows normalised exactly as the model was trained.

Each source yields rows in physical units (a dataset's stored rows are mapped back through its own
normalisation), so data normalised differently from the training set is still read right; the
run's specs then map every row into the model's normalised units. Rows are read in blocks, never
all at once (``.npy`` files are memory-mapped), so memory stays flat on large inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pima_hpc.data.base import CURVE, IMAGE, DatasetSpec
from pima_hpc.data.errors import DataError

class RowSource:
    """Rows of one or more modalities in physical units, with per-row columns (id, split, ...)."""

    names: list[str]
    where: str

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def columns(self, start: int, stop: int) -> dict[str, list]:
        return {"id": [str(i) for i in range(start, stop)]}


class ArraySource(RowSource):
    """One modality from an array in memory or a memory-mapped ``.npy`` (images (N, H, W) get a channel)."""

    def __init__(self, name: str, array: np.ndarray, where: str, ids: list[str] | None = None):
        self.names, self.array, self.where, self.ids = [name], array, where, ids

    def __len__(self):
        return len(self.array)

    def read(self, start, stop):
        return {self.names[0]: np.asarray(self.array[start:stop], dtype=np.float64)}

    def columns(self, start, stop):
        return {"id": self.ids[start:stop] if self.ids else [str(i) for i in range(start, stop)]}


class ImageFolderSource(RowSource):
    """One image modality from a folder, one file per sample in sorted name order (ids = file stems),
    read as `pima data convert` reads it."""

    def __init__(self, name: str, folder: Path):
        from pima_hpc.data.sources import FolderImages
        self.images = FolderImages(folder)
        self.names, self.where = [name], str(folder)

    def __len__(self):
        return len(self.images)

    def read(self, start, stop):
        return {self.names[0]: self.images.read(np.arange(start, stop)).astype(np.float64)}

    def columns(self, start, stop):
        return {"id": self.images.names[start:stop]}


class DatasetSource(RowSource):
    """The modalities a dataset shares with the run, over the chosen splits, in physical units."""

    def __init__(self, path: Path, names: list[str], splits: list[str] | None):
        from pima_hpc.data.hdf5 import H5SplitReader
        from pima_hpc.data.layout import describe
        info = describe(path)
        chosen = splits or list(info.splits)
        missing = [s for s in chosen if s not in info.splits]
        if missing:
            raise DataError(f"{path}: no split {missing[0]!r}; it has {list(info.splits)} (choose with --split)")
        self.names, self.where, self.spec = names, str(path), info.spec
        self.readers = [(s, H5SplitReader(info, s, in_memory="no")) for s in chosen]
        self.bounds = np.cumsum([0] + [len(r) for _, r in self.readers])
        self.label_names = list(info.spec.label_names or [])
        self.has_labels = {s: info.splits[s].has_labels for s in chosen}

    def __len__(self):
        return int(self.bounds[-1])

    def _pieces(self, start, stop):
        for i, (split, reader) in enumerate(self.readers):
            a, b = max(start, self.bounds[i]), min(stop, self.bounds[i + 1])
            if a < b:
                yield split, reader, np.arange(a - self.bounds[i], b - self.bounds[i])

    def read(self, start, stop):
        parts = {n: [] for n in self.names}
        for _, reader, idx in self._pieces(start, stop):
            batch = reader.read_batch(idx)
            for n in self.names:
                parts[n].append(self.spec[n].to_physical(batch[n].numpy().astype(np.float64)))
        return {n: np.concatenate(p) for n, p in parts.items()}

    def columns(self, start, stop):
        cols = {"id": [], "split": [], "index": [], "label": []}
        for split, reader, idx in self._pieces(start, stop):
            cols["id"] += [f"{split}:{i}" for i in idx]
            cols["split"] += [split] * len(idx)
            cols["index"] += [int(i) for i in idx]
            labels = reader.read_batch(idx)["label"].numpy() if self.has_labels[split] else None
            cols["label"] += ([self.label_names[k] if self.label_names else str(k) for k in labels]
                              if labels is not None else [""] * len(idx))
        if not any(cols["label"]):
            del cols["label"]
        return cols


def _is_dataset(path: Path) -> bool:
    """A shard directory (manifest.json) or an HDF5 file; describe() then checks it is a pima-hpc dataset."""
    return (path / "manifest.json").is_file() if path.is_dir() else path.suffix.lower() in (".h5", ".hdf5")


def _only(spec: DatasetSpec, kind: str, path: Path) -> str:
    names = [m.name for m in spec.modalities if m.kind == kind]
    if len(names) != 1:
        raise DataError(f"{path}: which {kind} modality is it? the run has {names or 'none'}; "
                        f"name it as MODALITY=PATH (e.g. {(names or [kind])[0]}={path})")
    return names[0]


def _array_sources(path: Path, spec: DatasetSpec, name: str | None, npz_key: str | None = None) -> list[RowSource]:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = {None: np.load(path, mmap_mode="r", allow_pickle=False)}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable numpy file ({exc}); save it with numpy.save / numpy.savez") from None
    if None not in arrays:  # .npz: keys are modality names, or one array named on the command line
        if name is not None:
            if len(arrays) != 1:
                raise DataError(f"{path}: holds {sorted(arrays)}; with {name}=PATH it must hold one array "
                                f"(or name its keys after the run's modalities {spec.names})")
            arrays = {name: next(iter(arrays.values()))}
        else:
            unknown = [k for k in arrays if k not in spec.names]
            if unknown:
                raise DataError(f"{path}: array {unknown[0]!r} is not a modality of the run ({spec.names}); "
                                "name the .npz keys after them")
        return [ArraySource(k, a, f"{path}[{k}]") for k, a in arrays.items()]
    a = arrays[None]
    if name is None:
        kind = CURVE if a.ndim == 2 else IMAGE if a.ndim in (3, 4) else None
        if kind is None:
            raise DataError(f"{path}: array of shape {a.shape}; expected images (N, H, W) or (N, C, H, W), "
                            "or curves (N, L)")
        name = _only(spec, kind, path)
    return [ArraySource(name, a, str(path))]


def _curve_file_source(path: Path, spec: DatasetSpec, name: str | None) -> RowSource:
    from pima_hpc.data.sources import read_curves
    name = name or _only(spec, CURVE, path)
    curves, names, grid = read_curves(path)
    t = spec[name].t
    if grid is not None and (len(grid) != len(t) or not np.allclose(grid, t, rtol=1e-6, atol=1e-12)):
        raise DataError(f"{path}: the curves' grid (header, {len(grid)} points from {grid[0]:g} to {grid[-1]:g}) is "
                        f"not the run's grid of {name!r} ({len(t)} points from {t[0]:g} to {t[-1]:g}); "
                        "resample the curves onto it")
    return ArraySource(name, curves, str(path), names)


def open_source(arg: str, spec: DatasetSpec, splits: list[str] | None = None) -> list[RowSource]:
    """The source(s) behind one command-line INPUT: ``PATH`` or ``MODALITY=PATH``."""
    name, sep, rest = arg.partition("=")
    name, path = (name, Path(rest)) if sep and name in spec.names else (None, Path(arg))
    if sep and name is None and not Path(arg).exists():
        raise DataError(f"input {arg!r}: {arg.partition('=')[0]!r} is not a modality of the run ({spec.names})")
    if not path.exists():
        raise DataError(f"input {str(path)!r}: no such file or directory")
    if _is_dataset(path):
        from pima_hpc.data.layout import describe
        shared = [n for n in describe(path).spec.names if n in spec.names and (name is None or n == name)]
        if not shared:
            raise DataError(f"{path}: the dataset has modalities {describe(path).spec.names}, none of the run's "
                            f"{spec.names}")
        return [DatasetSource(path, shared, splits)]
    if path.is_dir():
        return [ImageFolderSource(name or _only(spec, IMAGE, path), path)]
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _array_sources(path, spec, name)
    if suffix in (".csv", ".txt"):
        return [_curve_file_source(path, spec, name)]
    raise DataError(f"input {str(path)!r}: unsupported type {suffix!r}; pass a dataset (.h5 or shard directory), "
                    "a folder of images, .npy/.npz arrays or a .csv of curves")


@dataclass
class PredictionInput:
    """The rows to predict: every given modality, in the run's normalised units, plus their columns."""

    spec: DatasetSpec
    sources: list[RowSource]
    by_name: dict[str, RowSource] = field(init=False)

    def __post_init__(self):
        self.by_name = {}
        for src in self.sources:
            for n in src.names:
                if n in self.by_name:
                    raise DataError(f"modality {n!r} is given twice ({self.by_name[n].where} and {src.where}); "
                                    "give each modality once")
                self.by_name[n] = src
        counts = {src.where: len(src) for src in self.sources}
        if len(set(counts.values())) != 1:
            raise DataError(f"the inputs hold different sample counts {counts}; every input needs one row per sample")
        if not counts or not next(iter(counts.values())):
            raise DataError("no samples in the input")

    @property
    def present(self) -> list[str]:
        """The given modalities in the run's order."""
        return [n for n in self.spec.names if n in self.by_name]

    def __len__(self) -> int:
        return len(self.sources[0])

    def columns(self, start: int, stop: int) -> dict[str, list]:
        """Per-row descriptive columns; the id comes from the first source that names its rows."""
        cols = {}
        for src in self.sources:
            for k, v in src.columns(start, stop).items():
                cols.setdefault(k, v)
        return cols

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of every given modality, checked and normalised with the run's specs (float32)."""
        out = {}
        for src in self.sources:
            for n, x in src.read(start, stop).items():
                m = self.spec[n]
                if m.kind == IMAGE and x.ndim == 3:
                    x = x[:, None]
                if tuple(x.shape[1:]) != tuple(m.shape):
                    raise DataError(f"{src.where}: {n} rows have shape {tuple(x.shape[1:])} but the run was trained on "
                                    f"{tuple(m.shape)}; {'resize the images' if m.kind == IMAGE else 'resample the curves'}"
                                    " to that shape")
                bad = ~np.isfinite(x.reshape(len(x), -1)).all(1)
                if bad.any():
                    raise DataError(f"{src.where}: {n} of sample {start + int(np.argmax(bad))} has NaN/Inf values; "
                                    "repair or drop it")
                out[n] = m.to_normalised(x).astype(np.float32)
        return out


def open_inputs(args: list[str], spec: DatasetSpec, splits: list[str] | None = None) -> PredictionInput:
    """Every INPUT of the command line as one :class:`PredictionInput` (checked before any row is read)."""
    if not args:
        raise DataError("no input given; pass a dataset, a folder of images, an array or a curves file")
    return PredictionInput(spec, [s for a in args for s in open_source(a, spec, splits)])
