"""What a builder declares and how each block is stored (docs/data-format.md).

:class:`ModalityLayout` and :class:`TruthField` declare the modalities and ground-truth fields
of a dataset; :func:`check_array` validates a block at the door; :func:`chunk_rows_for`,
:func:`choose_codec` and :func:`compression_kwargs` choose the HDF5 chunking and filters.
:class:`~pima_hpc.data.writer.DatasetWriter` uses all of them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from pima_hpc.data.base import CURVE, KINDS
from pima_hpc.data.errors import DataError
from pima_hpc.data.layout import NORMALISATIONS, STORAGE_DTYPES

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


@dataclass(frozen=True)
class ModalityLayout:
    """What a builder declares about a modality before writing (normalisation comes later).

    ``storage="uint8"`` stores 8-bit codes (images whose training split spans 0..255: lossless,
    4x smaller than float32); ``"float32"`` stores normalised floats. ``normalisation`` is
    ``"minmax"`` or ``"zero-max"`` (offset 0, used for stress so that a law through the origin
    stays linear after normalisation). ``points`` > 0: each sample also keeps up to that many
    measured points on its own grid (pima_hpc/data/points.py).
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
    points: int = 0

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert self.points >= 0 and (self.points == 0 or self.kind == CURVE)
        assert self.storage in STORAGE_DTYPES, self.storage
        assert self.normalisation in NORMALISATIONS, self.normalisation
        assert self.storage != "uint8" or self.normalisation == "minmax"
        if self.kind == CURVE:
            assert self.t is not None and len(self.t) == self.shape[-1], "curve needs t of length L"
        else:
            assert len(self.shape) == 3, "images are (C, H, W)"

    @property
    def sample_bytes(self) -> int:
        return STORAGE_DTYPES[self.storage].itemsize * int(np.prod(self.shape)) + 16 * self.points


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


__all__ = ["AUTO_CODEC", "AUTO_MIN_RATIO", "CHUNK_BYTES", "COMPRESSION", "MAX_CHUNK_ROWS", "ModalityLayout",
           "TruthField", "check_array", "choose_codec", "chunk_rows_for", "codec_name", "compression_kwargs"]
