"""Where predictions go: ``clusters.csv`` (one row per sample: ids, cluster, posterior probabilities),
``predictions.h5`` (the same plus predicted curves with their sd and generated images, physical
units) and ``summary.json``, in one output directory.

Each rank streams its block of rows into its own part files; rank 0 merges them in rank order, block
by block (memory stays flat), and renames the finished directory into place, so an interrupted or
failed prediction never leaves output that looks whole.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from pima_hpc.errors import UserError

CSV_NAME, H5_NAME, SUMMARY_NAME = "clusters.csv", "predictions.h5", "summary.json"
COPY_ROWS = 4096


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite`` and an unwritable parent, before any input is read."""
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: already exists; choose another directory or pass --overwrite")
    if out.exists() and not (out / SUMMARY_NAME).is_file():
        raise UserError(f"--out {out}: exists and is not a `pima predict` output; refusing to overwrite it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create its parent directory ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: directory {parent} is not writable; choose a writable location")


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


class PartWriter:
    """One rank's rows, streamed into ``part-<rank>.csv`` and ``part-<rank>.h5`` under the staging directory."""

    def __init__(self, stage: Path, rank: int, n_rows: int, n_clusters: int, curves: dict, images: dict):
        """``curves``: {name: ModalitySpec} of the predicted curves; ``images``: {name: ModalitySpec}."""
        self.csv_path, self.h5_path = stage / f"part-{rank:05d}.csv", stage / f"part-{rank:05d}.h5"
        self.n_clusters, self.row = n_clusters, 0
        self.h5 = h5py.File(self.h5_path, "w")
        self.h5.create_dataset("cluster", (n_rows,), "int64")
        self.h5.create_dataset("probabilities", (n_rows, n_clusters), "float32")
        self.h5.create_dataset("id", (n_rows,), h5py.string_dtype())
        for n, m in curves.items():
            for key in ("mean", "sd"):
                self.h5.create_dataset(f"curves/{n}/{key}", (n_rows, *m.shape), "float32")
        for n, m in images.items():
            self.h5.create_dataset(f"images/{n}/generated", (n_rows, *m.shape), "float32")
        self._csv_file = open(self.csv_path, "w", newline="")
        self._csv = None

    def write(self, columns: dict[str, list], result: dict) -> None:
        probs = result["log_posterior"].exp().float().cpu().numpy()
        cluster = result["cluster"].cpu().numpy()
        a, b = self.row, self.row + len(cluster)
        self.h5["cluster"][a:b] = cluster
        self.h5["probabilities"][a:b] = probs
        self.h5["id"][a:b] = columns["id"]
        for n, (mean, sd) in result["curves"].items():
            self.h5[f"curves/{n}/mean"][a:b] = mean.float().cpu().numpy()
            self.h5[f"curves/{n}/sd"][a:b] = sd.float().cpu().numpy()
        for n, x in result["images"].items():
            self.h5[f"images/{n}/generated"][a:b] = x.float().cpu().numpy()
        if self._csv is None:
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow([*columns, "cluster", *(f"p{k}" for k in range(self.n_clusters))])
        for i in range(len(cluster)):
            self._csv.writerow([*(v[i] for v in columns.values()), int(cluster[i]),
                                *(f"{p:.6g}" for p in probs[i])])
        self.row = b

    def close(self) -> None:
        self.h5.close()
        self._csv_file.close()


def merge_parts(stage: Path, world_size: int, out: Path, summary: dict, curves: dict, images: dict) -> Path:
    """Rank 0: the parts of every rank concatenated in rank order into ``out`` (replacing it)."""
    parts = [h5py.File(stage / f"part-{r:05d}.h5", "r") for r in range(world_size)]
    total = sum(len(p["cluster"]) for p in parts)
    with h5py.File(stage / H5_NAME, "w") as f:
        f.attrs["readout"] = summary["readout"]
        f.attrs["summary"] = json.dumps(summary)
        for key in _datasets(parts[0]):
            src = parts[0][key]
            dst = f.create_dataset(key, (total, *src.shape[1:]), src.dtype, chunks=True)
            row = 0
            for p in parts:
                n = len(p[key])
                for a in range(0, n, COPY_ROWS):
                    b = min(n, a + COPY_ROWS)
                    dst[row + a:row + b] = p[key][a:b]
                row += n
        for n, m in curves.items():
            f[f"curves/{n}"].attrs.update(units=m.units, t_units=m.t_units)
            f.create_dataset(f"curves/{n}/t", data=np.asarray(m.t, dtype=np.float64))
        for n, m in images.items():
            f[f"images/{n}"].attrs.update(units=m.units)
    for p in parts:
        p.close()
    with open(stage / CSV_NAME, "w", newline="") as dst:
        for r in range(world_size):
            with open(stage / f"part-{r:05d}.csv", newline="") as src:
                header = src.readline()
                if r == 0:
                    dst.write(header)
                shutil.copyfileobj(src, dst)
    for r in range(world_size):
        (stage / f"part-{r:05d}.csv").unlink()
        (stage / f"part-{r:05d}.h5").unlink()
    (stage / SUMMARY_NAME).write_text(json.dumps({**summary, "samples": total}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    return out


def _datasets(group: h5py.Group) -> list[str]:
    keys = []
    group.visititems(lambda k, v: keys.append(k) if isinstance(v, h5py.Dataset) else None)
    return keys
