"""``pima predict RUN_DIR INPUT... --out DIR``: a trained run applied to new samples.

:func:`predict_run` ties the parts together: :mod:`~pima_hpc.predict.trained` (the run read back),
:mod:`~pima_hpc.predict.inputs` (any subset of its modalities, in its units),
:mod:`~pima_hpc.predict.predictor` (which read-out, and the predictions) and
:mod:`~pima_hpc.predict.output` (per-rank parts merged by rank 0). Under torchrun, srun or mpiexec
every rank predicts its own block of rows.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pima_hpc.data.base import rank_block
from pima_hpc.errors import UserError
from pima_hpc.predict.inputs import open_inputs
from pima_hpc.predict.output import PartWriter, check_output, merge_parts, staging_dir
from pima_hpc.predict.predictor import Predictor
from pima_hpc.predict.trained import load_run_config, load_trained_run

log = logging.getLogger("pima")


def predict_run(run_dir, inputs: list[str], out, *, splits: list[str] | None = None, batch_size: int = 512,
                overwrite: bool = False, overrides: list[str] | None = None) -> dict:
    """Predict every sample of ``inputs`` with the run in ``run_dir``; write ``out``; return its summary."""
    from pima_hpc.train.run import make_context
    tic = time.perf_counter()
    out = Path(out)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    cfg = load_run_config(run_dir, overrides)
    check_output(out, overwrite)
    ctx = make_context(cfg)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run = load_trained_run(cfg, ctx.device)
        data = open_inputs(list(inputs), run.spec, splits)
        predictor = Predictor(run, data.present)
        spec = run.spec
        curves = {n: spec[n] for n in predictor.absent_curves}
        images = {n: spec[n] for n in predictor.absent_images}
        stage = staging_dir(out)
        if ctx.is_root:
            if stage.exists():  # left by a killed prediction
                shutil.rmtree(stage)
            stage.mkdir()
        ctx.collective.barrier()
        start, stop = rank_block(len(data), ctx.rank, ctx.world_size)
        failure = None
        try:  # user errors (a bad row) are agreed on below, so every rank stops together
            writer = PartWriter(stage, ctx.rank, stop - start, run.cfg.model.n_clusters, curves, images)
            try:
                for a in range(start, stop, batch_size):
                    b = min(stop, a + batch_size)
                    batch = {k: torch.from_numpy(v).to(ctx.device) for k, v in data.read(a, b).items()}
                    writer.write(data.columns(a, b), predictor(batch))
            finally:
                writer.close()
        except UserError as exc:
            failure = exc
        except BaseException:
            if ctx.is_root:
                shutil.rmtree(stage, ignore_errors=True)
            raise
        failed = ctx.collective.allreduce_sum([np.array([float(failure is not None)])])[0][0]
        if failure is not None or failed:
            if ctx.is_root:
                shutil.rmtree(stage, ignore_errors=True)
            raise failure or UserError("another rank could not read its part of the input (its error is in its "
                                       "log); nothing was written")
        summary = {"run_dir": str(run.run_dir), "checkpoint": run.checkpoint.name, "inputs": list(inputs),
                   "splits": splits, "readout": predictor.readout, "given": predictor.present,
                   "predicted_curves": list(curves), "generated_images": list(images),
                   "n_clusters": run.cfg.model.n_clusters, "world_size": ctx.world_size}
        if ctx.is_root:
            try:
                merge_parts(stage, ctx.world_size, out, summary, curves, images)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            log.info("predicted %d samples with %s in %.1f s -> %s", len(data), predictor.readout,
                     time.perf_counter() - tic, out)
        ctx.collective.barrier()
        return {**summary, "samples": len(data), "out": str(out)}
    finally:
        ctx.close()
