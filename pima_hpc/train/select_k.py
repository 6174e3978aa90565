"""Choosing the number of clusters K without labels (``pima select-k CONFIG --range 2:20``).

The autoencoder of ``train.init: pretrain`` is pre-trained once (every modality, calibrated
likelihoods; pima_hpc/train/pretrain.py), then a diagonal Gaussian mixture (scikit-learn,
k-means++ starts) is fitted to the fused latent means of the training split for every K of the
range. Each K is scored by

* BIC = -2 log L + p log n on the training means (p free parameters of the mixture),
* ICL = BIC + 2 * (entropy of the responsibilities): BIC that also charges for clusters that overlap,
  so it prefers well-separated groups (Biernacki, Celeux & Govaert 2000),
* the mean log-likelihood of the validation split's means (held out: it cannot favour K by fitting
  the same points it scores).

The chosen K minimises ``--criterion`` (ICL by default). The means are gathered from every rank
through the collective, so every rank fits the same mixtures. Labels are never read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from sklearn.mixture import GaussianMixture

from pima_hpc.collective import gather_subsample
from pima_hpc.errors import ConfigError

log = logging.getLogger("pima")

CRITERIA = ("icl", "bic", "heldout")


def parse_k_range(text: str) -> list[int]:
    """"2:20" -> [2, ..., 20] (inclusive); "4,8,10" -> those values."""
    try:
        if ":" in text:
            lo, hi = (int(v) for v in text.split(":"))
            ks = list(range(lo, hi + 1))
        else:
            ks = sorted({int(v) for v in text.split(",")})
    except ValueError:
        ks = []
    if not ks or ks[0] < 2:
        raise ConfigError(f"--range {text!r}: give LO:HI (inclusive) or a comma list of cluster counts >= 2, "
                          "e.g. --range 2:20")
    return ks


def mixture_scores(train_means: np.ndarray, val_means: np.ndarray | None, ks: list[int], seed: int,
                   covariance: str = "diag") -> list[dict]:
    """BIC, ICL and held-out mean log-likelihood of a GaussianMixture per K, with the model's covariances
    (``model.cluster_covariance``: "diag" or "full"; BIC counts their parameters)."""
    rows = []
    for k in ks:
        gmm = GaussianMixture(n_components=k, covariance_type=covariance, init_params="k-means++", n_init=3,
                              reg_covar=1e-4, random_state=seed).fit(train_means)
        resp = gmm.predict_proba(train_means)
        entropy = float(-(resp * np.log(np.clip(resp, 1e-300, None))).sum())
        bic = float(gmm.bic(train_means))
        rows.append({"k": k, "bic": bic, "icl": bic + 2.0 * entropy,
                     "heldout": float(gmm.score(val_means)) if val_means is not None else None,
                     "train_log_likelihood": float(gmm.score(train_means)), "converged": bool(gmm.converged_),
                     "smallest_weight": float(gmm.weights_.min())})
    return rows


def choose(rows: list[dict], criterion: str) -> int:
    if criterion == "heldout":
        if rows[0]["heldout"] is None:
            raise ConfigError("--criterion heldout needs a validation split (data.val_split); use icl or bic")
        return max(rows, key=lambda r: r["heldout"])["k"]
    return min(rows, key=lambda r: r[criterion])["k"]


def plot_scores(rows: list[dict], chosen: int, criterion: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [r["k"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for key in ("bic", "icl"):
        axes[0].plot(ks, [r[key] for r in rows], marker="o", label=key.upper())
    axes[0].set_ylabel("criterion (lower is better)")
    if rows[0]["heldout"] is not None:
        axes[1].plot(ks, [r["heldout"] for r in rows], marker="o", color="C2")
    axes[1].set_ylabel("validation mean log-likelihood")
    for ax in axes:
        ax.axvline(chosen, color="0.5", ls="--")
        ax.set_xlabel("K (clusters)")
    axes[0].legend()
    fig.suptitle(f"choosing K on the fused latent means: K = {chosen} by {criterion}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select_k(cfg, ks: list[int], criterion: str, ctx, out_dir: str | None = None, max_rows: int = 20000) -> dict:
    """Pre-train once in the run context ``ctx`` (left open), score every K, write select_k.json and
    select_k.png to ``out_dir`` (run_dir)."""
    from pima_hpc.atomic import atomic_write_text
    from pima_hpc.train.pretrain import fused_means, pretrain_autoencoder
    from pima_hpc.train.signals import StopRequested
    from pima_hpc.train.trainer import Trainer

    if criterion not in CRITERIA:
        raise ConfigError(f"--criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    trainer = None
    try:
        trainer = Trainer(cfg, ctx)
        t, model = cfg.train, trainer.model

        def stop(where: str) -> None:  # a Slurm USR1 or TERM: exit 75 now, not after the pre-training
            raise StopRequested(f"select-k's {where}", "nothing saved: K is chosen again when the run is resumed")

        trainer.signals.install()
        try:
            pre = pretrain_autoencoder(model, trainer.train_data, ctx, t.pretrain_epochs, t.batch_size, t.lr,
                                       cfg.seed, t.pretrain_balance, t.augment,
                                       stop_requested=lambda: trainer.signals.requested, on_stop=stop)
        finally:
            trainer.signals.uninstall()
        train_means = gather_subsample(ctx.collective, fused_means(model, trainer.train_data, trainer.eval_batch,
                                                                    ctx.device), max_rows)
        val_means = None
        if trainer.val_data is not None:
            val_means = gather_subsample(ctx.collective, fused_means(model, trainer.val_data, trainer.eval_batch,
                                                                      ctx.device), max_rows)
        rows = mixture_scores(train_means, val_means, ks, cfg.seed, cfg.model.cluster_covariance)
        chosen = choose(rows, criterion)
        result = {"chosen_k": chosen, "criterion": criterion, "scores": rows, "pretrain": pre,
                  "train_rows": int(len(train_means)), "latent_dim": cfg.model.latent_dim}
        if ctx.rank == 0:
            out = Path(out_dir or cfg.run_dir)
            out.mkdir(parents=True, exist_ok=True)
            plot_scores(rows, chosen, criterion, out / "select_k.png")
            atomic_write_text(out / "select_k.json", json.dumps(result, indent=1))
            result["written"] = [str(out / "select_k.json"), str(out / "select_k.png")]
        return result
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None


def chosen_k_for_run(cfg, ks: list[int], criterion: str, ctx) -> int:
    """K for ``pima train --select-k``: the run directory's select_k.json when it holds this range and
    criterion (a resumed or repeated run keeps its K), else :func:`select_k` now, in ``ctx``."""
    path = Path(cfg.run_dir) / "select_k.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("criterion") == criterion and [r["k"] for r in stored.get("scores", [])] == ks:
            log.info("select-k: K = %d from %s (%s)", stored["chosen_k"], path, criterion)
            return int(stored["chosen_k"])
    result = select_k(cfg, ks, criterion, ctx)
    log.info("select-k: K = %d by %s over %d..%d (%s)", result["chosen_k"], criterion, ks[0], ks[-1],
             ", ".join(result.get("written", [])) or "written by rank 0")
    return int(result["chosen_k"])
