"""Bring your own data: images (a folder or one array file) plus curves in CSV/NPY, or arrays from Python.

Everything is validated at the door and converted into the standard layout
(docs/data-format.md): every sample needs every modality, counts must agree, values must be
finite real numbers, images must share one shape, curves one grid. Splits are drawn at random
(stratified by label when labels are given) and normalisation is fitted on the training split.
The output location is checked before any input is read, so a bad ``--out`` costs seconds.

The input formats (``--images``, ``--curves``, ``--labels``) and their readers are in
:mod:`~pima_hpc.data.sources`; a folder and an array of images are both an
:class:`~pima_hpc.data.sources.ImageSource`, read in blocks by one writer loop (:func:`write_paired`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pima_hpc.data.base import CURVE, IMAGE
from pima_hpc.data.errors import DataError
from pima_hpc.data.layout import HDF5_SUFFIXES
from pima_hpc.data.points import check_points, pad_points, reference_grid, resample
from pima_hpc.data.sources import ArrayImages, ImageSource, open_images, parse_grid, read_curves, read_labels
from pima_hpc.data.splits import stratified_split
from pima_hpc.data.storage import ModalityLayout, TruthField, check_array
from pima_hpc.data.writer import DatasetWriter, default_provenance


# --------------------------------------------------------------------------------------------
# Output


def check_output(out, shard_size: int | None = None, overwrite: bool = False) -> Path:
    """Fail on an unusable ``--out`` before any input is read; create nothing.

    DatasetWriter makes the same checks, but only once the inputs are read and the layout is
    known - after every image of a large folder. A shard directory's missing parents are fine
    here: :func:`make_output_parent` creates them just before writing.
    """
    out = Path(out)
    if shard_size is not None:
        if shard_size < 1:
            raise DataError(f"--shard-size must be >= 1, got {shard_size}")
        if out.suffix in HDF5_SUFFIXES:
            raise DataError(f"{out}: a sharded dataset is a directory; drop the {out.suffix} suffix "
                            "or leave out --shard-size for a single file")
    elif out.suffix not in HDF5_SUFFIXES:
        raise DataError(f"{out}: a single-file dataset needs a .h5 suffix; add it, or pass "
                        "--shard-size K to write a directory of shards")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite")
    if shard_size is None and not out.parent.exists():
        raise DataError(f"--out {out}: parent directory {out.parent} does not exist; create it first")
    base = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not base.is_dir():
        raise DataError(f"--out {out}: {base} is a file, not a directory; choose another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: cannot write in {base}; choose another --out or fix its permissions")
    return out


def make_output_parent(out, shard_size: int | None) -> None:
    """Create a shard directory's missing parents (like ``mkdir -p``), once the inputs have passed."""
    if shard_size is None:
        return
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--out {out}: cannot create its parent directory ({exc.strerror}); create it first") from None


# --------------------------------------------------------------------------------------------
# Python arrays


def write_arrays(out, splits: dict[str, dict[str, np.ndarray]], *, t: dict | None = None,
                 units: dict | None = None, t_units: dict | None = None, normalisation: dict | None = None,
                 label_names=None, shard_size: int | None = None, overwrite: bool = False,
                 name: str = "custom", provenance: dict | None = None, shuffle: bool = True, seed: int = 0,
                 source_index: dict | None = None, block: int = 4096) -> Path:
    """Write pre-split arrays (physical units) as a dataset; return ``out``.

    ``splits`` maps split name -> {modality: array, optionally "label": int array}. A modality
    is an image if its array is (N, C, H, W) or (N, H, W), a curve if (N, L) - then ``t[name]``
    (length L) is required. ``normalisation[name]`` is "minmax" (default) or "zero-max".

    A curve measured on per-sample grids is a dict ``{"t": grids, "x": values}`` (sequences of
    1-D arrays, one pair per sample, any lengths; or padded (N, P) arrays plus ``"length"``). Its
    points are kept as measured and the encoder's view is interpolated onto the reference grid
    ``t[name]`` (default: the median length, equally spaced over the training split's range;
    pima_hpc/data/points.py).

    Rows are stored in a random order (``shuffle``, from ``seed``): the chunk-aware epoch
    shuffle of the readers assumes stored order carries no information, and user arrays are
    often sorted (by class, by date). Each stored row keeps its position in the given split
    array (or ``source_index[split]``) as the ground-truth field ``source_index``.
    """
    check_output(out, shard_size, overwrite)
    if not splits:
        raise DataError("no splits given; pass e.g. {'train': {...}, 'test': {...}}")
    t, units, t_units, normalisation = dict(t or {}), units or {}, t_units or {}, normalisation or {}
    first_split = "train" if "train" in splits else next(iter(splits))
    first = splits[first_split]
    names = [k for k in first if k != "label"]
    splits, measured = _per_sample_curves(splits, names, t)
    first = splits[first_split]
    if len(names) < 2:
        raise DataError(f"split {first_split!r} has modalities {names}; PIMA needs at least 2 (e.g. image and curve)")
    layouts = []
    for n in names:
        a = np.asarray(first[n])
        if a.ndim in (3, 4):
            shape = (1, *a.shape[1:]) if a.ndim == 3 else tuple(a.shape[1:])
            layouts.append(ModalityLayout(n, IMAGE, shape, units=units.get(n, ""), storage="float32",
                                          normalisation=normalisation.get(n, "minmax")))
        elif a.ndim == 2:
            if n not in t:
                raise DataError(f"array {n!r}: a curve modality needs its grid; pass t={{{n!r}: array of length "
                                f"{a.shape[1]}}}")
            grid = check_array(np.asarray(t[n], dtype=np.float64), f"grid t of {n!r}", a.shape[1], (),
                               f"array {n!r}")
            layouts.append(ModalityLayout(n, CURVE, (a.shape[1],), t=grid, units=units.get(n, ""),
                                          t_units=t_units.get(n, ""), normalisation=normalisation.get(n, "minmax"),
                                          points=measured[n][first_split][0].shape[1] if n in measured else 0))
        else:
            raise DataError(f"array {n!r} has shape {a.shape}; expected images (N, C, H, W) or (N, H, W), or "
                            "curves (N, L)")
    has_labels = any("label" in s for s in splits.values())
    if has_labels and not all("label" in s for s in splits.values()):
        raise DataError("labels are given for some splits only; give them for every split or none")
    counts = {}
    for s, arrays in splits.items():
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"split {s!r}: modality {missing[0]!r} is missing; every split needs {names}")
        extra = [k for k in arrays if k not in names and k != "label"]
        if extra:
            raise DataError(f"split {s!r}: modality {extra[0]!r} is not in split {first_split!r}; every split "
                            "needs the same modalities")
        lens = {k: len(np.asarray(v)) for k, v in arrays.items()}
        if len(set(lens.values())) != 1:
            raise DataError(f"split {s!r}: mismatched sample counts {lens}; every sample needs every modality")
        counts[s] = next(iter(lens.values()))
        for n in names:  # whole-array checks, so an error names the sample's row in this split
            a = np.asarray(arrays[n])
            check_array(a, f"modality {n!r}", len(a), a.shape[1:], f"split {s!r}")
    if has_labels and label_names is None:
        top = max(int(np.max(np.asarray(s["label"]))) for s in splits.values() if len(s["label"]))
        label_names = [str(i) for i in range(top + 1)]
    prov = provenance or default_provenance(name, "pima_hpc.data.convert.write_arrays")
    rng = np.random.default_rng([seed, 5])
    truth = [TruthField("source_index", "int64", "", "row of the sample in the caller's split array")]
    make_output_parent(out, shard_size)
    with DatasetWriter(out, layouts, counts, shard_size=shard_size, label_names=label_names, truth=truth,
                       provenance=prov, overwrite=overwrite) as w:
        for s, arrays in splits.items():
            order = rng.permutation(counts[s]) if shuffle else np.arange(counts[s])
            src = np.arange(counts[s]) if source_index is None else np.asarray(source_index[s])
            for a in range(0, counts[s], block):
                rows = order[a:a + block]
                blk = {}
                for lay in layouts:
                    x = np.asarray(arrays[lay.name])[rows]
                    blk[lay.name] = x[:, None] if (lay.kind == IMAGE and x.ndim == 3) else x
                pts = {n: tuple(a[rows] for a in measured[n][s]) for n in measured}
                w.write(s, blk, None if not has_labels else np.asarray(arrays["label"])[rows],
                        {"source_index": src[rows]}, source=f"split {s!r}", points=pts)
    return Path(out)


def _per_sample_curves(splits: dict, names: list[str], t: dict) -> tuple[dict, dict]:
    """Curves given as {"t", "x"[, "length"]} per split -> the splits with each such curve replaced by its
    view on the reference grid (t[name] is set to it), and {name: {split: (t, x, length)}} padded to one P."""
    ragged = [n for n in names if isinstance(splits[next(iter(splits))][n], dict)]
    measured: dict[str, dict] = {}
    for n in ragged:
        per = {}
        for s, arrays in splits.items():
            d = arrays.get(n)
            if not isinstance(d, dict) or "t" not in d or "x" not in d:
                raise DataError(f"split {s!r}: curve {n!r} is measured on per-sample grids in one split; give it "
                                "as {'t': grids, 'x': values} in every split")
            if "length" in d:
                tp, xp = np.asarray(d["t"], np.float64), np.asarray(d["x"], np.float64)
                per[s] = check_points(tp, xp, d["length"], len(tp), tp.shape[1] if tp.ndim == 2 else -1, n,
                                      f"split {s!r}")
            else:
                tp, xp, lp = pad_points(d["t"], d["x"], f"split {s!r}, curve {n!r}")
                per[s] = check_points(tp, xp, lp, len(tp), tp.shape[1], n, f"split {s!r}")
        width = max(a[0].shape[1] for a in per.values())
        for s, (tp, xp, lp) in per.items():  # one padded width P for every split
            pad = width - tp.shape[1]
            per[s] = (np.pad(tp, ((0, 0), (0, pad)), mode="edge"), np.pad(xp, ((0, 0), (0, pad)), mode="edge"), lp)
        fit = per["train"] if "train" in per else next(iter(per.values()))
        grid = np.asarray(t[n], np.float64) if n in t else reference_grid(fit[0], fit[2])
        t[n] = grid
        measured[n] = per
        splits = {s: {**arrays, n: resample(*per[s], grid)} for s, arrays in splits.items()}
    return splits, measured


def random_splits(n: int, val_fraction: float, test_fraction: float, seed: int,
                  labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Index sets for train/val/test in random order (stratified by ``labels`` if given); empty ones omitted."""
    for name, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"--val-fraction + --test-fraction must be < 1, got {val_fraction + test_fraction}")
    rng = np.random.default_rng([seed, 3])
    lab = labels if labels is not None else np.zeros(n, dtype=np.int64)
    rest, test = stratified_split(lab, test_fraction, rng)
    keep, val = stratified_split(lab[rest], val_fraction / (1 - test_fraction), rng)
    out = {"train": rest[keep], "val": rest[val], "test": test}
    if len(out["train"]) == 0:
        raise DataError(f"{n} samples leave an empty training split; add samples or lower the fractions")
    for s, f in (("val", val_fraction), ("test", test_fraction)):
        if f > 0 and len(out[s]) == 0:
            raise DataError(f"{n} samples leave an empty {s} split at fraction {f}; add samples or set it to 0")
    return {s: ix for s, ix in out.items() if len(ix)}


def convert_arrays(out, images, curves, t, labels=None, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                   seed: int = 0, label_names=None, curve_units: str = "", t_units: str = "",
                   image_units: str = "", curve_normalisation: str = "minmax", shard_size: int | None = None,
                   overwrite: bool = False, progress: bool = False) -> Path:
    """Split paired image (N, H, W) / (N, C, H, W) and curve (N, L) arrays at random and write them.

    The arrays-from-Python path. It writes through the same loop as :func:`convert_files`, so the
    same images give the same dataset whether they come as arrays, an array file or a folder.
    """
    check_output(out, shard_size, overwrite)
    source = ArrayImages(images, "array 'images'", "row of the sample in the caller's images array")
    curves = np.asarray(curves)
    if curves.ndim != 2:
        raise DataError(f"array 'curves' has shape {curves.shape}; expected (samples, points)")
    if len(source) != len(curves):
        raise DataError(f"{len(source)} images but {len(curves)} curves; every sample needs both")
    # validate whole arrays before splitting, so errors name the caller's own sample numbers; a
    # memory-mapped array is checked block by block as it is written (ArrayImages.read) instead
    if not isinstance(source.array, np.memmap):
        check_array(source.array, "images", len(source), source.array.shape[1:], "array 'images'")
    check_array(curves, "curves", len(curves), curves.shape[1:], "array 'curves'")
    grid = check_array(np.asarray(t, dtype=np.float64), "grid t", curves.shape[1], (), "array 't'")
    lab = None if labels is None else check_array(labels, "labels", len(curves), (), "labels", integer=True)
    if lab is not None and label_names is None:
        label_names = [str(i) for i in range(int(lab.max()) + 1)] if len(lab) else []
    prov = default_provenance("custom", "pima_hpc.data.convert.convert_arrays", seed=seed,
                              val_fraction=val_fraction, test_fraction=test_fraction)
    return write_paired(out, source, curves, grid, lab, label_names, val_fraction=val_fraction,
                        test_fraction=test_fraction, seed=seed, curve_units=curve_units, t_units=t_units,
                        image_units=image_units, curve_normalisation=curve_normalisation, curves_where="array 'curves'",
                        provenance=prov, shard_size=shard_size, overwrite=overwrite, progress=progress)



def pair_curves(source: ImageSource, curves: np.ndarray, names: list[str] | None, curves_file) -> np.ndarray:
    """The curves in the images' sample order: by name (folder + named CSV), else by row order."""
    if names is not None:
        if source.names is None:
            raise DataError(f"{curves_file}: the curves are named (a 'name' column) but --images {source.where} is "
                            "an array, which pairs with curves by row order; drop the name column or pass a "
                            "folder of images named after the samples")
        pos = {n: i for i, n in enumerate(names)}
        no_curve = [s for s in source.names if s not in pos]
        if no_curve:
            raise DataError(f"{curves_file}: no curve for image {no_curve[0]!r} ({len(no_curve)} image(s) without "
                            "a curve); add its row or remove the image")
        no_image = sorted(set(names) - set(source.names))
        if no_image:
            raise DataError(f"{source.where}: no image for curve {no_image[0]!r} in {curves_file} ({len(no_image)} "
                            "curve(s) without an image); add the image or drop the row")
        return curves[[pos[s] for s in source.names]]
    if len(curves) != len(source):
        fix = ("or add a 'name' column to pair them by name" if source.names is not None else
               "array rows pair in order, so give one curve row per image row")
        raise DataError(f"{len(source)} images in {source.where} but {len(curves)} curves in {curves_file}; every "
                        f"sample needs both ({fix})")
    return curves


def write_paired(out, source: ImageSource, curves: np.ndarray, grid: np.ndarray, labels=None, label_names=None, *,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, curve_units: str = "",
                 t_units: str = "", image_units: str = "", curve_normalisation: str = "minmax",
                 curves_where: str = "curves", provenance: dict | None = None, shard_size: int | None = None,
                 overwrite: bool = False, progress: bool = True, block: int = 512) -> Path:
    """Split at random and write images from ``source`` with their curves, ``block`` images at a time.

    The one writer loop behind folders, array files and arrays from Python: only a block of
    images is ever in memory (a memory-mapped array reads just those rows). ``source_index``
    records which sample of ``source`` each stored row is.
    """
    parts = random_splits(len(source), val_fraction, test_fraction, seed, labels)
    modalities = [
        ModalityLayout("image", IMAGE, source.shape, units=image_units, description=f"from {source.where}"),
        ModalityLayout("curve", CURVE, (curves.shape[1],), t=grid, units=curve_units, t_units=t_units,
                       normalisation=curve_normalisation, description=f"from {curves_where}"),
    ]
    from tqdm.auto import tqdm
    bar = tqdm(total=len(source), unit="sample", desc="convert", dynamic_ncols=True, disable=not progress)
    truth = [TruthField("source_index", "int64", "", source.index_meaning)]
    make_output_parent(out, shard_size)
    with DatasetWriter(out, modalities, {s: len(ix) for s, ix in parts.items()}, shard_size=shard_size,
                       label_names=label_names, truth=truth, provenance=provenance, overwrite=overwrite) as w:
        for s, ix in parts.items():
            for a in range(0, len(ix), block):
                sel = ix[a:a + block]
                w.write(s, {"image": source.read(sel), "curve": curves[sel]},
                        None if labels is None else labels[sel], {"source_index": sel}, source=source.block_name(sel))
                bar.update(len(sel))
    bar.close()
    return Path(out)


def convert_files(out, images, curves_file, *, images_key: str | None = None, image_shape=None, t=None,
                  labels_file=None, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                  curve_units: str = "", t_units: str = "", image_units: str = "",
                  curve_normalisation: str = "minmax", shard_size: int | None = None, overwrite: bool = False,
                  progress: bool = True, block: int = 512) -> Path:
    """Convert images (a folder, or an array file: see :mod:`~pima_hpc.data.sources`) and a curves file.

    ``--out`` is checked first, so a bad output path is reported before any image is read;
    images are then read in blocks (bounded memory).
    """
    check_output(out, shard_size, overwrite)
    source = open_images(images, images_key, image_shape)
    curves_file = Path(curves_file)
    curves, names, grid = read_curves(curves_file)
    curves = pair_curves(source, curves, names, curves_file)
    if t is not None:
        grid = parse_grid(t, curves.shape[1])
    if grid is None:
        raise DataError(f"{curves_file}: the curves' grid t is unknown; pass --t START:STOP or a file, or put the "
                        "grid values in the CSV header")
    if len(grid) != curves.shape[1]:
        raise DataError(f"{curves_file}: header grid has {len(grid)} values but rows have {curves.shape[1]} points")
    ids = source.names if source.names is not None else [str(i) for i in range(len(source))]
    labels, label_names = (None, None) if labels_file is None else read_labels(Path(labels_file), ids)
    prov = default_provenance("custom", "pima_hpc.data.convert.convert_files", images=str(images),
                              images_key=images_key, curves=str(curves_file),
                              labels=None if labels_file is None else str(labels_file),
                              seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return write_paired(out, source, curves, grid, labels, label_names, val_fraction=val_fraction,
                        test_fraction=test_fraction, seed=seed, curve_units=curve_units, t_units=t_units,
                        image_units=image_units, curve_normalisation=curve_normalisation,
                        curves_where=str(curves_file), provenance=prov, shard_size=shard_size,
                        overwrite=overwrite, progress=progress, block=block)


__all__ = ["check_output", "convert_arrays", "convert_files", "pair_curves", "random_splits", "write_arrays",
           "write_paired"]
