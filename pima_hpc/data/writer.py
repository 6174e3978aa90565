"""Write a multimodal dataset (docs/data-format.md) in bounded memory, atomically.

Builders declare the modalities and the number of samples per split, then stream rows in
physical units with :meth:`DatasetWriter.write`. The writer

* validates every block at the door (all modalities present, equal counts, shapes, dtypes,
  finite values, label range) and names the source and the fix on error;
* fits the normalisation on the training split only (Appendix A, ERRATA 7) with running
  min/max, so nothing but the current block is ever held in memory; float modalities are
  spooled in physical units to a raw side file and normalised into the HDF5 file at the end,
  when the training statistics are known;
* writes one file or a directory of shard files plus ``manifest.json`` (counts, offsets,
  sizes, SHA-256 checksums);
* writes under a temporary name and renames when complete, so an interrupted build never
  leaves a dataset that looks whole; on any exception the temporary files are removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pima_hpc.data.base import CURVE, KINDS, batch_sizes
from pima_hpc.data.errors import DataError
from pima_hpc.data.layout import (FORMAT, FORMAT_VERSION, HDF5_SUFFIXES, LABEL, MANIFEST, META_GROUP,
                                  NORMALISATIONS, STORAGE_DTYPES, TRUTH_GROUP, sha256_file,
                                  write_modality_meta)

# Chunk and compression defaults, chosen by measurement (`python benchmarks/bench_loader.py
# compression`, numbers in docs/benchmarks.md). ~256 KiB chunks (11 lattice images, ~300 MNIST
# samples) read fastest under the chunk-aware shuffle. gzip level 1 gives nearly all of the size
# reduction of higher levels (MNIST 3.5x vs 3.9x at level 9) with the cheapest encode; but noisy
# photographs and float curves barely compress (lattice images 1.10x) while gzip slows reads 2-4x,
# so "auto" measures each dataset's first block and compresses only if zlib-1 saves >= 25 %.
CHUNK_BYTES = 1 << 18
MAX_CHUNK_ROWS = 4096
COMPRESSION = "auto"
AUTO_CODEC = ("gzip", 1)
AUTO_MIN_RATIO = 1.25

RAW_BLOCK_BYTES = 1 << 24  # rows normalised per step at finalisation (bounded memory)


@dataclass(frozen=True)
class ModalityLayout:
    """What a builder declares about a modality before writing (normalisation comes later).

    ``storage="uint8"`` stores 8-bit codes (images whose training split spans 0..255: lossless,
    4x smaller than float32); ``"float32"`` stores normalised floats. ``normalisation`` is
    ``"minmax"`` or ``"zero-max"`` (offset 0, used for stress so that a law through the origin
    stays linear after normalisation).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    t: np.ndarray | None = None
    units: str = ""
    t_units: str = ""
    storage: str = "float32"
    normalisation: str = "minmax"
    description: str = ""

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert self.storage in STORAGE_DTYPES, self.storage
        assert self.normalisation in NORMALISATIONS, self.normalisation
        assert self.storage != "uint8" or self.normalisation == "minmax"
        if self.kind == CURVE:
            assert self.t is not None and len(self.t) == self.shape[-1], "curve needs t of length L"
        else:
            assert len(self.shape) == 3, "images are (C, H, W)"

    @property
    def sample_bytes(self) -> int:
        return STORAGE_DTYPES[self.storage].itemsize * int(np.prod(self.shape))


@dataclass(frozen=True)
class TruthField:
    """A per-sample ground-truth quantity stored beside the data (not seen by the model)."""

    name: str
    dtype: str = "float64"
    units: str = ""
    description: str = ""


def chunk_rows_for(sample_bytes: int, count: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so a chunk of the largest modality is about ``chunk_bytes``."""
    return int(max(1, min(count, MAX_CHUNK_ROWS, chunk_bytes // max(1, sample_bytes))))


def choose_codec(sample: np.ndarray, compression=COMPRESSION):
    """The codec for a dataset: ``compression`` itself, or for "auto" gzip-1 if a zlib-1 trial on
    (byte-shuffled) ``sample`` compresses by at least AUTO_MIN_RATIO, else none."""
    if compression != "auto":
        return compression
    a = np.ascontiguousarray(sample).reshape(-1)
    a = a[: max(1, (1 << 20) // max(1, a.itemsize))]
    raw = a.view(np.uint8).reshape(-1, a.itemsize).T.tobytes()  # what HDF5's shuffle filter does
    return AUTO_CODEC if len(raw) >= AUTO_MIN_RATIO * len(zlib.compress(raw, 1)) else None


def codec_name(codec) -> str:
    return "none" if codec is None or codec[0] is None else "-".join(str(c) for c in codec if c is not None)


def compression_kwargs(dtype, compression) -> dict:
    """h5py dataset filters: compression (if any), byte shuffle for multi-byte types, Fletcher-32."""
    kw = {"fletcher32": True}
    if compression is not None and compression[0] is not None:
        name, level = compression
        kw["compression"] = name
        if name == "gzip":
            kw["compression_opts"] = int(level)
        kw["shuffle"] = np.dtype(dtype).itemsize > 1
    return kw


def check_array(arr, name: str, n: int | None, shape: tuple, source: str, integer: bool = False,
                lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Validate one block: numeric dtype, (n, *shape), finite, optional integer range. Return it."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{source}: {name} has dtype {arr.dtype}; expected real numbers "
                        "(convert strings/objects/complex to float first)")
    if integer and arr.dtype.kind not in "biu":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{source}: {name} must hold integers, got dtype {arr.dtype} with fractional "
                            "or non-finite values; pass integer class ids")
    expected = ((n,) if n is not None else (arr.shape[0] if arr.ndim else 0,)) + tuple(shape)
    if arr.shape != expected:
        raise DataError(f"{source}: {name} has shape {arr.shape}, expected {expected} "
                        f"(samples x {' x '.join(map(str, shape)) or 'scalar'}); fix its shape")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            first = int(np.argwhere(bad)[0][0])
            kind = "NaN" if np.isnan(arr[first]).any() else "Inf"
            raise DataError(f"{source}: {name} has {int(bad.sum())} non-finite value(s) ({kind} first in sample "
                            f"{first}); remove or repair those samples before converting")
    if lo is not None and arr.size and (arr.min() < lo or arr.max() > hi):
        raise DataError(f"{source}: {name} values span [{arr.min()}, {arr.max()}], outside [{lo}, {hi}]; "
                        "fix the values or store them as float32")
    return arr


class _SplitState:
    def __init__(self, name: str, count: int, shard_sizes: list[int], chunk_rows: int):
        self.name, self.count, self.shard_sizes, self.chunk_rows = name, count, shard_sizes, chunk_rows
        self.cursor = 0
        self.files: list[Path] = []
        self.open: h5py.File | None = None
        self.open_index = -1
        self.raw: dict[str, object] = {}


class DatasetWriter:
    """Stream samples into a new dataset; see the module docstring.

    Use as a context manager: a clean exit finalises (normalises, checksums, renames), an
    exception removes every temporary file. ``split_counts`` fixes the size of each split in
    advance (builders know it), which lets shards have near-equal sizes and the HDF5 datasets
    be allocated once.
    """

    def __init__(self, out, modalities: list[ModalityLayout], split_counts: dict[str, int], *,
                 shard_size: int | None = None, label_names=None, truth: list[TruthField] = (),
                 provenance: dict | None = None, compression=COMPRESSION, overwrite: bool = False,
                 fit_split: str = "train", chunk_bytes: int = CHUNK_BYTES):
        self.out = Path(out)
        self.modalities = list(modalities)
        self.names = [m.name for m in self.modalities]
        assert len(set(self.names)) == len(self.names) and LABEL not in self.names
        self.label_names = None if label_names is None else [str(x) for x in label_names]
        self.truth = list(truth)
        self.provenance = dict(provenance or {})
        self.compression = compression
        self.overwrite = overwrite
        self.fit_split = fit_split
        self.sharded = shard_size is not None
        self._finalised = False
        self._check_out(shard_size)
        if not split_counts:
            raise DataError(f"{self.out}: no splits to write; give at least a {fit_split!r} split")
        for s, c in split_counts.items():
            if int(c) <= 0:
                raise DataError(f"{self.out}: split {s!r} would be empty ({c} samples); give it samples or "
                                "change the split fractions")
        if fit_split not in split_counts:
            raise DataError(f"{self.out}: the normalisation is fitted on split {fit_split!r}, which is not "
                            f"among {list(split_counts)}")
        sample_bytes = max(m.sample_bytes for m in self.modalities)
        self.splits: dict[str, _SplitState] = {}
        for s, c in split_counts.items():
            c = int(c)
            n_shards = math.ceil(c / shard_size) if self.sharded else 1
            sizes = [int(x) for x in batch_sizes(c, n_shards)]
            self.splits[s] = _SplitState(s, c, sizes, chunk_rows_for(sample_bytes, min(sizes), chunk_bytes))
        self._codecs: dict[str, object] = {}
        self._lo = {n: math.inf for n in self.names}
        self._hi = {n: -math.inf for n in self.names}
        pid = os.getpid()
        self.tmp = self.out.with_name(f"{self.out.name}.partial-{pid}")
        self.raw_dir = (self.tmp / ".raw") if self.sharded else self.out.with_name(f"{self.out.name}.partial-{pid}.raw")
        self._single: h5py.File | None = None
        self._cleanup()
        try:
            if self.sharded:
                self.tmp.mkdir(parents=True)
            self.raw_dir.mkdir(parents=True)
            if not self.sharded:
                self._single = h5py.File(self.tmp, "w")
                self._init_file(self._single)
                for st in self.splits.values():
                    self._init_split(self._single, st, st.count)
                    st.files = [self.tmp]
        except BaseException:
            self.abort()
            raise

    # -- paths ---------------------------------------------------------------------------------

    def _check_out(self, shard_size):
        if self.sharded:
            if shard_size < 1:
                raise DataError(f"--shard-size must be >= 1, got {shard_size}")
            if self.out.suffix in HDF5_SUFFIXES:
                raise DataError(f"{self.out}: a sharded dataset is a directory; drop the {self.out.suffix} suffix "
                                "or leave out --shard-size for a single file")
        elif self.out.suffix not in HDF5_SUFFIXES:
            raise DataError(f"{self.out}: a single-file dataset needs a .h5 suffix; add it, or pass "
                            "--shard-size K to write a directory of shards")
        if self.out.exists() and not self.overwrite:
            raise DataError(f"{self.out} already exists; choose another --out or pass --overwrite")
        if not self.out.parent.exists():
            raise DataError(f"{self.out.parent}: output directory does not exist; create it first")

    def _cleanup(self):
        for p in (self.tmp, self.raw_dir):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()

    # -- layout --------------------------------------------------------------------------------

    def _init_file(self, f: h5py.File, extra_attrs: dict | None = None):
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["complete"] = False
        f.attrs["modality_order"] = json.dumps(self.names)
        f.attrs["split_order"] = json.dumps(list(self.splits))
        if self.label_names is not None:
            f.attrs["label_names"] = json.dumps(self.label_names)
        f.attrs["provenance"] = json.dumps(self.provenance, default=str)
        for k, v in (extra_attrs or {}).items():
            f.attrs[k] = v
        meta = f.create_group(META_GROUP)
        for m in self.modalities:
            g = meta.create_group(m.name)
            write_modality_meta(g, self._meta(m, offset=0.0, scale=1.0))

    def _meta(self, m: ModalityLayout, offset: float, scale: float) -> dict:
        return {"name": m.name, "kind": m.kind, "shape": list(m.shape), "units": m.units, "t_units": m.t_units,
                "offset": offset, "scale": scale, "normalisation": m.normalisation, "storage": m.storage,
                "fit_split": self.fit_split, "description": m.description,
                "compression": codec_name(self._codecs.get(m.name)),
                "t": None if m.t is None else [float(v) for v in m.t]}

    def _init_split(self, f: h5py.File, st: _SplitState, rows: int):
        g = f.create_group(st.name)
        g.attrs["count"] = rows
        g.attrs["chunk_rows"] = st.chunk_rows

    def _codec(self, key: str, sample: np.ndarray):
        """Codec of dataset ``key`` (same in every file), chosen from the first data it receives."""
        if key not in self._codecs:
            self._codecs[key] = choose_codec(sample, self.compression)
        return self._codecs[key]

    def _dataset(self, g: h5py.Group, key: str, sample: np.ndarray, dtype, tail: tuple, units=None, desc=None):
        """Dataset ``key`` of split group ``g``, created on first use (chunked, filtered)."""
        if key in g:
            return g[key]
        rows = int(g.attrs["count"])
        chunk = min(int(g.attrs["chunk_rows"]), rows)
        ds = g.create_dataset(key, shape=(rows, *tail), dtype=dtype, chunks=(chunk, *tail),
                              **compression_kwargs(dtype, self._codec(key, sample)))
        if units is not None:
            ds.attrs["units"] = units
            ds.attrs["description"] = desc or ""
        return ds

    def _shard_file(self, st: _SplitState, i: int) -> h5py.File:
        if st.open_index == i:
            return st.open
        if st.open is not None:
            st.open.close()
        path = self.tmp / f"{st.name}-{i:05d}.h5"
        f = h5py.File(path, "w")
        self._init_file(f, {"shard_split": st.name, "shard_index": i,
                            "shard_offset": int(sum(st.shard_sizes[:i]))})
        self._init_split(f, st, st.shard_sizes[i])
        st.files.append(path)
        st.open, st.open_index = f, i
        return f

    # -- writing -------------------------------------------------------------------------------

    def write(self, split: str, arrays: dict, labels=None, truth: dict | None = None, source: str = "input"):
        """Append a block of samples (physical units) to ``split``; validate it first."""
        assert not self._finalised
        if split not in self.splits:
            raise DataError(f"{source}: unknown split {split!r}; this dataset has {list(self.splits)}")
        st = self.splits[split]
        missing = [n for n in self.names if n not in arrays]
        if missing:
            raise DataError(f"{source}: modality {missing[0]!r} is missing; every sample needs all of "
                            f"{self.names}")
        extra = [k for k in arrays if k not in self.names]
        if extra:
            raise DataError(f"{source}: unexpected modality {extra[0]!r}; declared modalities are {self.names}")
        counts = {n: len(np.asarray(arrays[n])) for n in self.names}
        if len(set(counts.values())) != 1:
            raise DataError(f"{source}: modalities have different sample counts {counts}; every sample needs "
                            "one entry per modality")
        n = next(iter(counts.values()))
        if n == 0:
            return
        if st.cursor + n > st.count:
            raise DataError(f"{source}: {st.cursor + n} samples for split {split!r}, which was declared with "
                            f"{st.count}")
        block = {}
        for m in self.modalities:
            u8 = m.storage == "uint8"
            a = check_array(arrays[m.name], f"modality {m.name!r}", n, m.shape, source, integer=u8,
                            lo=0 if u8 else None, hi=255 if u8 else None)
            block[m.name] = a.astype(np.uint8) if u8 else a
        lab = None
        if self.label_names is not None:
            if labels is None:
                raise DataError(f"{source}: labels are missing; this dataset declares labels {self.label_names}")
            lab = check_array(labels, "labels", n, (), source, integer=True, lo=0, hi=len(self.label_names) - 1)
            lab = lab.astype(np.int64)
        tru = {}
        for tf in self.truth:
            if truth is None or tf.name not in truth:
                raise DataError(f"{source}: ground-truth field {tf.name!r} is missing")
            tru[tf.name] = check_array(truth[tf.name], f"truth {tf.name!r}", n, (), source)
        for m in self.modalities:
            if m.storage == "float32":
                self._codec(m.name, block[m.name].astype(np.float32))
        if split == self.fit_split:
            for name, a in block.items():
                self._lo[name] = min(self._lo[name], float(a.min()))
                self._hi[name] = max(self._hi[name], float(a.max()))
        self._append(st, block, lab, tru)

    def _append(self, st: _SplitState, block, lab, tru):
        n = len(next(iter(block.values())))
        for m in self.modalities:
            if m.storage == "float32":
                fh = st.raw.get(m.name)
                if fh is None:
                    fh = st.raw[m.name] = open(self.raw_dir / f"{st.name}.{m.name}.f32", "wb")
                np.ascontiguousarray(block[m.name], dtype=np.float32).tofile(fh)
        done = 0
        bounds = np.cumsum([0] + st.shard_sizes)
        while done < n:
            row = st.cursor + done
            i = int(np.searchsorted(bounds, row, side="right") - 1)
            f = self._single if not self.sharded else self._shard_file(st, i)
            local = row - (0 if not self.sharded else int(bounds[i]))
            take = min(n - done, (st.count if not self.sharded else int(bounds[i + 1])) - row)
            g = f[st.name]
            for m in self.modalities:
                if m.storage == "uint8":  # written as it comes; float modalities are created at finalise
                    ds = self._dataset(g, m.name, block[m.name], np.uint8, m.shape)
                    ds[local:local + take] = block[m.name][done:done + take]
            if lab is not None:
                self._dataset(g, LABEL, lab, np.int64, ())[local:local + take] = lab[done:done + take]
            for tf in self.truth:
                v = tru[tf.name].astype(tf.dtype)
                ds = self._dataset(g, f"{TRUTH_GROUP}/{tf.name}", v, np.dtype(tf.dtype), (), tf.units, tf.description)
                ds[local:local + take] = v[done:done + take]
            done += take
        st.cursor += n

    # -- finishing -----------------------------------------------------------------------------

    def _normalisation(self) -> dict[str, tuple[float, float]]:
        norm = {}
        for m in self.modalities:
            lo, hi = self._lo[m.name], self._hi[m.name]
            if m.storage == "uint8":
                if (lo, hi) != (0.0, 255.0):
                    raise DataError(f"{self.out}: modality {m.name!r} is stored as 8-bit codes, which needs the "
                                    f"training split to span 0..255, but it spans {lo:g}..{hi:g}; store it as "
                                    "float32 instead")
                norm[m.name] = (0.0, 255.0)
            elif m.normalisation == "zero-max":
                if not hi > 0:
                    raise DataError(f"{self.out}: modality {m.name!r} has training max {hi:g}; zero-max "
                                    "normalisation needs a positive maximum")
                norm[m.name] = (0.0, hi)
            else:
                if not hi > lo:
                    raise DataError(f"{self.out}: modality {m.name!r} is constant ({lo:g}) over the training "
                                    "split and cannot be min-max normalised; drop it or check the data")
                norm[m.name] = (lo, hi - lo)
        return norm

    def finalise(self) -> Path:
        """Normalise, checksum, write the manifest and move the dataset into place."""
        assert not self._finalised
        for st in self.splits.values():
            if st.cursor != st.count:
                raise DataError(f"{self.out}: split {st.name!r} received {st.cursor} of its {st.count} "
                                "declared samples; the input ended early")
        norm = self._normalisation()
        for st in self.splits.values():
            if st.open is not None:
                st.open.close()
                st.open = None
            for fh in st.raw.values():
                fh.close()
        if self._single is not None:
            self._finish_file(self._single, norm, [(st, 0, st.count) for st in self.splits.values()])
            self._single.close()
            self._single = None
        else:
            for st in self.splits.values():
                start = 0
                for path, rows in zip(st.files, st.shard_sizes):
                    with h5py.File(path, "r+") as f:
                        self._finish_file(f, norm, [(st, start, rows)])
                    start += rows
        shutil.rmtree(self.raw_dir, ignore_errors=True)
        if self.sharded:
            self._write_manifest(norm)
        self._move_into_place()
        self._finalised = True
        return self.out

    def _finish_file(self, f: h5py.File, norm, parts):
        for m in self.modalities:
            write_modality_meta(f[META_GROUP][m.name], self._meta(m, *norm[m.name]))
        for st, start, rows in parts:
            g = f[st.name]
            chunk = min(st.chunk_rows, rows)
            for m in self.modalities:
                if m.storage != "float32":
                    continue
                offset, scale = norm[m.name]
                ds = g.create_dataset(m.name, shape=(rows, *m.shape), dtype=np.float32, chunks=(chunk, *m.shape),
                                      **compression_kwargs(np.float32, self._codecs[m.name]))
                per = int(np.prod(m.shape))
                step = max(chunk, RAW_BLOCK_BYTES // (4 * per) // chunk * chunk)
                with open(self.raw_dir / f"{st.name}.{m.name}.f32", "rb") as fh:
                    fh.seek(start * per * 4)
                    for a in range(0, rows, step):
                        b = min(rows, a + step)
                        raw = np.fromfile(fh, dtype=np.float32, count=(b - a) * per).reshape(b - a, *m.shape)
                        ds[a:b] = ((raw.astype(np.float64) - offset) / scale).astype(np.float32)
        f.attrs["complete"] = True

    def _write_manifest(self, norm):
        splits = {}
        for st in self.splits.values():
            shards, offset = [], 0
            for path, rows in zip(st.files, st.shard_sizes):
                shards.append({"file": path.name, "count": rows, "offset": offset,
                               "bytes": path.stat().st_size, "sha256": sha256_file(path)})
                offset += rows
            splits[st.name] = {"count": st.count, "chunk_rows": st.chunk_rows,
                               "labels": self.label_names is not None,
                               "truth": {tf.name: tf.units for tf in self.truth}, "shards": shards}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
                    "modalities": [self._meta(m, *norm[m.name]) for m in self.modalities],
                    "label_names": self.label_names, "provenance": self.provenance, "splits": splits}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))

    def _move_into_place(self):
        old = None
        if self.out.exists():
            assert self.overwrite
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    def abort(self):
        """Close and delete everything written so far (the destination is never touched)."""
        for st in self.splits.values():
            if st.open is not None:
                try:
                    st.open.close()
                except Exception:  # already broken; we are deleting it anyway
                    pass
            for fh in st.raw.values():
                fh.close()
        if getattr(self, "_single", None) is not None:
            try:
                self._single.close()
            except Exception:
                pass
        self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        try:
            self.finalise()
        except BaseException:
            self.abort()
            raise
        return False


def default_provenance(name: str, builder: str, **extra) -> dict:
    """Provenance common to every builder: what built it, when, with which versions and arguments."""
    import h5py as _h5
    import pima_hpc
    prov = {"name": name, "builder": builder, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pima_hpc_version": pima_hpc.__version__, "numpy_version": np.__version__,
            "h5py_version": _h5.__version__, "hdf5_version": _h5.version.hdf5_version,
            "python": sys.version.split()[0], "command": " ".join(sys.argv)}
    prov.update(extra)
    return prov
