"""Curves measured on per-sample grids: padding, checks at the door and the encoder's resampled view.

Real tests do not share one grid: each specimen has its own strain points and stops at its own
strain. Such a curve modality keeps every sample's measured points, padded to P with the valid
length of each row (``<split>/points/<name>/{t, x, length}``, docs/data-format.md), and the
physics experts see only those points (eqs 11 and 17 with a mask). The encoders are convolutions
over a fixed grid, so each curve is also stored linearly interpolated onto the modality's
reference grid (np.interp; held at its end values outside its own range): that view is what the
encoder reads, never what the likelihood scores.
"""

from __future__ import annotations

import numpy as np

from pima_hpc.data.errors import DataError


def pad_points(ts, xs, source: str = "input") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged per-sample grids and values (sequences of 1-D arrays) -> padded (t, x) (N, P) and length (N,).

    The padding repeats each row's last point (any value is masked out; a repeated one keeps
    interpolation and designs well defined).
    """
    ts, xs = list(ts), list(xs)
    if len(ts) != len(xs):
        raise DataError(f"{source}: {len(xs)} curves but {len(ts)} grids; give one grid per curve")
    lengths = np.array([len(np.ravel(x)) for x in xs], dtype=np.int32)
    for i, (t, x) in enumerate(zip(ts, xs)):
        if np.ndim(t) != 1 or np.ndim(x) != 1 or len(t) != len(x):
            raise DataError(f"{source}: curve {i} has {np.size(x)} values but its grid has {np.size(t)}; "
                            "each curve needs one grid value per point")
    if len(xs) == 0:
        return np.zeros((0, 1)), np.zeros((0, 1)), lengths
    p = int(max(lengths.max(), 1))
    t_out, x_out = np.zeros((len(xs), p)), np.zeros((len(xs), p))
    for i, (t, x) in enumerate(zip(ts, xs)):
        n = lengths[i]
        if n == 0:
            raise DataError(f"{source}: curve {i} has no points; drop that sample")
        t_out[i, :n], x_out[i, :n] = np.asarray(t, np.float64), np.asarray(x, np.float64)
        t_out[i, n:], x_out[i, n:] = t_out[i, n - 1], x_out[i, n - 1]
    return t_out, x_out, lengths


def check_points(t, x, length, n: int, p: int, name: str, source: str):
    """Validate one block of padded points: shapes, lengths in [1, P], finite and strictly increasing grids."""
    t, x, length = np.asarray(t), np.asarray(x), np.asarray(length)
    for what, a, shape in (("grids", t, (n, p)), ("values", x, (n, p)), ("lengths", length, (n,))):
        if a.shape != shape or a.dtype.kind not in "biuf":
            raise DataError(f"{source}: per-sample {what} of {name!r} are {a.dtype} {a.shape}, expected real "
                            f"numbers of shape {shape}")
    if length.dtype.kind == "f" and not np.all(length == np.round(length)):
        raise DataError(f"{source}: per-sample lengths of {name!r} must be integers")
    length = length.astype(np.int64)
    if n and (length.min() < 1 or length.max() > p):
        i = int(np.argmax((length < 1) | (length > p)))
        raise DataError(f"{source}: curve {i} of {name!r} has length {length[i]}, outside 1..{p}")
    valid = np.arange(p)[None, :] < length[:, None]
    for what, a in (("grid", t), ("values", x)):
        bad = valid & ~np.isfinite(a)
        if bad.any():
            raise DataError(f"{source}: curve {int(np.argwhere(bad)[0][0])} of {name!r} has a non-finite {what} "
                            "point; remove or repair it before converting")
    step_ok = np.diff(t, axis=1) > 0
    bad = valid[:, 1:] & ~step_ok
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise DataError(f"{source}: the grid of curve {i} of {name!r} is not strictly increasing; sort each "
                        "curve by t and merge repeated t values")
    return t.astype(np.float64), x.astype(np.float64), length.astype(np.int32)


def resample(t: np.ndarray, x: np.ndarray, length: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Each curve's valid points linearly interpolated onto ``grid`` (held at the end values beyond
    its range): (N, P) x2, (N,) -> (N, L), the encoder's view."""
    out = np.empty((len(t), len(grid)))
    for i, n in enumerate(np.asarray(length)):
        out[i] = np.interp(grid, t[i, :n], x[i, :n])
    return out


def reference_grid(t: np.ndarray, length: np.ndarray, points: int | None = None) -> np.ndarray:
    """A default reference grid: ``points`` (default: the median length) equally spaced points from
    the smallest to the largest measured t."""
    valid = np.arange(t.shape[1])[None, :] < np.asarray(length)[:, None]
    n = int(points or max(2, int(np.median(length))))
    return np.linspace(float(t[valid].min()), float(t[valid].max()), n)


__all__ = ["check_points", "pad_points", "reference_grid", "resample"]
