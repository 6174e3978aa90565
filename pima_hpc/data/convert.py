"""Bring your own data: a folder of images plus curves in CSV/NPY, or arrays from Python.

Everything is validated at the door and converted into the standard layout
(docs/data-format.md): every sample needs every modality, counts must agree, values must be
finite real numbers, images must share one shape, curves one grid. Splits are drawn at random
(stratified by label when labels are given) and normalisation is fitted on the training split.

Curves file formats
-------------------
* ``.npy``: an (N, L) array; the grid comes from ``--t``.
* ``.csv``: one row per sample. An optional header row; if its first cell is ``name`` (or
  ``id``, ``file``, ``image``) the first column holds each sample's image file stem and images
  are paired with curves by name, otherwise by sorted file name and row order. Numeric header
  cells after the name column are the grid t (``--t`` overrides).

Labels (optional): a CSV/TXT with one label per line in sample order, or ``name,label`` rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pima_hpc.data.base import CURVE, IMAGE
from pima_hpc.data.errors import DataError
from pima_hpc.data.splits import stratified_split
from pima_hpc.data.writer import DatasetWriter, ModalityLayout, TruthField, check_array, default_provenance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".npy")
NAME_COLUMNS = ("name", "id", "file", "image", "filename")


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

    Rows are stored in a random order (``shuffle``, from ``seed``): the chunk-aware epoch
    shuffle of the readers assumes stored order carries no information, and user arrays are
    often sorted (by class, by date). Each stored row keeps its position in the given split
    array (or ``source_index[split]``) as the ground-truth field ``source_index``.
    """
    if not splits:
        raise DataError("no splits given; pass e.g. {'train': {...}, 'test': {...}}")
    t, units, t_units, normalisation = t or {}, units or {}, t_units or {}, normalisation or {}
    first_split = "train" if "train" in splits else next(iter(splits))
    first = splits[first_split]
    names = [k for k in first if k != "label"]
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
                                          t_units=t_units.get(n, ""), normalisation=normalisation.get(n, "minmax")))
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
                w.write(s, blk, None if not has_labels else np.asarray(arrays["label"])[rows],
                        {"source_index": src[rows]}, source=f"split {s!r}")
    return Path(out)


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
                   overwrite: bool = False) -> Path:
    """Split paired image and curve arrays at random and write them; the arrays-from-Python path."""
    images, curves = np.asarray(images), np.asarray(curves)
    if len(images) != len(curves):
        raise DataError(f"{len(images)} images but {len(curves)} curves; every sample needs both")
    # validate before splitting, so errors name the caller's own sample numbers
    check_array(images, "images", len(images), images.shape[1:], "array 'images'")
    check_array(curves, "curves", len(curves), curves.shape[1:], "array 'curves'")
    lab = None if labels is None else check_array(labels, "labels", len(images), (), "labels", integer=True)
    parts = random_splits(len(images), val_fraction, test_fraction, seed, lab)
    splits = {s: {"image": images[ix], "curve": curves[ix], **({} if lab is None else {"label": lab[ix]})}
              for s, ix in parts.items()}
    return write_arrays(out, splits, t={"curve": t}, units={"image": image_units, "curve": curve_units},
                        t_units={"curve": t_units}, normalisation={"curve": curve_normalisation},
                        label_names=label_names, shard_size=shard_size, overwrite=overwrite, shuffle=False,
                        source_index=parts)


# --------------------------------------------------------------------------------------------
# Files


def read_image(path: Path) -> np.ndarray:
    """One image as (C, H, W) in its own numeric type."""
    try:
        if path.suffix.lower() == ".npy":
            a = np.load(path, allow_pickle=False)
        else:
            from PIL import Image
            with Image.open(path) as im:
                a = np.asarray(im)
    except Exception as exc:  # PIL raises many types for unreadable files
        raise DataError(f"{path}: cannot read the image ({exc}); remove or re-export it") from None
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and path.suffix.lower() != ".npy":
        a = np.moveaxis(a, -1, 0)
    if a.ndim != 3:
        raise DataError(f"{path}: image has shape {a.shape}; expected (H, W), (H, W, 3/4) or (C, H, W)")
    return a


def read_curves(path: Path) -> tuple[np.ndarray, list[str] | None, np.ndarray | None]:
    """(curves (N, L) float64, names or None, grid t from a numeric CSV header or None)."""
    if not path.is_file():
        raise DataError(f"--curves {path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc}); save it with numpy.save") from None
        if arr.ndim != 2:
            raise DataError(f"{path}: curves array has shape {arr.shape}; expected (samples, points)")
        return check_array(arr, "curves", arr.shape[0], (arr.shape[1],), str(path)).astype(np.float64), None, None
    if path.suffix.lower() not in (".csv", ".txt"):
        raise DataError(f"--curves {path}: unsupported type {path.suffix!r}; use .csv or .npy")
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: no curves in the file")

    def num(c):
        try:
            return float(c)
        except ValueError:
            return None

    header = rows[0] if any(num(c) is None for c in rows[0]) else None
    body = rows[1:] if header is not None else rows
    named = header is not None and header[0].strip().lower() in NAME_COLUMNS
    grid = None
    if header is not None:
        cells = header[1:] if named else header
        vals = [num(c) for c in cells]
        if all(v is not None for v in vals):
            grid = np.array(vals, dtype=np.float64)
    names = [r[0].strip() for r in body] if named else None
    width = len(body[0]) if body else 0
    values = []
    for i, r in enumerate(body):
        if len(r) != width:
            raise DataError(f"{path}: row {i + 1 + (header is not None)} has {len(r)} columns, the first data row "
                            f"{width}; every curve needs the same number of points")
        cells = r[1:] if named else r
        v = [num(c) for c in cells]
        if any(x is None for x in v):
            bad = cells[[x is None for x in v].index(True)]
            raise DataError(f"{path}: row {i + 1 + (header is not None)} has a non-numeric value {bad!r}; "
                            "curves must be numbers (add a 'name' header if the first column is an id)")
        values.append(v)
    if not values:
        raise DataError(f"{path}: no curves in the file")
    arr = np.array(values, dtype=np.float64)
    if names is not None and len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: sample name {dup!r} appears more than once; names must be unique")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        who = f"sample {names[i]!r}" if names else f"data row {i + 1}"
        raise DataError(f"{path}: {int(bad.sum())} NaN/Inf value(s), first in {who}; repair or drop those curves")
    return arr, names, grid


def parse_grid(spec, length: int) -> np.ndarray:
    """``--t``: "a:b" (``length`` evenly spaced points) or a .npy/.csv file of ``length`` values."""
    s = str(spec)
    if ":" in s and not Path(s).exists():
        try:
            a, b = (float(x) for x in s.split(":"))
        except ValueError:
            raise DataError(f"--t {s!r}: expected START:STOP (e.g. 0:1) or a file of grid values") from None
        return np.linspace(a, b, length)
    p = Path(s)
    if not p.is_file():
        raise DataError(f"--t {s!r}: not START:STOP and no such file")
    g = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, delimiter=",", ndmin=1)
    g = np.asarray(g, dtype=np.float64).ravel()
    if len(g) != length:
        raise DataError(f"--t {p}: {len(g)} grid values but the curves have {length} points")
    return check_array(g, "grid t", length, (), str(p))


def read_labels(path: Path, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Labels for samples ``names`` (in order) from one-per-line or ``name,label`` rows."""
    if not path.is_file():
        raise DataError(f"--labels {path}: no such file")
    with open(path, newline="") as fh:
        rows = [[c.strip() for c in r] for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].lower() in NAME_COLUMNS + ("label",):
        rows = rows[1:]
    if rows and len(rows[0]) >= 2:
        table = {r[0]: r[1] for r in rows}
        missing = [n for n in names if n not in table]
        if missing:
            raise DataError(f"{path}: no label for sample {missing[0]!r}; add a row for every sample")
        raw = [table[n] for n in names]
    else:
        raw = [r[0] for r in rows]
        if len(raw) != len(names):
            raise DataError(f"{path}: {len(raw)} labels for {len(names)} samples; give one label per sample")
    classes = sorted(set(raw), key=lambda c: (0, int(c)) if c.lstrip("-").isdigit() else (1, c))
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[c] for c in raw], dtype=np.int64), classes


def convert_files(out, images_dir, curves_file, *, t=None, labels_file=None, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, seed: int = 0, curve_units: str = "", t_units: str = "",
                  image_units: str = "", curve_normalisation: str = "minmax", shard_size: int | None = None,
                  overwrite: bool = False, progress: bool = True, block: int = 512) -> Path:
    """Convert a folder of images and a curves file; images are read in blocks (bounded memory)."""
    images_dir, curves_file = Path(images_dir), Path(curves_file)
    if not images_dir.is_dir():
        raise DataError(f"--images {images_dir}: no such directory")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"--images {images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DataError(f"--images {images_dir}: two files share the name {dup!r}; names identify samples")
    curves, names, grid = read_curves(curves_file)
    if names is not None:
        pos = {n: i for i, n in enumerate(names)}
        no_curve = [s for s in stems if s not in pos]
        if no_curve:
            raise DataError(f"{curves_file}: no curve for image {no_curve[0]!r} ({len(no_curve)} image(s) without "
                            "a curve); add its row or remove the image")
        no_image = sorted(set(names) - set(stems))
        if no_image:
            raise DataError(f"{images_dir}: no image for curve {no_image[0]!r} in {curves_file} ({len(no_image)} "
                            "curve(s) without an image); add the image or drop the row")
        curves = curves[[pos[s] for s in stems]]
    elif len(curves) != len(files):
        raise DataError(f"{len(files)} images in {images_dir} but {len(curves)} curves in {curves_file}; every "
                        "sample needs both (or add a 'name' column to pair them by name)")
    if t is not None:
        grid = parse_grid(t, curves.shape[1])
    if grid is None:
        raise DataError(f"{curves_file}: the curves' grid t is unknown; pass --t START:STOP or a file, or put the "
                        "grid values in the CSV header")
    if len(grid) != curves.shape[1]:
        raise DataError(f"{curves_file}: header grid has {len(grid)} values but rows have {curves.shape[1]} points")
    labels, label_names = (None, None) if labels_file is None else read_labels(Path(labels_file), stems)
    first = read_image(files[0])
    parts = random_splits(len(files), val_fraction, test_fraction, seed, labels)
    modalities = [
        ModalityLayout("image", IMAGE, tuple(first.shape), units=image_units, description=f"from {images_dir}"),
        ModalityLayout("curve", CURVE, (curves.shape[1],), t=grid, units=curve_units, t_units=t_units,
                       normalisation=curve_normalisation, description=f"from {curves_file}"),
    ]
    prov = default_provenance("custom", "pima_hpc.data.convert.convert_files", images=str(images_dir),
                              curves=str(curves_file), labels=None if labels_file is None else str(labels_file),
                              seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(files), unit="sample", desc="convert", dynamic_ncols=True, disable=not progress)
    truth = [TruthField("source_index", "int64", "", "position of the image file in sorted name order")]
    with DatasetWriter(out, modalities, {s: len(ix) for s, ix in parts.items()}, shard_size=shard_size,
                       label_names=label_names, truth=truth, provenance=prov, overwrite=overwrite) as w:
        for s, ix in parts.items():
            for a in range(0, len(ix), block):
                sel = ix[a:a + block]
                imgs = []
                for i in sel:
                    im = first if i == 0 else read_image(files[i])
                    if im.shape != first.shape:
                        raise DataError(f"{files[i]}: image shape {im.shape} (C, H, W) differs from {files[0].name}'s "
                                        f"{first.shape}; resize or crop all images to one size")
                    imgs.append(check_array(im[None], "image", 1, first.shape, str(files[i])))
                w.write(s, {"image": np.concatenate(imgs), "curve": curves[sel]},
                        None if labels is None else labels[sel], {"source_index": sel},
                        source=f"{images_dir} ({files[sel[0]].name}..)")
                bar.update(len(sel))
    bar.close()
    return Path(out)


__all__ = ["write_arrays", "convert_arrays", "convert_files", "read_curves", "read_image", "random_splits"]
