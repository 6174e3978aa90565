"""Write a multimodal dataset (docs/data-format.md) in bounded memory, atomically.

Builders declare the modalities and the number of samples per split, then stream rows in
physical units with :meth:`DatasetWriter.write`. The writer

* validates every block at the door (all modalities present, equal counts, shapes, dtypes,
  finite values, label range) and names the source and the fix on error;
* fits the normalisation on the training split only (Appendix A, ERRATA 7) with running
  min/max, so nothing but the current block is ever held in memory; float modalities are
  spooled in physical units to a raw side file and normalised into the HDF5 file at the end,
  when the training statistics are known (:mod:`~pima_hpc.data.finalise`);
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
from pathlib import Path

import h5py
import numpy as np

from pima_hpc.data.base import batch_sizes
from pima_hpc.data.errors import DataError
from pima_hpc.data.finalise import finish_file, fit_normalisation, write_manifest
from pima_hpc.data.layout import (FORMAT, FORMAT_VERSION, HDF5_SUFFIXES, LABEL, META_GROUP, POINT_DATASETS,
                                  POINTS_GROUP, TRUTH_GROUP, write_modality_meta)
from pima_hpc.data.points import check_points
from pima_hpc.data.storage import (CHUNK_BYTES, COMPRESSION, ModalityLayout, TruthField, check_array, choose_codec,
                                   chunk_rows_for, codec_name, compression_kwargs)


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
                "compression": codec_name(self._codecs.get(m.name)), "points": int(m.points),
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

    def write(self, split: str, arrays: dict, labels=None, truth: dict | None = None, source: str = "input",
              points: dict | None = None):
        """Append a block of samples (physical units) to ``split``; validate it first.

        ``points`` maps each modality declared with ``points > 0`` to its block's (t, x, length):
        padded per-sample grids and values (physical units) and valid lengths."""
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
            if m.points:
                if points is None or m.name not in points:
                    raise DataError(f"{source}: modality {m.name!r} keeps per-sample points; pass its (t, x, length)")
                t, x, length = check_points(*points[m.name], n, m.points, m.name, source)
                tru[f"{POINTS_GROUP}/{m.name}"] = {"t": t, "x": x, "length": length}
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
            for m in self.modalities:
                for part, dtype in POINT_DATASETS.items() if m.points else ():
                    v = tru[f"{POINTS_GROUP}/{m.name}"][part].astype(dtype)
                    ds = self._dataset(g, f"{POINTS_GROUP}/{m.name}/{part}", v, dtype, v.shape[1:])
                    ds[local:local + take] = v[done:done + take]
            done += take
        st.cursor += n

    # -- finishing -----------------------------------------------------------------------------

    def finalise(self) -> Path:
        """Normalise, checksum, write the manifest and move the dataset into place."""
        assert not self._finalised
        for st in self.splits.values():
            if st.cursor != st.count:
                raise DataError(f"{self.out}: split {st.name!r} received {st.cursor} of its {st.count} "
                                "declared samples; the input ended early")
        norm = fit_normalisation(self.modalities, self._lo, self._hi, self.out)
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
            write_manifest(self.tmp, self.splits.values(), self.modalities, norm, self.label_names, self.truth,
                           self.provenance, self._meta)
        self._move_into_place()
        self._finalised = True
        return self.out

    def _finish_file(self, f: h5py.File, norm, parts):
        finish_file(f, self.modalities, norm, parts, self.raw_dir, self._codecs, self._meta)

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
