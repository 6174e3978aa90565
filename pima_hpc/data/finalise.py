"""Finishing a dataset once every row is written: what :meth:`DatasetWriter.finalise` runs.

The normalisation is fitted on the training split only (Appendix A, ERRATA 7) from the running
min/max the writer kept; float modalities, spooled in physical units to raw side files, are then
normalised into each HDF5 file block by block (bounded memory); a shard directory gets its
``manifest.json`` (counts, offsets, sizes, SHA-256 checksums).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from pima_hpc.data.errors import DataError
from pima_hpc.data.layout import FORMAT, FORMAT_VERSION, MANIFEST, META_GROUP, sha256_file, write_modality_meta
from pima_hpc.data.storage import compression_kwargs

RAW_BLOCK_BYTES = 1 << 24  # rows normalised per step at finalisation (bounded memory)


def fit_normalisation(modalities, lows: dict, highs: dict, where) -> dict[str, tuple[float, float]]:
    """(offset, scale) of each modality from its training minima ``lows`` and maxima ``highs``.

    ``where`` (the dataset) starts every error message.
    """
    norm = {}
    for m in modalities:
        lo, hi = lows[m.name], highs[m.name]
        if m.storage == "uint8":
            if (lo, hi) != (0.0, 255.0):
                raise DataError(f"{where}: modality {m.name!r} is stored as 8-bit codes, which needs the "
                                f"training split to span 0..255, but it spans {lo:g}..{hi:g}; store it as "
                                "float32 instead")
            norm[m.name] = (0.0, 255.0)
        elif m.normalisation == "zero-max":
            if not hi > 0:
                raise DataError(f"{where}: modality {m.name!r} has training max {hi:g}; zero-max "
                                "normalisation needs a positive maximum")
            norm[m.name] = (0.0, hi)
        else:
            if not hi > lo:
                raise DataError(f"{where}: modality {m.name!r} is constant ({lo:g}) over the training "
                                "split and cannot be min-max normalised; drop it or check the data")
            norm[m.name] = (lo, hi - lo)
    return norm


def finish_file(f: h5py.File, modalities, norm, parts, raw_dir: Path, codecs: dict, meta) -> None:
    """Final metadata, the float modalities normalised from the raw spool, and ``complete = True``.

    ``parts`` lists (split state, first spooled row, rows) held by ``f``; ``meta(m, offset, scale)``
    is a modality's metadata dict; ``codecs`` the codec of each float modality.
    """
    for m in modalities:
        write_modality_meta(f[META_GROUP][m.name], meta(m, *norm[m.name]))
    for st, start, rows in parts:
        g = f[st.name]
        chunk = min(st.chunk_rows, rows)
        for m in modalities:
            if m.storage != "float32":
                continue
            offset, scale = norm[m.name]
            ds = g.create_dataset(m.name, shape=(rows, *m.shape), dtype=np.float32, chunks=(chunk, *m.shape),
                                  **compression_kwargs(np.float32, codecs[m.name]))
            per = int(np.prod(m.shape))
            step = max(chunk, RAW_BLOCK_BYTES // (4 * per) // chunk * chunk)
            with open(raw_dir / f"{st.name}.{m.name}.f32", "rb") as fh:
                fh.seek(start * per * 4)
                for a in range(0, rows, step):
                    b = min(rows, a + step)
                    raw = np.fromfile(fh, dtype=np.float32, count=(b - a) * per).reshape(b - a, *m.shape)
                    ds[a:b] = ((raw.astype(np.float64) - offset) / scale).astype(np.float32)
    f.attrs["complete"] = True


def write_manifest(directory: Path, splits, modalities, norm, label_names, truth, provenance, meta) -> None:
    """``manifest.json`` of a shard directory: every split's shards (rows, offset, bytes, SHA-256)."""
    entries = {}
    for st in splits:
        shards, offset = [], 0
        for path, rows in zip(st.files, st.shard_sizes):
            shards.append({"file": path.name, "count": rows, "offset": offset,
                           "bytes": path.stat().st_size, "sha256": sha256_file(path)})
            offset += rows
        entries[st.name] = {"count": st.count, "chunk_rows": st.chunk_rows,
                            "labels": label_names is not None,
                            "truth": {tf.name: tf.units for tf in truth}, "shards": shards}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
                "modalities": [meta(m, *norm[m.name]) for m in modalities],
                "label_names": label_names, "provenance": provenance, "splits": entries}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))


__all__ = ["RAW_BLOCK_BYTES", "finish_file", "fit_normalisation", "write_manifest"]
