"""The on-disk layout of a multimodal dataset (docs/data-format.md) and how to inspect one.

A dataset is either one HDF5 file or a directory of HDF5 shard files plus ``manifest.json``.
This module knows the names and attributes of that layout, reads a dataset's metadata into a
:class:`DatasetInfo` (without keeping any file open, so readers can be forked and pickled),
and checks a dataset's structure: sample counts, shapes, dtypes and shard sizes (the full check,
SHA-256 checksums and every chunk, is :mod:`~pima_hpc.data.verify`). Every problem becomes one
:class:`DataError` naming the file, the dataset inside it and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pima_hpc.data.base import CURVE, IMAGE, DatasetSpec, ModalitySpec
from pima_hpc.data.errors import DataError

FORMAT = "pima-hpc-multimodal"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_GROUP = "modalities"
LABEL = "label"
TRUTH_GROUP = "truth"
# A curve's per-sample measured points (pima_hpc.data.base): <split>/points/<name>/{t, x, length}
POINTS_GROUP = "points"
POINT_DATASETS = {"t": np.dtype(np.float64), "x": np.dtype(np.float64), "length": np.dtype(np.int32)}


def point_datasets(name: str) -> list[str]:
    """The split-group paths of modality ``name``'s per-sample points."""
    return [f"{POINTS_GROUP}/{name}/{k}" for k in POINT_DATASETS]

# How stored values map to the normalised values a reader returns. "float32": stored values are
# already normalised. "uint8": stored values are 8-bit codes and normalised = code / 255; only
# used when the training split spans the full 8-bit range, so the code is exactly the fitted
# min-max normalisation (Appendix A, ERRATA 7) and storage is lossless.
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "uint8": np.dtype(np.uint8)}
UINT8_DIVISOR = np.float32(255.0)

# Normalisations, all fitted on the training split: "minmax" maps [min, max] to [0, 1];
# "zero-max" maps [0, max] to [0, 1] (offset 0), so a law through the origin stays linear.
NORMALISATIONS = ("minmax", "zero-max")

HDF5_SUFFIXES = (".h5", ".hdf5")


def rebuild_hint(path) -> str:
    return f"rebuild it with `pima data ...` (see `pima data info {path}` for how it was made)"


@dataclass(frozen=True)
class Part:
    """One file holding rows [offset, offset + count) of a split."""

    file: Path
    count: int
    offset: int
    nbytes: int | None = None
    sha256: str | None = None


@dataclass
class SplitInfo:
    name: str
    count: int
    chunk_rows: int
    parts: list[Part]
    has_labels: bool
    truth_fields: dict[str, str]  # field -> units


@dataclass
class DatasetInfo:
    """Everything about a dataset but its arrays: modality specs, storage, splits and their files."""

    path: Path
    sharded: bool
    spec: DatasetSpec
    storage: dict[str, str]
    splits: dict[str, SplitInfo]
    format_version: int
    provenance: dict = field(default_factory=dict)
    modality_meta: dict[str, dict] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Opening files with errors that say what to do


def open_h5(path: Path, mode: str = "r", **kwargs) -> h5py.File:
    """Open an HDF5 file, turning "missing", "not HDF5" and "truncated" into one DataError."""
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise DataError(f"{path}: no such file; check the path or {rebuild_hint(path)}")
    try:
        try:
            return h5py.File(path, mode, locking=False, **kwargs)
        except TypeError:  # h5py built without the locking option
            return h5py.File(path, mode, **kwargs)
    except OSError as exc:
        msg = str(exc).splitlines()[0]
        if "truncated" in msg or "eof" in msg.lower():
            what = "is truncated (an interrupted copy?)"
        elif "signature" in msg:
            what = "is not an HDF5 file"
        else:
            what = f"cannot be opened as HDF5 ({msg})"
        raise DataError(f"{path} {what}; re-copy it or {rebuild_hint(path)}") from None


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _json_attr(attrs, key, default):
    raw = attrs.get(key)
    if raw is None:
        return default
    if isinstance(raw, bytes):
        raw = raw.decode()
    return json.loads(raw)


# --------------------------------------------------------------------------------------------
# Modality metadata <-> HDF5 attributes and JSON


def modality_meta_from_group(grp: h5py.Group) -> dict:
    a = grp.attrs
    meta = {
        "name": grp.name.rsplit("/", 1)[-1],
        "kind": str(a["kind"]),
        "shape": [int(s) for s in a["shape"]],
        "units": str(a.get("units", "")),
        "t_units": str(a.get("t_units", "")),
        "offset": float(a["offset"]),
        "scale": float(a["scale"]),
        "normalisation": str(a.get("normalisation", "minmax")),
        "storage": str(a.get("storage", "float32")),
        "fit_split": str(a.get("fit_split", "train")),
        "description": str(a.get("description", "")),
        "compression": str(a.get("compression", "")),
        "points": int(a.get("points", 0)),
    }
    if "t" in grp:
        meta["t"] = [float(v) for v in grp["t"][()]]
    return meta


def write_modality_meta(grp: h5py.Group, meta: dict) -> None:
    for key in ("kind", "units", "t_units", "normalisation", "storage", "fit_split", "description", "compression"):
        grp.attrs[key] = str(meta.get(key, ""))
    grp.attrs["shape"] = np.asarray(meta["shape"], dtype=np.int64)
    grp.attrs["offset"] = float(meta["offset"])
    grp.attrs["scale"] = float(meta["scale"])
    grp.attrs["points"] = int(meta.get("points", 0))
    if meta.get("t") is not None:
        if "t" in grp:
            del grp["t"]
        grp.create_dataset("t", data=np.asarray(meta["t"], dtype=np.float64))


def spec_from_meta(metas: list[dict], label_names, attrs: dict, where: Path) -> DatasetSpec:
    mods = []
    for m in metas:
        try:
            mods.append(ModalitySpec(
                name=m["name"], kind=m["kind"], shape=tuple(m["shape"]),
                t=None if m.get("t") is None else np.asarray(m["t"], dtype=np.float64),
                offset=m["offset"], scale=m["scale"], units=m.get("units", ""), t_units=m.get("t_units", ""),
                points=int(m.get("points", 0))))
        except (KeyError, ValueError) as exc:
            raise DataError(f"{where}: modality metadata {m.get('name')!r} is invalid ({exc}); "
                            f"{rebuild_hint(where)}") from None
    try:
        return DatasetSpec(tuple(mods), None if label_names is None else tuple(label_names), dict(attrs))
    except ValueError as exc:
        raise DataError(f"{where}: {exc}; {rebuild_hint(where)}") from None


def _check_format(attrs, where: Path) -> int:
    fmt = attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise DataError(f"{where} is not a pima-hpc dataset (format attribute {fmt!r}, expected {FORMAT!r}); "
                        "convert your data with `pima data convert`")
    version = int(attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise DataError(f"{where} has format version {version}, newer than this pima-hpc reads "
                        f"({FORMAT_VERSION}); upgrade pima-hpc")
    if not bool(attrs.get("complete", False)):
        raise DataError(f"{where} is marked incomplete (its builder did not finish); delete it and rebuild")
    return version


# --------------------------------------------------------------------------------------------
# Describing a dataset


def describe(path) -> DatasetInfo:
    """Read and check a dataset's metadata (the full check of checksums and chunks is
    :func:`pima_hpc.data.verify.verify_dataset` of what this returns).

    Cheap checks always run: format and version, every modality present in every split with the
    same sample count, shapes and dtypes as declared, no empty split, shard files present with
    the sizes the manifest records and no unlisted shard files.
    """
    path = Path(path)
    if path.is_dir():
        info = _describe_sharded(path)
    elif path.exists() or path.suffix in HDF5_SUFFIXES:
        info = _describe_file(path)
    else:
        raise DataError(f"{path}: no such file or directory; pass a .h5 file or a shard directory "
                        "built by `pima data`")
    return info


def _describe_file(path: Path) -> DatasetInfo:
    with open_h5(path) as f:
        version = _check_format(f.attrs, path)
        names = _json_attr(f.attrs, "modality_order", None)
        if META_GROUP not in f or not names:
            raise DataError(f"{path}: no /{META_GROUP} group; {rebuild_hint(path)}")
        metas = []
        for n in names:
            if n not in f[META_GROUP]:
                raise DataError(f"{path}: modality {n!r} has no metadata group /{META_GROUP}/{n}; "
                                f"{rebuild_hint(path)}")
            metas.append(modality_meta_from_group(f[META_GROUP][n]))
        label_names = _json_attr(f.attrs, "label_names", None)
        provenance = _json_attr(f.attrs, "provenance", {})
        spec = spec_from_meta(metas, label_names, {"name": provenance.get("name", path.stem)}, path)
        storage = {m["name"]: m["storage"] for m in metas}
        splits = {}
        order = _json_attr(f.attrs, "split_order", [])
        present = [k for k in f.keys() if k != META_GROUP]
        for s in [k for k in order if k in present] + [k for k in present if k not in order]:
            count, rows, has_labels, truth = _check_split_group(f[s], spec, storage, path)
            splits[s] = SplitInfo(s, count, rows, [Part(path, count, 0)], has_labels, truth)
    if not splits:
        raise DataError(f"{path}: the dataset holds no split; {rebuild_hint(path)}")
    return DatasetInfo(path, False, spec, storage, splits, version, provenance,
                       {m["name"]: m for m in metas})


def _check_split_group(g: h5py.Group, spec: DatasetSpec, storage: dict, where: Path):
    """Check one split group against the spec; return (count, chunk_rows, has_labels, truth units)."""
    counts = {}
    for m in spec.modalities:
        if m.name not in g:
            raise DataError(f"{where}: split {g.name!r} is missing modality dataset {g.name}/{m.name}; "
                            f"every split needs all of {spec.names}; {rebuild_hint(where)}")
        ds = g[m.name]
        if not isinstance(ds, h5py.Dataset):
            raise DataError(f"{where}: {ds.name} is not a dataset; {rebuild_hint(where)}")
        if tuple(ds.shape[1:]) != tuple(m.shape):
            raise DataError(f"{where}: dataset {ds.name} has per-sample shape {tuple(ds.shape[1:])}, "
                            f"metadata says {tuple(m.shape)}; {rebuild_hint(where)}")
        if ds.dtype != STORAGE_DTYPES.get(storage[m.name]):
            raise DataError(f"{where}: dataset {ds.name} has dtype {ds.dtype}, metadata says "
                            f"{storage[m.name]}; {rebuild_hint(where)}")
        counts[ds.name] = ds.shape[0]
        for path in point_datasets(m.name) if m.points else ():
            if path not in g:
                raise DataError(f"{where}: modality {m.name!r} keeps per-sample points but {g.name}/{path} is "
                                f"missing; {rebuild_hint(where)}")
            pds, part = g[path], path.rsplit("/", 1)[1]
            tail = () if part == "length" else (m.points,)
            if tuple(pds.shape[1:]) != tail or pds.dtype != POINT_DATASETS[part]:
                raise DataError(f"{where}: dataset {pds.name} is {pds.dtype} {tuple(pds.shape)}, expected "
                                f"{POINT_DATASETS[part]} with rows of shape {tail}; {rebuild_hint(where)}")
            counts[pds.name] = pds.shape[0]
    has_labels = LABEL in g
    if has_labels:
        counts[g[LABEL].name] = g[LABEL].shape[0]
    truth = {}
    if TRUTH_GROUP in g:
        for k, ds in g[TRUTH_GROUP].items():
            counts[ds.name] = ds.shape[0]
            truth[k] = str(ds.attrs.get("units", ""))
    if len(set(counts.values())) != 1:
        raise DataError(f"{where}: split {g.name!r} has mismatched sample counts {counts}; "
                        f"{rebuild_hint(where)}")
    count = next(iter(counts.values()))
    if count == 0:
        raise DataError(f"{where}: split {g.name!r} is empty; rebuild with samples in every split")
    if int(g.attrs.get("count", count)) != count:
        raise DataError(f"{where}: split {g.name!r} records count {int(g.attrs['count'])} but holds "
                        f"{count} samples; {rebuild_hint(where)}")
    rows = max((g[m.name].chunks or (count,))[0] for m in spec.modalities)
    return count, int(rows), has_labels, truth


def _load_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{path} is a directory without {MANIFEST}; pass a dataset directory built by "
                        "`pima data ... --shard-size K` or a .h5 file")
    try:
        manifest = json.loads(mpath.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise DataError(f"{mpath} is not valid JSON ({exc}); restore it or {rebuild_hint(path)}") from None
    return manifest


def _describe_sharded(path: Path) -> DatasetInfo:
    manifest = _load_manifest(path)
    mpath = path / MANIFEST
    version = _check_format(manifest, mpath)
    try:
        metas = manifest["modalities"]
        split_entries = manifest["splits"]
        spec = spec_from_meta(metas, manifest.get("label_names"),
                              {"name": manifest.get("provenance", {}).get("name", path.name)}, mpath)
        storage = {m["name"]: m.get("storage", "float32") for m in metas}
        splits, listed = {}, set()
        for s, entry in split_entries.items():
            parts, offset = [], 0
            for sh in entry["shards"]:
                f = path / sh["file"]
                listed.add(sh["file"])
                if not f.is_file():
                    raise DataError(f"{path}: shard {sh['file']} of split {s!r} is listed in {MANIFEST} "
                                    f"but missing; restore the file or rebuild the dataset")
                size = f.stat().st_size
                if sh.get("bytes") is not None and size != int(sh["bytes"]):
                    raise DataError(f"{f}: {size} bytes, {MANIFEST} records {sh['bytes']} (truncated or "
                                    f"modified copy); re-copy the shard or rebuild the dataset")
                if int(sh["offset"]) != offset:
                    raise DataError(f"{mpath}: shard {sh['file']} starts at row {sh['offset']}, expected "
                                    f"{offset}; {rebuild_hint(path)}")
                parts.append(Part(f, int(sh["count"]), offset, sh.get("bytes"), sh.get("sha256")))
                offset += int(sh["count"])
            if offset != int(entry["count"]) or offset == 0:
                raise DataError(f"{mpath}: split {s!r} shards hold {offset} samples, manifest count "
                                f"{entry['count']}; {'no empty splits allowed; ' if offset == 0 else ''}"
                                f"{rebuild_hint(path)}")
            splits[s] = SplitInfo(s, offset, int(entry["chunk_rows"]), parts, bool(entry.get("labels", False)),
                                  dict(entry.get("truth", {})))
    except KeyError as exc:
        raise DataError(f"{mpath} lacks the key {exc}; {rebuild_hint(path)}") from None
    stray = sorted(p.name for p in path.iterdir() if p.suffix in HDF5_SUFFIXES and p.name not in listed)
    if stray:
        raise DataError(f"{path}: shard file(s) {stray} are not listed in {MANIFEST} (left over from another "
                        "build?); remove them or rebuild the dataset")
    if not splits:
        raise DataError(f"{mpath}: the dataset holds no split; {rebuild_hint(path)}")
    return DatasetInfo(path, True, spec, storage, splits, version, manifest.get("provenance", {}),
                       {m["name"]: m for m in metas})


def check_part(info: DatasetInfo, split: str, part: Part, f: h5py.File) -> None:
    """Check a shard file (already open) against the manifest: format, structure and row count."""
    _check_format(f.attrs, part.file)
    if split not in f:
        raise DataError(f"{part.file}: no split group /{split} although {MANIFEST} lists this shard for it; "
                        f"{rebuild_hint(info.path)}")
    count, _, _, _ = _check_split_group(f[split], info.spec, info.storage, part.file)
    if count != part.count:
        raise DataError(f"{part.file}: holds {count} samples of split {split!r}, {MANIFEST} says {part.count}; "
                        f"{rebuild_hint(info.path)}")


def read_rows(ds: h5py.Dataset, a: int, b: int, where: Path, out: np.ndarray | None = None) -> np.ndarray:
    """``ds[a:b]`` (into ``out`` if given), a corrupted chunk reported as a DataError naming file and dataset."""
    try:
        if out is not None:
            ds.read_direct(out, np.s_[a:b])
            return out
        return ds[a:b]
    except OSError as exc:
        msg = str(exc).splitlines()[0]
        raise DataError(f"{where}: cannot read rows {a}:{b} of dataset {ds.name} ({msg}); the file is "
                        f"corrupted: re-copy it or {rebuild_hint(where)}") from None


def stored_bytes_per_sample(info: DatasetInfo) -> int:
    # per-sample points: t and x float64 per point, and a length
    return int(sum(STORAGE_DTYPES[info.storage[m.name]].itemsize * int(np.prod(m.shape))
                   + (16 * m.points + 4 if m.points else 0) for m in info.spec.modalities))


def list_splits(path) -> list[str]:
    """The split names of a dataset (file or shard directory), in stored order."""
    return list(describe(path).splits)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def dataset_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return os.path.getsize(path)


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "DatasetInfo", "SplitInfo", "Part", "describe",
           "list_splits", "IMAGE", "CURVE"]
