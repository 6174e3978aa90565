"""Reading a user's own data: image folders and arrays, curve tables and label files.

Everything read is validated at the door (finite real numbers, one image shape, one curve grid)
and every problem is one :class:`DataError` naming the file and the fix;
:mod:`~pima_hpc.data.convert` pairs what is read here and writes the dataset.

Image inputs (``--images``)
---------------------------
* a folder with one file per sample (png, jpg, tif, bmp, gif via Pillow, or .npy), sample names
  are the file stems, samples in sorted name order;
* an array file: ``.npy`` (memory-mapped, so it may exceed memory), ``.npz`` (one array, or the
  one named by ``--images-key``) of N x H x W or N x C x H x W, or ``.txt`` (``np.loadtxt``: one
  sample per row of C*H*W values, channel by channel and row by row; needs ``--image-shape H,W``
  or ``C,H,W``). ``--image-shape`` also unflattens an N x K ``.npy``/``.npz`` array. Array rows
  are samples 0..N-1 and pair with curves by row order.

Both are an :class:`ImageSource`, read in blocks by one writer loop
(:func:`~pima_hpc.data.convert.write_paired`).

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
from pathlib import Path

import numpy as np

from pima_hpc.data.errors import DataError
from pima_hpc.data.storage import check_array

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".npy")
ARRAY_SUFFIXES = (".npy", ".npz", ".txt")
NAME_COLUMNS = ("name", "id", "file", "image", "filename")


# --------------------------------------------------------------------------------------------
# Image sources: a folder and an array behind one interface, so both share convert.write_paired


class ImageSource:
    """Images by sample index (C, H, W each), read a block at a time by ``convert.write_paired``.

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
# Files: one image, a curves table, a grid, labels


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


__all__ = ["ARRAY_SUFFIXES", "IMAGE_SUFFIXES", "NAME_COLUMNS", "ArrayImages", "FolderImages", "ImageSource",
           "load_image_array", "open_images", "parse_grid", "parse_image_shape", "read_curves", "read_image",
           "read_labels", "unflatten"]
