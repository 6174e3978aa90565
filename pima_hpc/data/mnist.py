"""Multimodal MNIST (Section 3.1) from the original IDX files.

X1 is the 28x28 digit image. X2 = c t + eps on 20 points of t in [0, 1], c the digit, with
eps ~ N(0, s^2) and s = 0.01 ("clean") or 0.5 ("noisy"): ERRATA 7 reads the paper's N(0, 0.01)
and N(0, 0.5) as standard deviations, as the authors' code does.

In the paper's set the curve's slope IS the label: the curve alone identifies the digit, so the set
cannot show what fusion adds. ``curve_law="pairs"`` builds a set in which neither modality alone
identifies the ten digits: the slope is floor(c / 2), so the curve names only the pair {0,1}, {2,3},
{4,5}, {6,7} or {8,9} (at most 50 % under the ten-cluster Hungarian score), the image has to tell
the two digits of a pair apart, and k-means on the pixels alone reaches ~50-55 %. Both modalities are min-max
normalised to [0, 1] with statistics of the training split only (Appendix A): images by
(0, 255), which the training digits span, stored losslessly as 8-bit codes; curves by their
training min and max. The training set is split 90/10 into train/validation, stratified by
digit (Section 3 and Appendix A); the standard 10,000 test digits form the test split.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from pima_hpc.data.errors import DataError
from pima_hpc.data.splits import stratified_split
from pima_hpc.data.storage import ModalityLayout
from pima_hpc.data.writer import DatasetWriter, default_provenance

NOISE = {"clean": 0.01, "noisy": 0.5}
# The curve's slope as a function of the digit c: the paper's c, or the digit's pair floor(c / 2).
CURVE_LAWS = {"digit": ("c", lambda c: c), "pairs": ("floor(c / 2)", lambda c: c // 2)}
POINTS = 20
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_noise(value) -> float:
    """"clean" -> 0.01, "noisy" -> 0.5, or a non-negative float (the noise standard deviation)."""
    if isinstance(value, str) and value in NOISE:
        return NOISE[value]
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise DataError(f"--noise must be 'clean', 'noisy' or a standard deviation >= 0, got {value!r}") from None
    if not (s >= 0 and np.isfinite(s)):
        raise DataError(f"--noise must be a finite standard deviation >= 0, got {value!r}")
    return s


def find_idx(idx_dir: Path, stem: str) -> Path:
    """The IDX file ``stem`` in ``idx_dir``, gzipped or not, also with the '.' spelling of some mirrors."""
    candidates = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for c in candidates:
        if (idx_dir / c).is_file():
            return idx_dir / c
    raise DataError(f"{idx_dir}: no {stem}[.gz]; --idx-dir must hold the four MNIST IDX files "
                    f"({', '.join(FILES.values())}, gzipped or not)")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip detected from its magic bytes, not its name)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc}); download the file again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); pass the original "
                        "MNIST files")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header; download the file again")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - head != need:
        raise DataError(f"{path}: {len(raw) - head} data bytes, the header's shape {shape} needs {need} "
                        "(truncated or corrupt); download the file again")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape)


def load_mnist(idx_dir) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The four MNIST arrays and, per file, its name and SHA-256 (for provenance)."""
    idx_dir = Path(idx_dir)
    if not idx_dir.is_dir():
        raise DataError(f"--idx-dir {idx_dir}: no such directory; point it at the MNIST IDX files")
    arrays, sources = {}, {}
    for key, stem in FILES.items():
        path = find_idx(idx_dir, stem)
        arrays[key] = read_idx(path)
        sources[key] = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    for part in ("train", "test"):
        im, lab = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if im.ndim != 3 or lab.ndim != 1 or im.dtype != np.uint8:
            raise DataError(f"{sources[part + '_images']['file']}: expected uint8 images (N, H, W) and labels (N,), "
                            f"got {im.dtype} {im.shape} and {lab.shape}")
        if len(im) != len(lab):
            raise DataError(f"{sources[part + '_images']['file']}: {len(im)} images but {len(lab)} labels in "
                            f"{sources[part + '_labels']['file']}; the files do not belong together")
        if lab.size and (lab.min() < 0 or lab.max() > 9):
            raise DataError(f"{sources[part + '_labels']['file']}: labels outside 0..9")
    return arrays, sources


def build_mnist(idx_dir, out, noise="clean", *, seed: int = 0, val_fraction: float = 0.1,
                shard_size: int | None = None, progress: bool = True, overwrite: bool = False,
                block: int = 10000, curve_law: str = "digit") -> Path:
    """Build multimodal MNIST at ``out`` (train 54,000 / val 6,000 / test 10,000 by default)."""
    sigma = parse_noise(noise)
    if curve_law not in CURVE_LAWS:
        raise DataError(f"--curve-law must be one of {sorted(CURVE_LAWS)}, got {curve_law!r}")
    slope_text, slope_of = CURVE_LAWS[curve_law]
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    arrays, sources = load_mnist(idx_dir)
    rng = np.random.default_rng([seed, 7])
    tr_idx, va_idx = stratified_split(arrays["train_labels"], val_fraction, rng)
    parts = {"train": ("train", tr_idx), "val": ("train", va_idx),
             "test": ("test", rng.permutation(len(arrays["test_labels"])))}
    h, w = arrays["train_images"].shape[1:]
    t = np.linspace(0.0, 1.0, POINTS)
    modalities = [
        ModalityLayout("image", "image", (1, h, w), units="gray level (8-bit)", storage="uint8",
                       description="MNIST digit"),
        ModalityLayout("curve", "curve", (POINTS,), t=t, units="a.u.", t_units="a.u.",
                       description=f"X2 = {slope_text} t + eps, eps ~ N(0, {sigma}^2) (ERRATA 7), c the digit"),
    ]
    prov = default_provenance("mnist", "pima_hpc.data.mnist.build_mnist", seed=seed, curve_noise_std=sigma,
                              noise=str(noise), curve_law=curve_law, slope=slope_text, val_fraction=val_fraction,
                              sources=sources,
                              split="stratified 90/10 of the MNIST training set; standard 10,000 test set")
    counts = {s: len(ix) for s, (_, ix) in parts.items()}
    from tqdm.auto import tqdm
    bar = tqdm(total=sum(counts.values()), unit="sample", desc="mnist", dynamic_ncols=True, disable=not progress)
    with DatasetWriter(out, modalities, counts, shard_size=shard_size, label_names=[str(d) for d in range(10)],
                       provenance=prov, overwrite=overwrite) as wr:
        for split, (src, ix) in parts.items():
            # one noise stream per split, so a split's curves do not depend on the others' sizes
            crng = np.random.default_rng([seed, 11, ["train", "val", "test"].index(split)])
            for a in range(0, len(ix), block):
                sel = ix[a:a + block]
                lab = arrays[f"{src}_labels"][sel].astype(np.int64)
                curve = slope_of(lab)[:, None] * t[None, :] + sigma * crng.standard_normal((len(sel), POINTS))
                wr.write(split, {"image": arrays[f"{src}_images"][sel][:, None], "curve": curve}, lab,
                         source=sources[f"{src}_images"]["file"])
                bar.update(len(sel))
    bar.close()
    return Path(out)


__all__ = ["build_mnist", "read_idx", "load_mnist", "stratified_split", "parse_noise"]
