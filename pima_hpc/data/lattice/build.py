"""Building a lattice dataset: specimens generated in blocks (in parallel if asked) and written."""

from __future__ import annotations

import multiprocessing
from collections import deque
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pima_hpc.data.errors import DataError
from pima_hpc.data.lattice.config import TOPOLOGIES, LatticeConfig
from pima_hpc.data.lattice.mechanics import E_SOLID, SCALING, SIGMA_Y_SOLID
from pima_hpc.data.lattice.specimens import generate_specimen
from pima_hpc.data.points import pad_points
from pima_hpc.data.storage import ModalityLayout, TruthField
from pima_hpc.data.writer import DatasetWriter, default_provenance

TRUTH = [
    TruthField("topology", "int64", "", "0 = gyroid, 1 = octet"),
    TruthField("relative_density", "float64", "", "solid fraction measured on the voxelised specimen"),
    TruthField("target_density", "float64", "", "design relative density before print defects"),
    TruthField("cell_size", "float64", "mm", "unit-cell size"),
    TruthField("porosity", "float64", "", "void fraction drawn for the specimen"),
    TruthField("E", "float64", "MPa", "elastic modulus of the curve"),
    TruthField("sigma_y", "float64", "MPa", "yield stress of the curve"),
    TruthField("H", "float64", "MPa", "linear hardening modulus of the curve"),
    TruthField("eps_y", "float64", "", "yield strain sigma_y / E"),
    TruthField("specimen", "int64", "", "specimen index (its views share the curve)"),
    TruthField("view", "int64", "", "quadrant * 3 + flip (0 as is, 1 flipped along y, 2 along x)"),
]


def _generate_block(args) -> list[dict]:
    seed, start, stop, cfg = args
    return [generate_specimen(seed, i, cfg) for i in range(start, stop)]


def _rows(specimens: list[dict], first_index: int, cfg: LatticeConfig) -> tuple[dict, np.ndarray, dict, dict]:
    v = cfg.views
    images = np.concatenate([s["images"] for s in specimens])
    curves = np.repeat(np.stack([s["curve"] for s in specimens]), v, axis=0)
    labels = np.repeat([s["topology"] for s in specimens], v)
    truth = {
        "topology": labels,
        "relative_density": np.repeat([s["relative_density"] for s in specimens], v),
        "target_density": np.repeat([s["target_density"] for s in specimens], v),
        "cell_size": np.repeat([s["cell_mm"] for s in specimens], v),
        "porosity": np.repeat([s["porosity"] for s in specimens], v),
        "E": np.repeat([s["E"] for s in specimens], v),
        "sigma_y": np.repeat([s["sigma_y"] for s in specimens], v),
        "H": np.repeat([s["H"] for s in specimens], v),
        "eps_y": np.repeat([s["eps_y"] for s in specimens], v),
        "specimen": np.repeat(np.arange(first_index, first_index + len(specimens)), v),
        "view": np.tile(np.arange(v), len(specimens)),
    }
    points = {}
    if cfg.grids == "per-sample":  # padded to cfg.points, every view with its specimen's test
        t, x, length = pad_points(*zip(*(s["points"] for s in specimens)))
        pad = cfg.points - t.shape[1]
        t, x = (np.repeat(np.pad(a, ((0, 0), (0, pad)), mode="edge"), v, axis=0) for a in (t, x))
        points["curve"] = (t, x, np.repeat(length, v))
    return {"image": images, "curve": curves}, labels, truth, points


def build_lattice(out, n: int = 91, *, seed: int = 0, cfg: LatticeConfig | None = None,
                  test_fraction: float = 0.2, shard_size: int | None = None, workers: int = 0,
                  block: int = 8, progress: bool = True, overwrite: bool = False) -> Path:
    """Generate ``n`` specimens into a dataset at ``out`` (train/test split by specimen).

    Specimens ``[0, n_train)`` form the training split and the rest the test split (their
    parameters are i.i.d., so this is a random split; all views of a specimen stay on one side).
    Memory is bounded by ``block`` specimens per worker plus the writer's buffers, whatever
    ``n``; ``workers > 0`` renders in that many processes (results are identical).
    """
    cfg = cfg or LatticeConfig()
    if n < 2:
        raise DataError(f"--n must be >= 2 specimens (one per split at least), got {n}")
    if not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    n_train = n - n_test
    if n_test < 1 or n_train < 1:
        raise DataError(f"--n {n} with --test-fraction {test_fraction} leaves an empty split; use more specimens")
    v = cfg.views
    modalities = [
        ModalityLayout("image", "image", (1, cfg.size, cfg.size), units="gray level (8-bit)", storage="uint8",
                       description="top-view photograph of the lattice, contrast-stretched 8-bit"),
        ModalityLayout("curve", "curve", (cfg.points,), t=cfg.strain, units="MPa", t_units="strain",
                       normalisation="zero-max", points=cfg.points if cfg.grids == "per-sample" else 0,
                       description="compressive engineering stress vs strain; offset 0 keeps stress = E*strain linear"),
    ]
    cfg_dict = asdict(cfg)
    prov = default_provenance("lattice", "pima_hpc.data.lattice.build_lattice", seed=seed, specimens=n,
                              test_fraction=test_fraction, config=cfg_dict,
                              solid={"E_s_MPa": E_SOLID, "sigma_ys_MPa": SIGMA_Y_SOLID},
                              scaling={TOPOLOGIES[k]: asdict(law) for k, law in SCALING.items()},
                              split="specimens [0, n_train) train, the rest test")
    blocks = ((seed, a, min(a + block, n), cfg) for a in range(0, n, block))  # lazy: O(1) memory in n
    with DatasetWriter(out, modalities, {"train": n_train * v, "test": n_test * v}, shard_size=shard_size,
                       label_names=TOPOLOGIES, truth=TRUTH, provenance=prov, overwrite=overwrite) as w:
        bar = _progress(n, progress)
        for (_, start, _, _), specimens in _run_blocks(blocks, workers):
            arrays, labels, truth, points = _rows(specimens, start, cfg)
            # a block may straddle the train/test boundary
            cut = max(0, min(len(specimens), n_train - start)) * v
            for split, sl in (("train", slice(0, cut)), ("test", slice(cut, None))):
                if sl.start != (sl.stop if sl.stop is not None else len(labels)):
                    w.write(split, {k: a[sl] for k, a in arrays.items()}, labels[sl],
                            {k: a[sl] for k, a in truth.items()}, source=f"lattice specimens {start}..",
                            points={k: tuple(a[sl] for a in p) for k, p in points.items()})
            bar.update(len(specimens))
        bar.close()
    return Path(out)


def _run_blocks(blocks, workers: int):
    """Yield (block, its specimens) in order; with workers, at most 2 blocks per worker in flight."""
    if workers <= 0:
        for b in blocks:
            yield b, _generate_block(b)
        return
    ctx = multiprocessing.get_context("spawn")  # no inherited HDF5 handles or thread pools
    with ctx.Pool(workers) as pool:
        pending = deque()
        for b in blocks:
            pending.append((b, pool.apply_async(_generate_block, (b,))))
            if len(pending) > 2 * workers:
                done, res = pending.popleft()
                yield done, res.get()
        while pending:
            done, res = pending.popleft()
            yield done, res.get()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="specimen", desc="lattice", dynamic_ncols=True, disable=not enabled)
