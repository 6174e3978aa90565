"""``pima tune``: the command line."""

from __future__ import annotations

from pima_hpc.tune.spec import load_tune_spec
from pima_hpc.tune.sweep import run_sweep


def cmd_tune(args) -> int:
    spec = load_tune_spec(args.config, args.overrides)
    run_sweep(spec, resume=args.resume, address=args.address, num_cpus=args.num_cpus, verbose=args.verbose)
    return 0


def add_tune_command(sub) -> None:
    import argparse

    p = sub.add_parser(
        "tune", help="Ray Tune sweep over a tune file (configs/tune_*.yaml)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hyperparameter sweep with Ray Tune (docs/tune.md). Trials are ranked by the validation "
                    "ELBO;\nthe sweep directory (storage_path/name) gets results.csv and best_config.yaml.",
        epilog="examples:\n"
               "  pima tune configs/tune_digits.yaml\n"
               "  pima tune configs/tune_digits.yaml num_samples=16 workers_per_trial=2 train.epochs=6\n"
               "  pima tune configs/tune_digits.yaml --resume           # the newest sweep of this file\n"
               "  pima tune configs/tune_lattice.yaml --address head-node:6379")
    p.add_argument("config", help="tune file; a plain training config sweeps train.lr and the loss weights")
    p.add_argument("overrides", nargs="*",
                   help="key=value: tune keys (num_samples=16, name=x, scheduler.grace_period=2) change the tune "
                        "file; config keys (train.epochs=4) apply to every trial")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (name=..., else the newest sweep of this file)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a local Ray instance (default: max(4, cores))")
    p.add_argument("--verbose", action="store_true", help="show Ray's and the trials' logs")
    p.set_defaults(func=cmd_tune)
