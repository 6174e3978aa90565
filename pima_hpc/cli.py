"""The ``pima`` command.

    pima train CONFIG [key=value ...]     train (both stages by default), resuming if run_dir has a checkpoint
                                          (--select-k 2:20: choose the number of clusters first)
    pima evaluate RUN_DIR                 recompute metrics and figures of a finished run
    pima show RUN_DIR                     print a run's config summary, history and metrics
    pima predict RUN_DIR INPUT... --out DIR   clusters, posteriors, absent curves/images for new samples
    pima select-k CONFIG --range 2:20     choose the number of clusters without labels (BIC/ICL, held-out)
    pima data ...                         build datasets (MNIST, lattice, your own data)
    pima tune CONFIG                      Ray Tune sweep

User errors (config, data, CLI, resume) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pima_hpc.data.cli import add_data_commands
from pima_hpc.errors import EXIT_RANK_LOST, RankLostError, UserError
from pima_hpc.tune import add_tune_command

log = logging.getLogger("pima")


def _setup_logging(rank: int = 0) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def cmd_train(args) -> int:
    from pima_hpc.config import load_config
    from pima_hpc.train.run import train_from_config

    cfg = load_config(args.config, args.overrides)
    if args.select_k is None:
        return train_from_config(cfg)
    from pima_hpc.train.select_k import parse_k_range
    return train_from_config(cfg, select_k=(parse_k_range(args.select_k), args.criterion))


def cmd_select_k(args) -> int:
    from pima_hpc.config import load_config
    from pima_hpc.train.run import select_k_from_config
    from pima_hpc.train.select_k import parse_k_range
    from pima_hpc.train.signals import EXIT_REQUEUE, StopRequested

    cfg = load_config(args.config, args.overrides)
    try:
        result = select_k_from_config(cfg, parse_k_range(args.range), args.criterion)
    except StopRequested as stop:
        log.warning("stopped at %s after a signal; exiting with %d", stop, EXIT_REQUEUE)
        return EXIT_REQUEUE
    if _rank() == 0:
        for r in result["scores"]:
            held = f"  held-out log-lik {r['heldout']:.4f}" if r["heldout"] is not None else ""
            print(f"K={r['k']:3d}  BIC {r['bic']:.6g}  ICL {r['icl']:.6g}{held}")
        print(f"chosen K = {result['chosen_k']} (lowest {args.criterion.upper()}" if args.criterion != "heldout" else
              f"chosen K = {result['chosen_k']} (highest held-out log-likelihood", end="")
        print(f"); wrote {', '.join(result.get('written', []))}; train with model.n_clusters={result['chosen_k']} "
              "train.init=pretrain")
    return 0


def cmd_evaluate(args) -> int:
    from pima_hpc.train.run import evaluate_run

    evaluate_run(args.run_dir, args.overrides)
    return 0


def cmd_predict(args) -> int:
    from pima_hpc.predict import predict_run

    inputs = [a for a in args.inputs if not _is_override(a, args.run_dir)]
    overrides = [a for a in args.inputs if _is_override(a, args.run_dir)]
    summary = predict_run(args.run_dir, inputs, args.out, splits=args.split, batch_size=args.batch_size,
                          overwrite=args.overwrite, overrides=overrides)
    if summary.get("world_size", 1) == 1 or _rank() == 0:
        print(f"predicted {summary['samples']} samples ({summary['readout']}; given {', '.join(summary['given'])}"
              + (f"; predicted {', '.join(summary['predicted_curves'] + summary['generated_images'])}"
                 if summary['predicted_curves'] or summary['generated_images'] else "")
              + f") -> {summary['out']}")
    return 0


def _is_override(arg: str, run_dir: str) -> bool:
    """``device=cpu`` and other config overrides, told apart from ``MODALITY=PATH`` inputs by the dot or
    by being a top-level config key."""
    key = arg.partition("=")[0]
    return "=" in arg and ("." in key and not Path(arg.partition("=")[2]).exists() or key in ("device", "threads"))


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("SLURM_PROCID", 0))))


def cmd_show(args) -> int:
    run = Path(args.run_dir)
    metrics_path = run / "metrics.json"
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run directory (no config.yaml)")
    print((run / "config.yaml").read_text())
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        for h in m.get("history", []):
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()})
        for key, val in m.items():
            if isinstance(val, dict) and "test" in val:
                print(f"{key:24s} test accuracy {100 * val['test']['accuracy']:.2f}%  "
                      f"NMI {val['test']['nmi']:.3f}  ARI {val['test']['ari']:.3f}")
        for key, val in m.get("baselines", {}).items():
            print(f"{key:24s} test accuracy {100 * val['test']['accuracy']:.2f}%  (baseline: that modality alone)")
        for key, val in m.get("crossmodal_quality", {}).items():
            q = val.get("test") or next(iter(val.values()))
            print(f"{key:24s} RMSE {q['rmse']:.4g} {q['units']}  R^2 {q['r2']:.3f}  +-2 sd coverage "
                  f"{100 * q['coverage']:.1f}%")
        print("experts:", json.dumps(m.get("experts", {}))[:2000])
    else:
        print("(no metrics.json yet: the run has not finished)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pima", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a PIMA model (multimodal and cross-modal stages)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=3 run_dir=runs/x")
    p.add_argument("--select-k", metavar="RANGE", default=None,
                   help="choose model.n_clusters first, without labels, as `pima select-k --range RANGE` does "
                        "(e.g. 2:20; kept in run_dir/select_k.json, reused on resume)")
    p.add_argument("--criterion", default="icl", choices=("icl", "bic", "heldout"),
                   help="with --select-k: icl (default), bic, or heldout")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("select-k", help="choose the number of clusters without labels (pre-train, then BIC/ICL)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (its train.pretrain_* settings are used)")
    p.add_argument("overrides", nargs="*", help="key=value overrides; select_k.json/.png go to run_dir")
    p.add_argument("--range", default="2:20", help="cluster counts: LO:HI inclusive or a comma list (default 2:20)")
    p.add_argument("--criterion", default="icl", choices=("icl", "bic", "heldout"),
                   help="icl (default): BIC plus the assignment entropy; bic; heldout: validation log-likelihood")
    p.set_defaults(func=cmd_select_k)

    p = sub.add_parser("evaluate", help="recompute metrics and figures of a run directory")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="key=value overrides (e.g. device=cpu)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("show", help="print a run's config, history and metrics")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("predict", help="apply a trained run to new samples (any subset of its modalities)")
    p.add_argument("run_dir", help="a run directory of `pima train`")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a dataset (.h5 or shard directory), a folder of images, .npy/.npz arrays or a .csv of "
                        "curves; MODALITY=PATH names the modality; device=cpu-style overrides may follow")
    p.add_argument("--out", required=True, help="output directory: clusters.csv, predictions.h5, summary.json")
    p.add_argument("--split", action="append", default=None,
                   help="with a dataset input: predict this split (repeatable; default every split)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prediction at --out")
    p.set_defaults(func=cmd_predict)

    add_data_commands(sub)
    add_tune_command(sub)  # Ray itself is imported only when a sweep runs
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; key=value overrides may also follow the options
    (``pima tune FILE --resume name=x``), which plain argparse rejects once a ``nargs="*"``
    positional has been matched before an option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if hasattr(args, "overrides") and late == extra:
        args.overrides = [*(args.overrides or []), *late]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    _setup_logging()
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"pima: error: {exc}", file=sys.stderr)
        return 2
    except RankLostError as exc:
        if args.debug:
            raise
        print(f"pima: error: {exc}", file=sys.stderr)
        return EXIT_RANK_LOST
    except KeyboardInterrupt:
        print("pima: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
