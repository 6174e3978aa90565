"""Hyperparameter sweeps with Ray Tune: ``pima tune TUNE_FILE [key=value ...] [--resume]``.

A tune file (``configs/tune_*.yaml``, described in docs/tune.md) names a base training config,
overrides for every trial, and a search space of dotted config keys; each trial is one ordinary
training run of the multimodal stage, written to its own directory.

Selection is unsupervised: trials are ranked by the validation ELBO, which the trainer computes
with unit loss weights, so trials that sweep the ``loss.*`` weights still compare on the same
objective. ``val_accuracy`` is reported when the data have labels, never used to choose.

A trial with ``workers_per_trial > 1`` is a Ray Train ``TorchTrainer`` started from inside the
Tune function trainable (Ray Train V2's Tune integration): Ray starts the DDP workers and their
torch.distributed group, each worker runs the usual :class:`~pima_hpc.train.trainer.Trainer`, and
``TuneReportCallback`` relays rank 0's per-epoch metrics to Tune. One-worker trials train inside
the trainable itself.

Everything up to the launch (reading and validating the tune file, every sampled value checked
through :func:`~pima_hpc.config.load_config`) is plain Python; Ray is imported only to run, so a
bad tune file fails in a second with one line and ``pima tune --help`` works without Ray.

One job per module: :mod:`.spec` (the tune file's OmegaConf schema and validation), :mod:`.space`
(the search space and sampled values as overrides), :mod:`.errors` (TuneError), :mod:`.trial` (what runs
in Ray's worker processes), :mod:`.sweep` (the driver: Ray, the Tuner, resume), :mod:`.results`
(the ranked table, results.csv, best_config.yaml) and :mod:`.cli` (``pima tune``).
"""

from pima_hpc.tune.cli import add_tune_command, cmd_tune
from pima_hpc.tune.errors import TuneError
from pima_hpc.tune.results import SweepResult, TrialRow, format_table, rank_rows, write_results_csv
from pima_hpc.tune.space import format_value
from pima_hpc.tune.spec import TuneSpec, load_tune_spec
from pima_hpc.tune.sweep import run_sweep

__all__ = ["SweepResult", "TrialRow", "TuneError", "TuneSpec", "add_tune_command", "cmd_tune", "format_table",
           "format_value", "load_tune_spec", "rank_rows", "run_sweep", "write_results_csv"]
