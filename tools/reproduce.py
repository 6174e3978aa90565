#!/usr/bin/env python
"""Reproduce the paper's Table 1 (multimodal MNIST) and the lattice experiment, across seeds.

    python tools/reproduce.py mnist   --seeds 5 [--noise clean noisy] [--epochs 5]
    python tools/reproduce.py lattice --seeds 3 --data-seeds 5 [--populations design spread] [--specimens 91]
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
        "bayes_curve", "kmeans_image", "kmeans_curve")  # k-means on each modality alone: metrics.json "baselines"


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
            res.update({k: v["test"]["accuracy"] for k, v in metrics.get("baselines", {}).items() if k in ROWS})
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


PAIRS_ROWS = ("multimodal", "multimodal_joint", "crossmodal_image", "crossmodal_curve", "bayes_curve")


def pairs(args, lines: list[str]) -> None:
    """Complementary MNIST (--curve-law pairs): the model against k-means on each modality alone."""
    out = ROOT / "data" / "mnist_pairs.h5"
    if not out.exists():
        from pima_hpc.data.mnist import build_mnist
        out.parent.mkdir(exist_ok=True)
        build_mnist(args.idx_dir, out, "clean", progress=False, curve_law="pairs")
    rows = []
    for seed in range(args.seeds):
        run_dir = ROOT / "runs" / "reproduce" / f"mnist_pairs_{'_'.join(args.overrides) or 'default'}_seed{seed}"
        metrics, _, wall = run("configs/mnist_pairs.yaml", [f"data.path={out}", f"seed={seed}", f"run_dir={run_dir}",
                                                            "train.progress=false", *args.overrides])
        res = {k: metrics[k]["test"] for k in PAIRS_ROWS if k in metrics}
        res.update({k: v["test"] for k, v in metrics["baselines"].items()})
        rows.append({"seed": seed, "wall_s": wall, "init": metrics["init"].get("chosen", metrics["init"].get("method")),
                     **{k: (v["accuracy"], v["n"]) for k, v in res.items()}})
        print(f"pairs seed {seed}: " + ", ".join(f"{k} {100 * v[0]:.2f}%" for k, v in rows[-1].items()
                                                 if isinstance(v, tuple)) + f", {wall:.0f} s", flush=True)
    keys = [k for k in rows[0] if isinstance(rows[0][k], tuple)]
    lines += ["## Complementary MNIST (no modality alone is the label)", "",
              f"`configs/mnist_pairs.yaml` {' '.join(args.overrides)}; test accuracy (%) per training seed with its "
              "95 % Clopper-Pearson interval; k-means baselines on each modality alone, same splits and Hungarian rule.",
              "", "| read-out | " + " | ".join(f"seed {r['seed']}" for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for k in keys:
        cells = []
        for r in rows:
            acc, n = r[k]
            lo, hi = clopper_pearson(round(acc * n), n)
            cells.append(f"{100 * acc:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| training time (s) | " + " | ".join(f"{r['wall_s']:.0f}" for r in rows) + " |")
    lines.append("")


LATTICE_PATHS = ("multimodal", "multimodal_joint", "crossmodal_image", "crossmodal_curve", "bayes_curve")


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """Exact 95 % interval of a binomial proportion (scipy)."""
    from scipy.stats import binomtest
    ci = binomtest(int(k), int(n)).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


def ensure_lattice_seed(population: str, seed: int, n: int) -> Path:
    out = ROOT / "data" / f"lattice_{population}_n{n}_seed{seed}.h5"
    if not out.exists():
        from pima_hpc.data.lattice import LatticeConfig, build_lattice
        out.parent.mkdir(exist_ok=True)
        build_lattice(out, n, seed=seed, cfg=LatticeConfig(population=population), progress=False)
    return out


def _split_arrays(path: Path, split: str) -> dict:
    from pima_hpc.data import open_split
    r = open_split(path, split)
    b = r.read_batch(r.indices)
    return {"image": b["image"].numpy().reshape(len(r.indices), -1), "curve": b["curve"].numpy(),
            "label": b["label"].numpy()}


def kmeans_baselines(path: Path, k: int = 2, seed: int = 0) -> dict:
    """Each modality alone, no model: k-means on image pixels (PCA 50), on the raw curves and on the curves
    divided by their own norm (shape alone), mapped to labels on the training split (Hungarian, as the model's
    read-outs), scored on the test split."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from pima_hpc.evaluation.metrics import contingency, fit_cluster_to_label, table_metrics
    train, test = _split_arrays(path, "train"), _split_arrays(path, "test")
    for split in (train, test):
        split["curve_shape"] = split["curve"] / np.maximum(np.linalg.norm(split["curve"], axis=1, keepdims=True), 1e-12)
    out = {}
    for name in ("image", "curve", "curve_shape"):
        xtr, xte = train[name], test[name]
        if name == "image":
            pca = PCA(n_components=min(50, len(xtr) - 1), random_state=seed).fit(xtr)
            xtr, xte = pca.transform(xtr), pca.transform(xte)
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(xtr)
        mapping = fit_cluster_to_label(contingency(km.labels_, train["label"], k, k))
        out[f"kmeans_{name}"] = table_metrics(contingency(km.predict(xte), test["label"], k, k), mapping)["accuracy"]
    return out


@torch.no_grad()
def specimen_hits(trainer: Trainer, metrics: dict) -> dict:
    """Per read-out: (correct test specimens, test specimens). The views of one specimen share its curve,
    so the independent unit is the specimen; it counts as correct when most of its views are."""
    from pima_hpc.data.hdf5 import read_truth
    specimen = read_truth(trainer.cfg.data.path, trainer.cfg.data.test_split)["specimen"]
    preds = trainer.evaluator.predictors()
    out = {}
    for key in LATTICE_PATHS:
        if key not in preds or key not in metrics:
            continue
        mapping = np.asarray(metrics[key]["mapping"])
        right = np.zeros(len(specimen))
        for b in trainer.test_data.iter_batches(256, shuffle=False):
            right[b["index"].numpy()] = (mapping[preds[key](b).cpu().numpy()] == b["label"].numpy())
        per = [right[specimen == s].mean() > 0.5 for s in np.unique(specimen)]
        out[key] = (int(sum(per)), len(per))
    return out


@torch.no_grad()
def lattice_extras(trainer: Trainer, metrics: dict) -> dict:
    """Curve predicted from the image alone (the evaluator's cross-modal quality on the test split: MoE
    mean +- 2 sd, eqs 13-14, with the amplitude model when the expert amplitude is free) and the experts
    against the generator's ground truth."""
    from pima_hpc.data.hdf5 import read_truth
    from pima_hpc.evaluation.metrics import fit_cluster_to_label
    cfg, model = trainer.cfg, trainer.model.eval()
    quality = metrics["crossmodal_quality"]["image_to_curve"]["test"]
    out = {"curve_rmse_from_image_MPa": quality["rmse"], "band_2sd_coverage": quality["coverage"],
           "curve_r2_from_image": quality["r2"]}
    truth = read_truth(cfg.data.path, cfg.data.train_split)
    table = trainer.evaluator.cluster_table(trainer.train_data, model.predict)
    mapping = fit_cluster_to_label(table)
    theta = model.theta("curve")
    out["experts"] = []
    for c, label in enumerate(mapping):
        sel = truth["topology"] == label
        fit = {"E": theta[c, 0], "sigma_y": theta[c, 0] * theta[c, 1], "H": theta[c, 2]}
        true = {k: float(truth[k][sel].mean()) for k in fit}
        out["experts"].append({"cluster": c, "label": trainer.spec.label_names[label], "fit": fit, "truth_mean": true,
                               "rel_error": {k: fit[k] / true[k] - 1.0 for k in fit}})
    return out


def lattice(args, lines: list[str]) -> None:
    """Every population x data seed x training seed; intervals pool the data seeds' independent specimens."""
    if args.tables_from:  # tables again from a finished sweep's rows; baselines added since are computed
        rows = json.loads(Path(args.tables_from).read_text())
        for key in dict.fromkeys((r["population"], r["data_seed"]) for r in rows):
            base = kmeans_baselines(ensure_lattice_seed(key[0], key[1], args.specimens))
            for r in rows:
                if (r["population"], r["data_seed"]) == key:
                    r.update({k: v for k, v in base.items() if k not in r})
        lines += lattice_tables(rows, args)
        return
    rows = []
    for population in args.populations:
        for data_seed in range(args.data_seeds):
            path = ensure_lattice_seed(population, data_seed, args.specimens)
            base = kmeans_baselines(path)
            for seed in range(args.seeds):
                run_dir = ROOT / "runs" / "reproduce" / f"lattice_{population}_n{args.specimens}_data{data_seed}_seed{seed}"
                overrides = [f"data.path={path}", f"seed={seed}", f"run_dir={run_dir}", "train.progress=false",
                             *args.overrides]
                metrics, trainer, wall = run("configs/lattice.yaml", overrides)
                res = {k: metrics[k]["test"]["accuracy"] for k in LATTICE_PATHS if k in metrics}
                res.update(base, population=population, data_seed=data_seed, seed=seed, wall_s=wall,
                           hits=specimen_hits(trainer, metrics), **lattice_extras(trainer, metrics))
                rows.append(res)
                print(f"lattice {population} data {data_seed} seed {seed}: "
                      + ", ".join(f"{k} {100 * res[k]:.1f}%" for k in (*LATTICE_PATHS, "kmeans_image", "kmeans_curve",
                                                                        "kmeans_curve_shape")
                                  if k in res)
                      + f", rmse {res['curve_rmse_from_image_MPa']:.1f} MPa, band {100 * res['band_2sd_coverage']:.1f} %,"
                        f" {wall:.0f} s", flush=True)
    (ROOT / "runs" / "reproduce").mkdir(parents=True, exist_ok=True)
    (ROOT / "runs" / "reproduce" / "lattice.json").write_text(json.dumps(rows, default=float, indent=1))
    lines += lattice_tables(rows, args)


def lattice_tables(rows: list[dict], args) -> list[str]:
    lines = ["## Lattice (Section 3.2, generated data)", "",
             f"Two-cluster test accuracy on held-out generated specimens ({args.specimens} specimens x 12 views, "
             f"80/20 split by specimen), {args.data_seeds} data seeds x {args.seeds} training seeds per population. "
             "Per read-out: min / mean view accuracy over the runs, how many runs reach 99 %, and the 95 % "
             "Clopper-Pearson interval of the specimen accuracy pooled over the data seeds (one training seed at a "
             "time; the worst seed shown). `multimodal` = argmax p(c|z=mu) is the latent read-out; k-means of "
             "each modality alone (image pixels PCA 50, raw curves, curves divided by their norm) is the baseline. "
             "Chance is 50 %; paper 94.74 % "
             "on multimodal, image and curve.", "",
             "| population | read-out | min / mean (%) | runs >= 99 % | specimen 95 % CI, worst seed |", "|---|---|---|---|---|"]
    for population in dict.fromkeys(r["population"] for r in rows):
        runs = [r for r in rows if r["population"] == population]
        for key in (*LATTICE_PATHS, "kmeans_image", "kmeans_curve", "kmeans_curve_shape"):
            vals = [r[key] for r in runs if key in r]
            if not vals:
                continue
            ci = "-"
            if all(key in r["hits"] for r in runs):
                worst = None
                for seed in sorted({r["seed"] for r in runs}):
                    k = sum(r["hits"][key][0] for r in runs if r["seed"] == seed)
                    n = sum(r["hits"][key][1] for r in runs if r["seed"] == seed)
                    lo, hi = clopper_pearson(k, n)
                    if worst is None or lo < worst[0]:
                        worst = (lo, hi, k, n)
                ci = f"{worst[2]}/{worst[3]}: [{100 * worst[0]:.1f}, {100 * worst[1]:.1f}]"
            lines.append(f"| {population} | {key} | {100 * min(vals):.1f} / {100 * statistics.mean(vals):.1f} | "
                         f"{sum(v >= 0.99 for v in vals)}/{len(vals)} | {ci} |")
    lines += ["", "Curve predicted from the image alone (MoE mean, eqs 13-14, amplitude head for the free amplitude), "
              "test split, median over runs [min, max]:", "",
              "| population | RMSE (MPa) | R^2 | +-2 sd band coverage (target 90-97 %) | training time per run (s) |",
              "|---|---|---|---|---|"]
    for population in dict.fromkeys(r["population"] for r in rows):
        runs = [r for r in rows if r["population"] == population]

        def cell(key, scale=1.0, fmt=".2f"):
            v = [scale * r[key] for r in runs]
            return f"{statistics.median(v):{fmt}} [{min(v):{fmt}}, {max(v):{fmt}}]"

        lines.append(f"| {population} | {cell('curve_rmse_from_image_MPa')} | {cell('curve_r2_from_image', fmt='.3f')} | "
                     f"{cell('band_2sd_coverage', 100, '.1f')} | {cell('wall_s', fmt='.0f')} |")
    lines += ["", "Expert parameters per topology (cluster mapped on the training split) against the generator's truth "
              "(training-split means): median relative error over runs [worst]:", "",
              "| population | topology | E | sigma_y | H |", "|---|---|---|---|---|"]
    for population in dict.fromkeys(r["population"] for r in rows):
        runs = [r for r in rows if r["population"] == population]
        for label in ("gyroid", "octet"):
            cells = []
            for k in ("E", "sigma_y", "H"):
                errs = [e["rel_error"][k] for r in runs for e in r["experts"] if e["label"] == label]
                if errs:
                    worst = max(errs, key=abs)
                    cells.append(f"{100 * statistics.median(errs):+.1f} % [{100 * worst:+.1f} %]")
                else:
                    cells.append("-")
            fits = [e for r in runs for e in r["experts"] if e["label"] == label]
            if fits:
                f, t = fits[0]["fit"], fits[0]["truth_mean"]
                cells[0] += f" ({f['E']:.0f} vs {t['E']:.0f} MPa)"
            lines.append(f"| {population} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("mnist", "lattice", "pairs", "all"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--noise", nargs="+", default=["clean", "noisy"], choices=("clean", "noisy"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--crossmodal-epochs", type=int, default=3)
    p.add_argument("--idx-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--data-seeds", type=int, default=5, help="lattice: datasets per population")
    p.add_argument("--specimens", type=int, default=91, help="lattice: specimens per dataset (the paper's 91)")
    p.add_argument("--populations", nargs="+", default=["design", "spread"], choices=("design", "spread"))
    p.add_argument("--tables-from", type=Path, default=None,
                   help="lattice: only write the tables from a finished sweep's runs/reproduce/lattice.json")
    p.add_argument("--override", dest="overrides", action="append", default=[],
                   help="lattice, pairs: extra key=value config override (repeatable)")
    args = p.parse_args(argv)
    lines = ["# Results", "", f"Command: `python tools/reproduce.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
             f"torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}", ""]
    if args.experiment in ("mnist", "all"):
        mnist(args, lines)
    if args.experiment in ("lattice", "all"):
        lattice(args, lines)
    if args.experiment in ("pairs", "all"):
        pairs(args, lines)
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
