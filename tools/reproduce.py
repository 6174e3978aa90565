#!/usr/bin/env python
"""Reproduce the paper's Table 1 (multimodal MNIST) and the lattice experiment, across seeds.

    python tools/reproduce.py mnist   --seeds 5 [--noise clean noisy] [--epochs 5]
    python tools/reproduce.py lattice --seeds 3
    python tools/reproduce.py all     --seeds 5

Builds the datasets it needs (MNIST from ../shared/data/mnist, or --idx-dir; the generated
lattices), trains one run per seed and setting, prints a table of max and mean +- stdev beside the
paper's numbers and the Bayes limit of curve-only classification, and writes the table, the exact
commands, versions and machine to docs/results.md (``--results``). Figures like the paper's
Figures 3-6 are in each run's figures/ folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pima_hpc.config import load_config  # noqa: E402
from pima_hpc.train.trainer import Trainer  # noqa: E402

PAPER = {  # Table 1 (PIMA rows) and Section 3.2: (max, mean, stdev) in %
    ("clean", "multimodal"): (100.0, 96.74, 4.72),
    ("noisy", "multimodal"): (98.53, 93.15, 7.07),
    ("clean", "crossmodal_image"): (79.62, None, None),
    ("noisy", "crossmodal_image"): (84.85, None, None),
    ("clean", "crossmodal_curve"): (99.98, None, None),
    ("noisy", "crossmodal_curve"): (78.33, None, None),
    ("lattice", "multimodal"): (94.74, None, None),
    ("lattice", "crossmodal_image"): (94.74, None, None),
    ("lattice", "crossmodal_curve"): (94.74, None, None),
}
NOISE_STD = {"clean": 0.01, "noisy": 0.5}
# crossmodal_<m>: the cluster heads (docs/method.md); crossmodal_latent_<m>: the paper's p(c | z = mu~_m)
# multimodal_joint: argmax q(c | X), the experts' likelihoods counted too (docs/method.md, Evaluation)
ROWS = ("multimodal", "multimodal_joint", "crossmodal_image", "crossmodal_curve", "crossmodal_latent_image", "crossmodal_latent_curve",
        "bayes_curve")


def bayes_limit_curve(noise_std: float, priors: np.ndarray, points: int = 20) -> float:
    """Best possible accuracy of classifying c from X2 = c t + eps alone (t = 20 points of [0, 1]).

    The least-squares slope c_hat = t.x / t.t is sufficient, c_hat ~ N(c, s^2 / t.t); the Bayes rule
    with class priors pi_c picks c maximising log pi_c - (c_hat - c)^2 / (2 v), whose boundary
    between c and c+1 is at c + 1/2 + v log(pi_c / pi_{c+1}). Normalisation is an invertible affine
    map, so it changes nothing.
    """
    t = np.linspace(0.0, 1.0, points)
    sd = noise_std / np.sqrt(t @ t)
    if sd == 0:
        return 1.0
    k = len(priors)
    edges = [c + 0.5 + sd ** 2 * np.log(priors[c] / priors[c + 1]) for c in range(k - 1)]
    acc = 0.0
    for c in range(k):
        lo = -np.inf if c == 0 else edges[c - 1]
        hi = np.inf if c == k - 1 else edges[c]
        acc += priors[c] * (norm.cdf((hi - c) / sd) - norm.cdf((lo - c) / sd))
    return float(acc)


def run(config: str, overrides: list[str]) -> tuple[dict, Trainer, float]:
    """Train (or, for a finished run_dir, re-evaluate) one run; returns its training seconds: the sum
    of its epochs' times (EM passes included), so a re-evaluated run reports the time it trained."""
    cfg = load_config(ROOT / config, overrides)
    trainer = Trainer(cfg)
    metrics = trainer.run()
    return metrics, trainer, sum(h["seconds"] for h in metrics["history"])


def ensure_mnist(noise: str, idx_dir: Path) -> Path:
    out = ROOT / "data" / f"mnist_{noise}.h5"
    if not out.exists():
        from pima_hpc.data.mnist import build_mnist
        out.parent.mkdir(exist_ok=True)
        build_mnist(idx_dir, out, noise, progress=False)
    return out


def ensure_lattice() -> Path:
    out = ROOT / "data" / "lattice.h5"
    if not out.exists():
        from pima_hpc.data.lattice import build_lattice
        out.parent.mkdir(exist_ok=True)
        build_lattice(out, progress=False)
    return out


def summarise(values: list[float]) -> str:
    if not values:
        return "-"
    pct = [100 * v for v in values]
    sd = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{max(pct):.2f} / {statistics.mean(pct):.2f} ({sd:.2f})"


def paper_cell(key) -> str:
    p = PAPER.get(key)
    if not p:
        return "-"
    return f"{p[0]:.2f}" + (f" / {p[1]:.2f} ({p[2]:.2f})" if p[1] is not None else "")


def mnist(args, lines: list[str]) -> None:
    results = {}
    for noise in args.noise:
        path = ensure_mnist(noise, args.idx_dir)
        for seed in range(args.seeds):
            run_dir = ROOT / "runs" / "reproduce" / f"mnist_{noise}_seed{seed}"
            overrides = [f"data.path={path}", f"seed={seed}", f"run_dir={run_dir}", f"train.epochs={args.epochs}",
                         f"crossmodal.epochs={args.crossmodal_epochs}", "train.progress=false"]
            metrics, trainer, wall = run("configs/mnist.yaml", overrides)
            priors = np.array(metrics["multimodal"]["test"]["confusion"]).sum(1)
            res = {k: metrics[k]["test"]["accuracy"] for k in ROWS if k in metrics}
            res.update(wall_s=wall, epochs=args.epochs, bayes=bayes_limit_curve(NOISE_STD[noise], priors / priors.sum()))
            results.setdefault(noise, []).append(res)
            print(f"mnist {noise} seed {seed}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in res.items()
                                                            if k in ROWS) + f", {wall:.0f} s", flush=True)
    lines += ["## Multimodal MNIST (Table 1)", "",
              f"Test accuracy (%) over {args.seeds} seeds: max / mean (stdev). Each run: "
              f"{args.epochs} multimodal + {args.crossmodal_epochs} cross-modal epochs.", "",
              "| setting | pima-hpc max / mean (stdev) | paper max / mean (stdev) | Bayes limit (curve only) |",
              "|---|---|---|---|"]
    for noise, runs in results.items():
        for row in ROWS:
            vals = [r[row] for r in runs if row in r]
            bayes = f"{100 * runs[0]['bayes']:.2f}" if row.endswith("curve") else ""
            lines.append(f"| {noise}, {row} | {summarise(vals)} | {paper_cell((noise, row))} | {bayes} |")
        walls = [r["wall_s"] for r in runs]
        lines.append(f"| {noise}, training time per run (s) | median {statistics.median(walls):.0f} | 10-14 h on a P100/V100 | |")
    lines.append("")


@torch.no_grad()
def lattice_extras(trainer: Trainer) -> dict:
    """Curve prediction from the image alone (MoE mean +- sd, eqs 13-14) and experts vs ground truth."""
    from pima_hpc.data.hdf5 import read_truth
    from pima_hpc.evaluation.metrics import fit_cluster_to_label
    cfg, model = trainer.cfg, trainer.model.eval()
    trainer.crossmodal.eval()
    reader = trainer.test_data
    spec = trainer.spec["curve"]
    sq, inside, n = 0.0, 0.0, 0
    for idx in reader.batch_index_lists(256, shuffle=False):
        b = reader.read_batch(idx)
        gamma = trainer.crossmodal.log_cluster_posterior(model, "image", b["image"]).exp()
        mean, var = model.predict_curve("curve", gamma)
        truth = spec.to_physical(b["curve"])
        sq += float(((mean - truth) ** 2).sum())
        inside += float(((truth - mean).abs() <= 2 * var.sqrt()).sum())
        n += truth.numel()
    out = {"curve_rmse_from_image_MPa": (sq / n) ** 0.5, "band_2sd_coverage": inside / n}
    truth = read_truth(cfg.data.path, cfg.data.train_split)
    if truth is not None:
        table = trainer.cluster_table(trainer.train_data, model.predict)
        mapping = fit_cluster_to_label(table)
        theta = model.theta("curve")
        out["experts"] = []
        for c, label in enumerate(mapping):
            sel = truth["topology"] == label
            out["experts"].append({
                "cluster": c, "label": trainer.spec.label_names[label],
                "fit": {"E_MPa": theta[c, 0], "sigma_y_MPa": theta[c, 0] * theta[c, 1], "H_MPa": theta[c, 2]},
                "truth_mean": {"E_MPa": float(truth["E"][sel].mean()), "sigma_y_MPa": float(truth["sigma_y"][sel].mean()),
                               "H_MPa": float(truth["H"][sel].mean())}})
    return out


def lattice(args, lines: list[str]) -> None:
    path = ensure_lattice()
    runs = []
    for seed in range(args.seeds):
        run_dir = ROOT / "runs" / "reproduce" / f"lattice_seed{seed}"
        metrics, trainer, wall = run("configs/lattice.yaml", [f"data.path={path}", f"seed={seed}", f"run_dir={run_dir}",
                                                              "train.progress=false"])
        res = {k: metrics[k]["test"]["accuracy"] for k in ROWS if k in metrics}
        res.update(lattice_extras(trainer), wall_s=wall)
        runs.append(res)
        print(f"lattice seed {seed}: {json.dumps(res, default=float)[:600]}", flush=True)
    lines += ["## Lattice (Section 3.2, generated data)", "",
              f"Two-cluster test accuracy (%) on held-out generated specimens over {args.seeds} seeds: max / mean (stdev).", "",
              "| inference | pima-hpc | paper (91 real specimens) |", "|---|---|---|"]
    for row in ROWS:
        lines.append(f"| {row} | {summarise([r[row] for r in runs if row in r])} | {paper_cell(('lattice', row))} |")
    rmse = [r["curve_rmse_from_image_MPa"] for r in runs]
    cov = [r["band_2sd_coverage"] for r in runs]
    lines += ["", f"Stress-strain curve predicted from the image alone (MoE mean, eqs 13-14): RMSE median "
              f"{statistics.median(rmse):.2f} MPa; share of measured points inside the +-2 sd band: median "
              f"{100 * statistics.median(cov):.1f} % (95 % would be calibrated).", ""]
    if runs and "experts" in runs[0]:
        lines += ["Expert parameters per cluster (seed 0) against the generator's ground truth (training-split means):", "",
                  "| cluster | topology | E fit / truth (MPa) | sigma_y fit / truth (MPa) | H fit / truth (MPa) |",
                  "|---|---|---|---|---|"]
        for e in runs[0]["experts"]:
            f, t = e["fit"], e["truth_mean"]
            lines.append(f"| {e['cluster']} | {e['label']} | {f['E_MPa']:.0f} / {t['E_MPa']:.0f} | "
                         f"{f['sigma_y_MPa']:.2f} / {t['sigma_y_MPa']:.2f} | {f['H_MPa']:.1f} / {t['H_MPa']:.1f} |")
    lines.append("")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("mnist", "lattice", "all"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--noise", nargs="+", default=["clean", "noisy"], choices=("clean", "noisy"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--crossmodal-epochs", type=int, default=3)
    p.add_argument("--idx-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    args = p.parse_args(argv)
    lines = ["# Results", "", f"Command: `python tools/reproduce.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
             f"torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}", ""]
    if args.experiment in ("mnist", "all"):
        mnist(args, lines)
    if args.experiment in ("lattice", "all"):
        lattice(args, lines)
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
