"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits plus a curve.

Multimodal digits mirror the paper's multimodal MNIST (Section 3.1) without any download:
X1 is the 8x8 image, X2 = c t + eps on ``points`` points of [0, 1] with eps ~ N(0, noise^2)
(ERRATA 7 reads the paper's noise numbers as standard deviations). Both modalities are
min-max normalised to [0, 1] with training-split statistics (Appendix A). The split is a
stratified 70/10/20 train/validation/test split drawn from a fixed seed, so every training
seed sees the same data.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pima_hpc.data.base import CURVE, IMAGE, DatasetSpec, InMemorySplit, ModalitySpec

DATA_SEED = 20211

SPLITS = ("train", "val", "test")


def build_digits(noise: float = 0.01, points: int = 20) -> tuple[DatasetSpec, dict[str, dict]]:
    """Return the spec and, per split, {"image", "curve", "label"} arrays (normalised)."""
    digits = load_digits()
    images = digits.images.astype(np.float64)[:, None]  # (N, 1, 8, 8), values 0..16
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(DATA_SEED)
    t = np.linspace(0.0, 1.0, points)
    curves = labels[:, None] * t[None, :] + noise * rng.standard_normal((len(labels), points))

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=DATA_SEED)
    train, val = train_test_split(rest, test_size=0.125, stratify=labels[rest], random_state=DATA_SEED)
    parts = {"train": train, "val": val, "test": test}

    # Normalisation fitted on the training split only (ERRATA 7).
    img_lo, img_hi = images[train].min(), images[train].max()
    cur_lo, cur_hi = curves[train].min(), curves[train].max()
    spec = DatasetSpec(
        modalities=(
            ModalitySpec("image", IMAGE, (1, 8, 8), offset=float(img_lo), scale=float(img_hi - img_lo),
                         units="grey level"),
            ModalitySpec(CURVE, CURVE, (points,), t=t, offset=float(cur_lo), scale=float(cur_hi - cur_lo),
                         units="a.u.", t_units="a.u."),
        ),
        label_names=tuple(str(i) for i in range(10)),
        attrs={"name": "digits", "curve_noise": noise, "source": "sklearn.datasets.load_digits"},
    )
    arrays = {
        name: {
            "image": (images[ix] - img_lo) / (img_hi - img_lo),
            "curve": (curves[ix] - cur_lo) / (cur_hi - cur_lo),
            "label": labels[ix],
        }
        for name, ix in parts.items()
    }
    return spec, arrays


def open_digits_split(split: str, rank: int = 0, world_size: int = 1, noise: float = 0.01,
                      points: int = 20) -> InMemorySplit:
    spec, arrays = build_digits(noise, points)
    a = arrays[split]
    return InMemorySplit(spec, {"image": a["image"], "curve": a["curve"]}, a["label"], rank, world_size)
