"""A trained run read back from its directory for prediction: config, modality specs, the model and,
if trained, the cross-modal networks; no training data needed (the checkpoint holds the specs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pima_hpc.config import Config, load_config
from pima_hpc.data.base import DatasetSpec, spec_from_dict
from pima_hpc.errors import CheckpointError, DataError, UserError
from pima_hpc.model.crossmodal import CrossModalEncoders
from pima_hpc.model.pima import PIMA
from pima_hpc.train.checkpoint import CheckpointManager


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: Config
    spec: DatasetSpec
    model: PIMA
    crossmodal: CrossModalEncoders | None
    stage: str
    checkpoint: Path


def _run_spec(payload: dict, cfg: Config, run: Path) -> DatasetSpec:
    """The specs the model was trained with; runs older than the stored spec read them from their data."""
    if payload.get("spec"):
        return spec_from_dict(payload["spec"])
    from pima_hpc.train.splits import open_run_split
    try:
        return open_run_split(cfg.data, "train").spec
    except (OSError, DataError) as exc:
        raise UserError(f"run {str(run)!r}: its checkpoint predates stored normalisation and its training data "
                        f"({cfg.data.path}) cannot be opened ({exc}); the units and normalisation of its inputs "
                        "are unknown: restore the dataset at that path, or retrain") from None


def load_run_config(run_dir, overrides: list[str] | None = None) -> Config:
    """A run directory's config.yaml (with ``key=value`` overrides such as device=cpu)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{str(run)!r} is not a run directory (no config.yaml); pass the run_dir of `pima train`")
    return load_config(run / "config.yaml", list(overrides or []) + [f"run_dir={run}"])


def load_trained_run(cfg: Config, device: torch.device) -> TrainedRun:
    """The newest good checkpoint of the run ``cfg`` describes, as networks in eval mode on ``device``."""
    run = Path(cfg.run_dir)
    found = CheckpointManager(run).load_latest()
    if found is None:
        raise UserError(f"run directory {str(run)!r} has no checkpoint; train it first (`pima train`)")
    payload, path = found
    spec = _run_spec(payload, cfg, run)
    model = PIMA(spec, cfg.model)
    crossmodal = None
    try:
        model.load_state_dict(payload["model"])
        if "crossmodal" in payload:
            crossmodal = CrossModalEncoders(spec, cfg.model, cfg.crossmodal.cluster_head)
            crossmodal.load_state_dict(payload["crossmodal"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model of {run / 'config.yaml'} "
                              f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}); "
                              "was config.yaml edited after training?") from None
    stage = payload["state"]["stage"]
    for module in (model, crossmodal):
        if module is not None:
            module.to(device).eval()
    return TrainedRun(run, cfg, spec, model, crossmodal if stage == "done" else None, stage, path)
