"""Data layer: multimodal datasets in HDF5, sharded across ranks (docs/data-format.md).

* :mod:`~pima_hpc.data.base` - the contract with the trainer (specs, rank blocks, SplitReader).
* :mod:`~pima_hpc.data.layout` / :mod:`~pima_hpc.data.verify` - the on-disk layout and its
  structural checks / the full integrity check (checksums, every chunk).
* :mod:`~pima_hpc.data.storage` / :mod:`~pima_hpc.data.writer` / :mod:`~pima_hpc.data.finalise` -
  what a builder declares (chunking, codecs, validation), the bounded-memory, atomic writer and
  its finishing step (normalisation, manifest).
* :mod:`~pima_hpc.data.hdf5` - :func:`open_split`, :func:`make_loader`, :func:`read_truth`.
* Builders behind ``pima data ...``: :mod:`~pima_hpc.data.mnist`, :mod:`~pima_hpc.data.lattice`,
  :mod:`~pima_hpc.data.convert` (your own data, read by :mod:`~pima_hpc.data.sources`;
  :func:`convert_arrays`, :func:`write_arrays` and :func:`convert_files` are exported here, as
  docs/data-format.md shows).
"""

from pima_hpc.data.base import (CURVE, IMAGE, DatasetSpec, InMemorySplit, ModalitySpec, SplitReader,
                                rank_block)
from pima_hpc.data.convert import convert_arrays, convert_files, write_arrays
from pima_hpc.data.errors import DataError
from pima_hpc.data.hdf5 import H5SplitReader, make_loader, open_split, read_truth
from pima_hpc.data.layout import DatasetInfo, describe, list_splits
from pima_hpc.data.verify import describe_verified, verify_dataset

__all__ = ["CURVE", "IMAGE", "DataError", "DatasetInfo", "DatasetSpec", "H5SplitReader", "InMemorySplit",
           "ModalitySpec", "SplitReader", "convert_arrays", "convert_files", "describe", "list_splits",
           "make_loader", "open_split", "rank_block", "read_truth", "describe_verified", "verify_dataset", "write_arrays"]
