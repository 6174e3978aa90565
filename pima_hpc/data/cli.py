"""``pima data ...``: build datasets (MNIST, lattice, your own data) and inspect them.

    pima data mnist   --idx-dir DIR --noise {clean,noisy,STD} --out PATH
    pima data lattice --n 91 --out PATH [--shard-size K] [--seed S] [--workers W]
    pima data convert --images DIR|FILE.npy|.npz|.txt --curves FILE --out PATH [--t 0:1] [--labels FILE]
                      [--images-key KEY] [--image-shape H,W|C,H,W]
    pima data fit-experts PATH [--expert NAME ...]   per-sample fit quality of every expert, a pick
    pima data info    PATH [--no-verify] [--json]

``--out`` ending in .h5 writes one file; with ``--shard-size K`` it is a directory of shard
files plus manifest.json. User errors raise :class:`DataError`; the ``pima`` entry point prints
the message and exits 2 (so does ``python -m pima_hpc data ...``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np



def _common(p: argparse.ArgumentParser, shard_default=None):
    p.add_argument("--out", required=True, help="output: PATH.h5 (one file) or a directory with --shard-size")
    p.add_argument("--shard-size", type=int, default=shard_default, metavar="K",
                   help="write a directory of shard files of ~K samples each plus manifest.json")
    p.add_argument("--seed", type=int, default=0, help="random seed (splits, noise, generation)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_mnist(args) -> int:
    from pima_hpc.data.mnist import build_mnist
    t0 = time.time()
    out = build_mnist(args.idx_dir, args.out, args.noise, seed=args.seed, val_fraction=args.val_fraction,
                      shard_size=args.shard_size, progress=not args.quiet, overwrite=args.overwrite,
                      curve_law=args.curve_law)
    print(f"wrote {out} in {time.time() - t0:.1f} s; inspect with `pima data info {out}`")
    return 0


def cmd_lattice(args) -> int:
    from pima_hpc.data.lattice import LatticeConfig, build_lattice
    cfg = LatticeConfig(size=args.size, augment=args.augment, population=args.population,
                        density_cv=args.density_cv, grids=args.grids)
    t0 = time.time()
    out = build_lattice(args.out, args.n, seed=args.seed, cfg=cfg, test_fraction=args.test_fraction,
                        shard_size=args.shard_size, workers=args.workers, progress=not args.quiet,
                        overwrite=args.overwrite)
    print(f"wrote {out} ({args.n} specimens x {cfg.views} views) in {time.time() - t0:.1f} s; "
          f"inspect with `pima data info {out}`")
    return 0


def cmd_convert(args) -> int:
    from pima_hpc.data.convert import convert_files
    t0 = time.time()
    out = convert_files(args.out, args.images, args.curves, images_key=args.images_key,
                        image_shape=args.image_shape, t=args.t, labels_file=args.labels,
                        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                        curve_units=args.curve_units, t_units=args.t_units, image_units=args.image_units,
                        curve_normalisation={"min": "minmax", "zero": "zero-max"}[args.curve_offset],
                        shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out} in {time.time() - t0:.1f} s; inspect with `pima data info {out}`")
    return 0


def summarise(path, verify: bool = True) -> dict:
    """A JSON-able summary of a dataset (what `pima data info` prints); verifies checksums if asked."""
    from pima_hpc.data.hdf5 import H5SplitReader
    from pima_hpc.data.layout import dataset_bytes, describe
    from pima_hpc.data.verify import verify_dataset
    info = describe(path)
    if verify:
        verify_dataset(info)
    out = {"path": str(info.path), "format_version": info.format_version,
           "layout": "shard directory" if info.sharded else "single file", "bytes": dataset_bytes(info.path),
           "verified": bool(verify), "label_names": list(info.spec.label_names or []),
           "modalities": [], "splits": {}, "provenance": info.provenance}
    for m in info.spec.modalities:
        meta = info.modality_meta[m.name]
        entry = {"name": m.name, "kind": m.kind, "shape": list(m.shape), "storage": info.storage[m.name],
                 "compression": meta.get("compression", ""),
                 "units": m.units, "normalisation": meta.get("normalisation"), "fit_split": meta.get("fit_split"),
                 "offset": m.offset, "scale": m.scale, "description": meta.get("description", "")}
        if m.t is not None:
            entry.update(t_units=m.t_units, t_min=float(m.t[0]), t_max=float(m.t[-1]), points=len(m.t),
                         per_sample_points=int(m.points))
        out["modalities"].append(entry)
    for name, s in info.splits.items():
        entry = {"count": s.count, "chunk_rows": s.chunk_rows, "files": len(s.parts),
                 "truth": s.truth_fields}
        if s.has_labels:
            reader = H5SplitReader(info, name, in_memory="no")
            entry["label_counts"] = np.bincount(reader.labels(), minlength=len(info.spec.label_names or [])).tolist()
            reader.close()
        out["splits"][name] = entry
    return out


def cmd_fit_experts(args) -> int:
    """Per expert: how well it fits each training curve alone (median / 10th-percentile R^2), and a pick."""
    from pima_hpc.data.errors import DataError
    from pima_hpc.data.base import measured_points
    from pima_hpc.data.hdf5 import open_split
    from pima_hpc.model.fit_quality import POOR_MEDIAN_R2, fit_table, recommend
    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as exc:
        raise DataError(f"--options {args.options!r} is not JSON ({exc.msg}); e.g. '{{\"polynomial\": {{\"degree\": 3}}}}'") from None
    reader = open_split(args.path, args.split, in_memory="no")
    curves = [m for m in reader.spec.modalities if m.t is not None and (args.modality in (None, m.name))]
    if not curves:
        raise DataError(f"{args.path}: no curve modality{' named ' + repr(args.modality) if args.modality else ''}; "
                        f"it has {reader.spec.names}")
    take = np.linspace(0, len(reader) - 1, min(args.max_samples, len(reader))).astype(int)
    batch = reader.read_batch(reader.indices[take])
    report = {}
    for m in curves:
        x, grid, mask = measured_points(m, batch)  # per-sample grids: the points, not the resampled view
        try:
            rows = fit_table(m.t, x, args.expert, options, grid, mask)
        except (ValueError, TypeError) as exc:
            raise DataError(f"--expert/--options: {exc}") from None
        pick = recommend(rows)
        report[m.name] = {"samples": len(x), "experts": rows, "recommended": pick}
        if not args.json:
            print(f"{m.name}: per-sample fits of {len(x)} {args.split} curves ({m.units or 'no units'})")
            print(f"  {'expert':20s} {'params':>6s} {'median R^2':>11s} {'p10 R^2':>9s}")
            for r in rows:
                tag = "" if r["ranked"] else "  (one value per point: fits anything, not a law)"
                print(f"  {r['expert']:20s} {r['params']:6d} {r['median_r2']:11.4f} {r['p10_r2']:9.4f}{tag}")
            print(f"  recommended: model.expert={pick}" if pick else
                  f"  no law reaches median R^2 {POOR_MEDIAN_R2}: use model.expert=free (the clusters' mean curves)"
                  " or write an expert (README, 'Adding a physics expert')")
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


def cmd_info(args) -> int:
    from pima_hpc.data.layout import human_bytes
    s = summarise(args.path, verify=not args.no_verify)
    if args.json:
        print(json.dumps(s, indent=1, default=str))
        return 0
    prov = s["provenance"]
    print(f"{s['path']}: pima-hpc dataset v{s['format_version']}, {s['layout']}, {human_bytes(s['bytes'])}"
          + (", checksums OK" if s["verified"] else ", checksums not verified"))
    print(f"  built by {prov.get('builder', '?')} on {prov.get('created_utc', '?')} (seed {prov.get('seed', '?')})")
    print("  modalities:")
    for m in s["modalities"]:
        grid = (f", t in [{m['t_min']:g}, {m['t_max']:g}] {m['t_units']} ({m['points']} points)"
                if "t_min" in m else "")
        print(f"    {m['name']:8s} {m['kind']:5s} {tuple(m['shape'])} stored {m['storage']} ({m['compression']}), "
              f"units {m['units']!r}{grid}")
        print(f"             normalised ({m['normalisation']}, fitted on {m['fit_split']}): "
              f"x_norm = (x - {m['offset']:.6g}) / {m['scale']:.6g}")
        if m.get("per_sample_points"):
            print(f"             measured on per-sample grids (up to {m['per_sample_points']} points each); the "
                  "grid above is the encoder's resampled view")
    print("  splits:")
    for name, sp in s["splits"].items():
        labels = ""
        if "label_counts" in sp:
            labels = ", labels " + " ".join(f"{n}:{c}" for n, c in zip(s["label_names"], sp["label_counts"]))
        print(f"    {name:6s} {sp['count']:>9,d} samples in {sp['files']} file(s), {sp['chunk_rows']} rows/chunk{labels}")
        if sp["truth"]:
            print("           ground truth: " + ", ".join(f"{k} [{u}]" if u else k for k, u in sp["truth"].items()))
    return 0


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` and its subcommands on the ``pima`` command's subparsers."""
    data = subparsers.add_parser("data", help="build and inspect datasets",
                                 description="Build multimodal HDF5 datasets and inspect them (docs/data-format.md).")
    sub = data.add_subparsers(dest="data_command", metavar="{mnist,lattice,convert,fit-experts,info}")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser("mnist", help="multimodal MNIST from the IDX files (Section 3.1)")
    p.add_argument("--idx-dir", required=True, help="folder with the four MNIST IDX files (gzipped or not)")
    p.add_argument("--noise", default="clean",
                   help="std of eps in X2 = c t + eps: 'clean' (0.01), 'noisy' (0.5) or a number (ERRATA 7)")
    p.add_argument("--curve-law", default="digit", choices=("digit", "pairs"),
                   help="slope of X2: digit = c (the paper: the curve alone is the label); pairs = floor(c/2) "
                        "(the curve names only the digit's pair, the image must split it: fusion is needed)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified validation share of the training set")
    _common(p)
    p.set_defaults(func=cmd_mnist)

    p = sub.add_parser("lattice", help="physics-based gyroid/octet lattice images and stress-strain curves")
    p.add_argument("--n", type=int, default=91, help="number of specimens (each gives --augment views)")
    p.add_argument("--size", type=int, default=152, help="stored image side in pixels")
    p.add_argument("--augment", default="paper", choices=("paper", "quadrants", "none"),
                   help="paper: 4 quadrant crops x (as is, flipped x, flipped y) = 12 images per specimen")
    p.add_argument("--population", default="design", choices=("design", "spread"),
                   help="design: each topology at one design density with print scatter (the paper); "
                        "spread: densities drawn over 0.10-0.30, a harder density-confounded set")
    p.add_argument("--density-cv", type=float, default=0.04,
                   help="log-normal print deviation of the density around its design (population design)")
    p.add_argument("--grids", default="shared", choices=("shared", "per-sample"),
                   help="shared: every test on one strain grid; per-sample: each test its own points and "
                        "length (as real tests), the experts fit those points")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of specimens in the test split")
    p.add_argument("--workers", type=int, default=0, help="render in this many processes (same result)")
    _common(p)
    p.set_defaults(func=cmd_lattice)

    p = sub.add_parser("convert", help="your own images + curves (CSV/NPY)")
    p.add_argument("--images", required=True,
                   help="folder of images (png, jpg, tif, bmp, npy; one per sample), or one array file: .npy "
                        "(memory-mapped) / .npz of N x H x W or N x C x H x W, or .txt of one flattened image "
                        "per row (needs --image-shape); array rows pair with curve rows in order")
    p.add_argument("--images-key", default=None, metavar="KEY",
                   help="the array to use when the --images .npz holds several")
    p.add_argument("--image-shape", default=None, metavar="H,W|C,H,W",
                   help="unflatten each row of a .txt (or N x K .npy/.npz) into an H x W or C x H x W image")
    p.add_argument("--curves", required=True, help="curves: .csv (one row per sample) or .npy (N x L)")
    p.add_argument("--t", default=None, help="curve grid: START:STOP or a .npy/.csv file (else the CSV header)")
    p.add_argument("--labels", default=None, help="optional labels file (one per line, or name,label rows)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--curve-units", default="")
    p.add_argument("--t-units", default="")
    p.add_argument("--image-units", default="")
    p.add_argument("--curve-offset", choices=("min", "zero"), default="min",
                   help="normalise curves by (min, max) or (0, max) of the training split")
    _common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("fit-experts", help="how well each expert fits the curves, before training")
    p.add_argument("path", help="a .h5 dataset or a shard directory")
    p.add_argument("--expert", action="append", default=None, help="expert to try (repeatable; default every one)")
    p.add_argument("--options", default=None, help='JSON expert options, e.g. \'{"bspline": {"knots": 8}}\'')
    p.add_argument("--modality", default=None, help="one curve modality (default every one)")
    p.add_argument("--split", default="train")
    p.add_argument("--max-samples", type=int, default=5000, help="evenly spaced curves fitted (bounded time)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fit_experts)

    p = sub.add_parser("info", help="print splits, counts, modalities and metadata; verify checksums")
    p.add_argument("path", help="a .h5 dataset or a shard directory")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum pass (fast)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_info)
    return data
