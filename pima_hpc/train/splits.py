"""The splits a run reads, from its config: the embedded digits or an HDF5 dataset (the data layer itself
knows no run config)."""

from __future__ import annotations

from pima_hpc.config import ConfigError, DataConfig
from pima_hpc.data.base import ModalitySubset, SplitReader


def open_run_split(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1) -> SplitReader:
    """The reader of ``split`` ("train", "val" or "test" in the config's naming) for this rank, showing the
    modalities ``data.modalities`` names (all by default)."""
    name = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}[split]
    if cfg.source == "digits":
        from pima_hpc.data.digits import open_digits_split
        reader = open_digits_split(name, rank, world_size, cfg.curve_noise, cfg.curve_points)
    else:
        from pima_hpc.data.hdf5 import open_split
        reader = open_split(cfg.path, name, rank=rank, world_size=world_size, in_memory=cfg.in_memory)
    if cfg.modalities is None or list(cfg.modalities) == reader.spec.names:
        return reader
    try:
        return ModalitySubset(reader, list(cfg.modalities))
    except ValueError as exc:
        raise ConfigError(f"config key 'data.modalities': {exc}; choose among them") from None


def has_split(cfg: DataConfig, split: str) -> bool:
    """Whether the dataset holds ``split`` (HDF5 datasets may lack a validation or test split)."""
    if cfg.source == "digits":
        return True
    from pima_hpc.data.layout import list_splits
    name = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}[split]
    return name in list_splits(cfg.path)
