"""Bring your own data: images (a folder or one array file) plus curves in CSV/NPY, or arrays from Python.

Everything is validated at the door and converted into the standard layout
(docs/data-format.md): every sample needs every modality, counts must agree, values must be
finite real numbers, images must share one shape, curves one grid. Splits are drawn at random
(stratified by label when labels are given) and normalisation is fitted on the training split.
The output location is checked before any input is read, so a bad ``--out`` costs seconds.

Image inputs (``--images``)
---------------------------
* a folder with one file per sample (png, jpg, tif, bmp, gif via Pillow, or .npy), sample names
  are the file stems, samples in sorted name order;
* an array file: ``.npy`` (memory-mapped, so it may exceed memory), ``.npz`` (one array, or the
  one named by ``--images-key``) of N x H x W or N x C x H x W, or ``.txt`` (``np.loadtxt``: one
  sample per row of C*H*W values, channel by channel and row by row; needs ``--image-shape H,W``
  or ``C,H,W``). ``--image-shape`` also unflattens an N x K ``.npy``/``.npz`` array. Array rows
  are samples 0..N-1 and pair with curves by row order.

Both are an :class:`ImageSource`, read in blocks by one writer loop (:func:`write_paired`).

Curves file formats
-------------------
* ``.npy``: an (N, L) array; the grid comes from ``--t``.
* ``.csv``: one row per sample. An optional header row; if its first cell is ``name`` (or
  ``id``, ``file``, ``image``) the first column holds each sample's image file stem and images
  are paired with curves by name (folders only), otherwise by sorted file name and row order.
  Numeric header cells after the name column are the grid t (``--t`` overrides).

Labels (optional): a CSV/TXT with one label per line in sample order, or ``name,label`` rows
(for an array of images the names are the row numbers 0..N-1).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from pima_hpc.data.base import CURVE, IMAGE
from pima_hpc.data.errors import DataError
from pima_hpc.data.layout import HDF5_SUFFIXES
from pima_hpc.data.splits import stratified_split
from pima_hpc.data.writer import DatasetWriter, ModalityLayout, TruthField, check_array, default_provenance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".npy")
ARRAY_SUFFIXES = (".npy", ".npz", ".txt")
NAME_COLUMNS = ("name", "id", "file", "image", "filename")


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

    Rows are stored in a random order (``shuffle``, from ``seed``): the chunk-aware epoch
    shuffle of the readers assumes stored order carries no information, and user arrays are
    often sorted (by class, by date). Each stored row keeps its position in the given split
    array (or ``source_index[split]``) as the ground-truth field ``source_index``.
    """
    check_output(out, shard_size, overwrite)
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


# --------------------------------------------------------------------------------------------
# Image sources: a folder and an array behind one interface, so both share write_paired


class ImageSource:
    """Images by sample index (C, H, W each), read a block at a time by :func:`write_paired`.

    ``where`` names the input in messages; ``names`` are the sample names that pair images
    with named curves (None: pair by row order); ``index_meaning`` describes the stored
    ``source_index`` (which sample of this input a stored row came from).
    """

    where: str = ""
    names: list[str] | None = None
    index_meaning: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images ``indices`` as (n, C, H, W), validated (one shape, finite values)."""
        raise NotImplementedError

    def block_name(self, indices: np.ndarray) -> str:
        return f"{self.where} (sample {int(indices[0])}..)"


class FolderImages(ImageSource):
    """One image file per sample in sorted name order; nothing is read until :meth:`read` / ``shape``."""

    index_meaning = "position of the image file in sorted name order"

    def __init__(self, folder: Path):
        self.where = str(folder)
        if not folder.is_dir():
            raise DataError(f"--images {folder}: no such directory")
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.names = [p.stem for p in self.files]
        if len(set(self.names)) != len(self.names):
            dup = next(s for s in self.names if self.names.count(s) > 1)
            raise DataError(f"--images {folder}: two files share the name {dup!r}; names identify samples")
        self._first = None

    def __len__(self):
        return len(self.files)

    @property
    def shape(self):
        if self._first is None:
            self._first = read_image(self.files[0])
        return tuple(self._first.shape)

    def read(self, indices):
        imgs = []
        for i in indices:
            im = self._first if i == 0 and self._first is not None else read_image(self.files[i])
            if im.shape != self.shape:
                raise DataError(f"{self.files[i]}: image shape {im.shape} (C, H, W) differs from "
                                f"{self.files[0].name}'s {self.shape}; resize or crop all images to one size")
            imgs.append(check_array(im[None], "image", 1, self.shape, str(self.files[i])))
        return np.concatenate(imgs)

    def block_name(self, indices):
        return f"{self.where} ({self.files[int(indices[0])].name}..)"


class ArrayImages(ImageSource):
    """Rows of an (N, H, W) or (N, C, H, W) array, in memory or memory-mapped (only the rows of a block are read)."""

    def __init__(self, array, where: str, index_meaning: str = "row of the sample in the images array"):
        self.array = array if isinstance(array, np.ndarray) else np.asarray(array)
        self.where, self.index_meaning = where, index_meaning
        if self.array.ndim not in (3, 4):
            raise DataError(f"{where}: images array has shape {self.array.shape}; expected N x H x W or "
                            "N x C x H x W (or N rows of flattened images with --image-shape H,W or C,H,W)")
        if self.array.dtype.kind not in "biuf":
            raise DataError(f"{where}: images have dtype {self.array.dtype}; expected real numbers "
                            "(convert strings/objects/complex to float first)")
        if len(self.array) == 0:
            raise DataError(f"{where}: no images (0 rows)")

    def __len__(self):
        return len(self.array)

    @property
    def shape(self):
        s = self.array.shape[1:]
        return (1, *s) if len(s) == 2 else tuple(s)

    def read(self, indices):
        indices = np.asarray(indices)
        a = np.asarray(self.array[indices]).reshape(len(indices), *self.shape)
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a.reshape(len(a), -1))
            if bad.any():
                rows = np.flatnonzero(bad.any(1))
                first = int(indices[rows].min())
                raise DataError(f"{self.where}: image row {first} has non-finite values (NaN/Inf; {len(rows)} such "
                                "row(s) in this block); repair or drop those rows and their curves before converting")
        return a

    def block_name(self, indices):
        return f"{self.where} (rows from {int(indices[0])})"


def parse_image_shape(spec) -> tuple[int, ...] | None:
    """``--image-shape``: "H,W" or "C,H,W" (or a tuple of ints) -> tuple, None if not given."""
    if spec is None:
        return None
    parts = spec.replace("x", ",").split(",") if isinstance(spec, str) else list(spec)
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise DataError(f"--image-shape {spec!r}: expected H,W or C,H,W as positive integers (e.g. 28,28 or 3,64,64)")
    return shape


def unflatten(a: np.ndarray, shape: tuple[int, ...] | None, where: str) -> np.ndarray:
    """Apply ``--image-shape``: each sample's values in C order become one (H, W) or (C, H, W) image."""
    if shape is None:
        if a.ndim == 2:
            raise DataError(f"{where}: array of shape {a.shape} holds {a.shape[1]} values per sample; pass "
                            "--image-shape H,W or C,H,W to unflatten each row into an image")
        return a
    per, need = int(np.prod(a.shape[1:])) if a.ndim >= 2 else 1, int(np.prod(shape))
    if a.ndim < 2 or per != need:
        raise DataError(f"{where}: samples of {per} values (array shape {a.shape}) do not fit --image-shape "
                        f"{','.join(map(str, shape))} ({need} values); fix --image-shape")
    return a.reshape(len(a), *shape)


def load_image_array(path: Path, key: str | None = None, image_shape=None) -> ArrayImages:
    """An images array file as an :class:`ArrayImages` (.npy memory-mapped; .npz and .txt are loaded)."""
    suffix, shape = path.suffix.lower(), parse_image_shape(image_shape)
    if key is not None and suffix != ".npz":
        raise DataError(f"--images-key {key!r}: only an .npz holds several arrays; drop it for {path.name}")
    where = str(path)
    try:
        if suffix == ".npy":
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.files)
                if key is None and len(keys) != 1:
                    raise DataError(f"--images {path}: holds {len(keys)} arrays {keys}; choose one with "
                                    "--images-key KEY")
                key = keys[0] if key is None else key
                if key not in keys:
                    raise DataError(f"--images-key {key!r}: no such array in {path}; it holds {keys}")
                a, where = z[key], f"{path}[{key}]"
        else:
            if shape is None:
                raise DataError(f"--images {path}: a text file holds one flattened image per row; pass "
                                "--image-shape H,W (or C,H,W) to say how to unflatten each row")
            with open(path) as fh:
                first = next((ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")), "")
            a = np.loadtxt(path, delimiter="," if "," in first else None, ndmin=2, dtype=np.float64)
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"--images {path}: not a readable {suffix} file ({exc}); save images with numpy.save / "
                        "numpy.savez, or as numbers in rows for .txt") from None
    return ArrayImages(unflatten(a, shape, where), where)


def open_images(images, key: str | None = None, image_shape=None) -> ImageSource:
    """``--images``: a folder (one file per sample) or an array file (.npy, .npz, .txt)."""
    path = Path(images)
    if path.is_dir():
        if key is not None or image_shape is not None:
            raise DataError(f"--images {path} is a folder; --images-key and --image-shape apply to array files only")
        return FolderImages(path)
    if not path.exists():
        raise DataError(f"--images {path}: no such directory or file; pass a folder of images or an array file "
                        f"({', '.join(ARRAY_SUFFIXES)})")
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        raise DataError(f"--images {path}: unsupported type {path.suffix!r}; pass a folder of images or an array "
                        f"file ({', '.join(ARRAY_SUFFIXES)})")
    return load_image_array(path, key, image_shape)


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
    """Convert images (a folder, or an array file: see the module docstring) and a curves file.

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


__all__ = ["ArrayImages", "FolderImages", "ImageSource", "check_output", "convert_arrays", "convert_files",
           "open_images", "random_splits", "read_curves", "read_image", "write_arrays", "write_paired"]
