"""PNG figures of a run, in the spirit of the paper's Figures 3-6.

latent.png             fused posterior means coloured by cluster, with the centroids (Figs 3-4)
confusion_<how>.png    test confusion matrices of each inference path (Fig 5)
experts_<curve>.png    the data of each cluster with its expert fit, physical units (Figs 4, 6)
generated_<image>.png  images decoded at mu_c and mu_c +- 3 sigma_c along each latent axis (Fig 4)
crossmodal_<a>_to_<b>.png  curves predicted from the image alone: MoE mean +- 2 sd (eqs 13-14)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pima_hpc.runtime import to_device  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _sample(ev, reader, n=2000):
    model = ev.model.eval()
    idx = reader.batch_index_lists(max(n, 2), shuffle=True, seed=ev.seed)[0][:n]
    batch = to_device(reader.read_batch(idx), ev.device)
    mu, _ = model.encode(batch)
    gamma = model.log_responsibilities(mu).exp()
    return batch, mu.cpu().numpy(), gamma.argmax(-1).cpu().numpy()


def latent_figure(ev, reader, path):
    batch, mu, clusters = _sample(ev, reader)
    means = ev.model.cluster_means.cpu().numpy()
    l = mu.shape[1]
    pairs = [(0, 1)] if l == 2 else [(0, 1), (0, 2), (1, 2)] if l >= 3 else [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4.2), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        ys = mu[:, b] if l > 1 else np.zeros(len(mu))
        ax.scatter(mu[:, a], ys, c=clusters, cmap="tab10", s=4, alpha=0.6)
        ax.scatter(means[:, a], means[:, b] if l > 1 else np.zeros(len(means)), c="k", marker="x", s=60)
        for c, m in enumerate(means):
            ax.annotate(str(c), (m[a], m[b] if l > 1 else 0.0), fontsize=9, weight="bold")
        ax.set_xlabel(f"z{a + 1}")
        ax.set_ylabel(f"z{b + 1}")
    fig.suptitle("latent posterior means by cluster (x: cluster means)")
    _save(fig, path)


def confusion_figure(confusion, labels, title, path):
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(labels), 0.8 + 0.45 * len(labels)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted (mapped cluster)")
    ax.set_ylabel("true label")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def measured_curves(model, name, batch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each sample's curve as measured, (t, x) in physical units: its own points where the curve has
    per-sample grids (never the encoder's resampled view), else the shared grid."""
    x, t, mask = model.measured_points(name, batch)
    if t is None:
        return [(model.spec[name].t, xi) for xi in x]
    return [(ti[mi > 0], xi[mi > 0]) for ti, xi, mi in zip(t, x, mask)]


def experts_figure(ev, reader, name, path):
    batch, _, clusters = _sample(ev, reader, 600)
    model, spec = ev.model, ev.model.spec[name]
    t = spec.t
    measured = measured_curves(model, name, batch)
    fits = model.experts[name].evaluate(model.theta(name))
    noise = model.log_noise(name).exp().sqrt().cpu().numpy() * spec.scale
    c = model.cfg.n_clusters
    cols = min(c, 5)
    rows = int(np.ceil(c / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.5 * rows), squeeze=False, sharey=True)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= c:
            ax.axis("off")
            continue
        for i in np.flatnonzero(clusters == k)[:40]:
            ax.plot(*measured[i], color="0.7", lw=0.6)
        ax.plot(t, fits[k], color="C3", lw=2)
        ax.fill_between(t, fits[k] - 2 * noise[k], fits[k] + 2 * noise[k], color="C3", alpha=0.15)
        ax.set_title(f"cluster {k} (n={int((clusters == k).sum())})", fontsize=9)
        ax.set_xlabel(spec.t_units or "t", fontsize=8)
    fig.suptitle(f"{name}: data per cluster (grey) and expert fit +- 2 sigma_hat (red)")
    _save(fig, path)


@torch.no_grad()
def generated_figure(ev, name, path):
    model = ev.model
    means = model.cluster_means
    sd = model.cluster_logvars.exp().sqrt()
    c, l = means.shape
    zs, titles = [], ["mu_c"]
    for k in range(c):
        zs.append(means[k])
    for j in range(l):
        for sign in (-3, 3):
            titles.append(f"{'+' if sign > 0 else '-'}3s z{j + 1}")
            for k in range(c):
                zs.append(means[k] + sign * sd[k] * torch.eye(l, device=means.device)[j])
    imgs = model.decoders[name](torch.stack(zs)).cpu().numpy()
    ncol = len(titles)
    fig, axes = plt.subplots(c, ncol, figsize=(1.1 * ncol, 1.1 * c), squeeze=False)
    for col in range(ncol):
        for k in range(c):
            ax = axes[k][col]
            ax.imshow(imgs[col * c + k, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(titles[col], fontsize=7)
            if col == 0:
                ax.set_ylabel(str(k), fontsize=8)
    fig.suptitle(f"{name} generated at cluster means and mu_c +- 3 sigma_c")
    _save(fig, path)


@torch.no_grad()
def crossmodal_figure(ev, reader, src, dst, path, n=6):
    model, spec = ev.model, ev.model.spec[dst]
    batch, _, _ = _sample(ev, reader, n)
    mean, var = ev.crossmodal.predict_curve(model, src, dst, batch[src])
    truth = measured_curves(model, dst, batch)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.4), squeeze=False)
    for i in range(n):
        ax = axes[0][i]
        m, s = mean[i].cpu().numpy(), var[i].sqrt().cpu().numpy()
        ax.fill_between(spec.t, m - 2 * s, m + 2 * s, color="C0", alpha=0.2)
        ax.plot(spec.t, m, color="C0", label="predicted from " + src)
        ax.plot(*truth[i], color="k", lw=0.8, label="measured")
        if i == 0:
            ax.legend(fontsize=6)
    fig.suptitle(f"{dst} predicted from {src} alone (MoE mean +- 2 sd, eqs 13-14)")
    _save(fig, path)


def write_figures(ev, metrics: dict, run_dir) -> list[str]:
    """Every figure of a run into ``run_dir/figures`` from an :class:`~pima_hpc.evaluation.evaluate.Evaluator`
    (its model, cross-modal networks and splits: the test split, else validation, else training)."""
    out = Path(run_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    reader = next(ev.splits[k] for k in ("test", "val", "train") if k in ev.splits)
    written = []

    def add(p):
        written.append(str(p))
        return p

    latent_figure(ev, reader, add(out / "latent.png"))
    labels = list(ev.model.spec.label_names or [])
    for key, m in metrics.items():
        if isinstance(m, dict) and "test" in m and "confusion" in m["test"]:
            confusion_figure(m["test"]["confusion"], labels,
                             f"{key}: test accuracy {100 * m['test']['accuracy']:.2f}%",
                             add(out / f"confusion_{key}.png"))
    for name in ev.model.curve_names:
        experts_figure(ev, reader, name, add(out / f"experts_{name}.png"))
    for name in ev.model.image_names:
        generated_figure(ev, name, add(out / f"generated_{name}.png"))
    if ev.crossmodal is not None:
        for src in ev.model.image_names:
            for dst in ev.model.curve_names:
                crossmodal_figure(ev, reader, src, dst, add(out / f"crossmodal_{src}_to_{dst}.png"))
    return written
