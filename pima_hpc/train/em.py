"""Closed-form updates of Algorithm 1: the streaming EM pass and the expert least squares.

Each pass reads this rank's part of the training split once in eval mode, accumulates float64
sufficient statistics, sums them over workers with ONE collective call, and applies the same
M-step on every rank, so all ranks hold identical cluster means, variances, weights and expert
parameters (ERRATA 6). Also the data-driven initialisation: per-sample expert fits clustered by
k-means++, which is what makes every seed start from the right partition.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from pima_hpc.collective import allreduce_groups, gather_subsample
from pima_hpc.model.pima import PIMA
from pima_hpc.model.rls import batch_information, information_shapes, per_sample_fits
from pima_hpc.model.statistics import (StreamingStatistics, curve_statistics, latent_shapes, latent_statistics,
                                       m_step_weights)
from pima_hpc.runtime import to_device


def new_curve_statistics(model: PIMA) -> dict[str, StreamingStatistics]:
    """Per curve modality: the sums (S0, S1, S2[, M2]) on a shared grid, or the RLS information
    (pima_hpc/model/rls.py) of curves on per-sample grids; both add across batches and workers."""
    c = model.cfg.n_clusters
    out = {}
    for name in model.curve_names:
        if name in model.point_curves:
            out[name] = StreamingStatistics(information_shapes(model.experts[name], c))
            continue
        n = len(model.experts[name].t)
        shapes = {"s0": (c,), "s1": (c, n), "s2": (c,)}
        if model.amplitude_free:
            shapes["m2"] = (c, n, n)
        out[name] = StreamingStatistics(shapes)
    return out


def add_curve_batch(model: PIMA, curves: dict[str, StreamingStatistics], gamma: np.ndarray, batch: dict) -> None:
    """Add one batch's gamma-weighted curve statistics; a free amplitude needs them with a zero offset."""
    for name in model.curve_names:
        if name in model.point_curves:
            x, t, mask = model.measured_points(name, batch)
            curves[name].add(**batch_information(model.experts[name], gamma, x, t, mask))
            continue
        x = batch[name].double().cpu().numpy()
        if model.amplitude_free:
            x = x + model.curve_shift(name)
        curves[name].add(**curve_statistics(gamma, x, second_moment=model.amplitude_free))


def sample_fits(model: PIMA, name: str, batch: dict) -> np.ndarray:
    """The expert fitted to each curve of the batch alone, in physical units (B, p): on its own grid where
    the curve has one."""
    x, t, mask = model.measured_points(name, batch)
    return model.experts[name].fit_samples(x) if t is None else per_sample_fits(model.experts[name], x, t, mask)


def reduce_all(collective, groups: list[StreamingStatistics]) -> None:
    """Sum several statistics objects over workers in one collective call."""
    for g, summed in zip(groups, allreduce_groups(collective, [g.arrays() for g in groups])):
        g.set_arrays(summed)


@torch.no_grad()
def em_pass(model: PIMA, reader, batch_size: int, collective, device, curve_memory: dict | None = None,
            forgetting: float = 0.0):
    """E-step over the whole split (gamma at z = mu, ERRATA 8) -> reduced statistics.

    Returns (latent statistics, curve statistics per curve modality). ``curve_memory`` holds the
    previous epochs' reduced curve statistics; with forgetting factor lambda the expert solve uses
    lambda * previous + current (recursive least squares with exponential forgetting).
    """
    was_training = model.training
    model.eval()
    c, l = model.cfg.n_clusters, model.cfg.latent_dim
    latent = StreamingStatistics(latent_shapes(c, l, model.full_covariance))
    curves = new_curve_statistics(model)
    for batch in reader.iter_batches(batch_size, shuffle=False):
        batch = to_device(batch, device)
        mu, logvar = model.encode(batch)
        # The same q(c) the ELBO uses, evaluated at z = mu so the pass is deterministic (ERRATA 8).
        log_q = model.cluster_log_posterior(batch, mu, logvar, mu)
        gamma = log_q.exp().double().cpu().numpy()
        latent.add(**latent_statistics(gamma, mu.double().cpu().numpy(), logvar.exp().double().cpu().numpy(),
                                       model.full_covariance))
        add_curve_batch(model, curves, gamma, batch)
    reduce_all(collective, [latent] + [curves[n] for n in model.curve_names])
    if curve_memory and forgetting > 0:
        for name in model.curve_names:
            prev = curve_memory[name]
            prev.decay(forgetting)
            curves[name].merge(prev)
    model.train(was_training)
    return latent, curves


@torch.no_grad()
def agreement(model: PIMA, reader, batch_size: int, collective, device) -> float:
    """Fraction of samples whose latent code alone (p(c|z=mu)) names the cluster q(c|X) names."""
    was_training = model.training
    model.eval()
    hits = 0.0
    for batch in reader.iter_batches(batch_size, shuffle=False):
        batch = to_device(batch, device)
        mu, logvar = model.encode(batch)
        same = model.log_responsibilities(mu).argmax(-1) == model.cluster_log_posterior(batch, mu, logvar, mu).argmax(-1)
        hits += float(same.sum())
    total = collective.allreduce_sum([np.array([hits, len(reader)])])[0]
    model.train(was_training)
    return float(total[0] / max(total[1], 1.0))


@torch.no_grad()
def initialise_from_experts(model: PIMA, reader, batch_size: int, collective, device, seed: int,
                            max_fit_samples: int = 20000) -> dict:
    """Seed clusters from the physics: fit the expert to every curve alone, k-means++ the fits.

    Every rank fits its own samples; a subsample of at most ``max_fit_samples`` fits in total is
    gathered through the collective (a sum of zero-padded per-rank slots) so every rank runs the
    identical k-means. Then one pass assigns every sample to its nearest centre and the experts
    and their noise are solved exactly on those hard assignments (eq 17 with one-hot gamma).
    """
    names = model.curve_names
    fits = []
    for batch in reader.iter_batches(batch_size, shuffle=False):
        fits.append(np.concatenate([model.experts[n].cluster_features(sample_fits(model, n, batch))
                                    for n in names], axis=1))
    fits = np.concatenate(fits)
    sample = gather_subsample(collective, fits, max_fit_samples)
    center, spread = sample.mean(0), sample.std(0) + 1e-12
    kmeans = KMeans(n_clusters=model.cfg.n_clusters, n_init=10, random_state=seed).fit((sample - center) / spread)
    assign = kmeans.predict((fits - center) / spread)

    curves = new_curve_statistics(model)
    eye = np.eye(model.cfg.n_clusters)
    start = 0
    for batch in reader.iter_batches(batch_size, shuffle=False):
        gamma = eye[assign[start:start + len(batch["index"])]]
        start += len(batch["index"])
        add_curve_batch(model, curves, gamma, batch)
    reduce_all(collective, [curves[n] for n in names])
    for name, st in curves.items():
        model.solve_expert(name, st, ridge=0.0, noise="learned", noise_floor=model.cfg.expert_noise_floor)
    if model.cfg.expert_noise == "fixed":
        for n in names:
            model.log_noise(n).fill_(float(np.log(model.cfg.expert_noise_std ** 2)))
    first = curves[names[0]]
    counts = first["w"] if "w" in first else first["s0"]  # cluster sizes: information or sums
    model.pi_logits.data.copy_(torch.as_tensor(np.log(m_step_weights(counts))))
    if model.cfg.cluster_init_layout == "physics":
        model.cluster_means.copy_(torch.as_tensor(anchors_from_centres(
            kmeans.cluster_centers_, model.cfg.latent_dim, model.cfg.cluster_init_scale), dtype=torch.float32))
    return {"cluster_sizes": counts.tolist(), "kmeans_inertia": float(kmeans.inertia_)}


def anchors_from_centres(centres: np.ndarray, latent_dim: int, min_distance: float) -> np.ndarray:
    """Initial cluster means laid out like the clusters' expert parameters.

    The standardised k-means centres are projected on their first principal axis, and that
    coordinate becomes the angle on an arc (up to 300 degrees) in the first two latent axes; a
    second principal axis, if any, becomes the third latent axis. Everything is scaled so the
    closest pair is ``min_distance`` apart. Clusters with similar physics start close, so an
    encoder learns a smooth, low-frequency map from the physics to the latent code (the paper's
    ordered clusters, Section 3.1), while the bend keeps distant clusters far apart.
    """
    x = centres - centres.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pcs = x @ vt.T
    proj = np.zeros((len(x), latent_dim))
    u = pcs[:, 0]
    u = (u - u.min()) / max(np.ptp(u), 1e-12)
    if latent_dim == 1:
        proj[:, 0] = u
    else:
        angle = u * np.deg2rad(300.0)
        proj[:, 0], proj[:, 1] = np.cos(angle), np.sin(angle)
        if latent_dim >= 3 and pcs.shape[1] >= 2:
            proj[:, 2] = pcs[:, 1] / max(np.abs(pcs[:, 0]).max(), 1e-12)
    d = np.linalg.norm(proj[:, None] - proj[None], axis=-1)
    closest = d[~np.eye(len(x), dtype=bool)].min()
    return proj * (min_distance / max(closest, 1e-12))


@torch.no_grad()
def update_image_noise(model: PIMA, reader, batch_size: int, collective, device) -> dict[str, float]:
    """model.image_noise: learned: sigma^2 of each network-decoded modality (images, network curves) = its
    mean squared residual per value at z = mu over the training split (the closed-form maximiser of eq 12 at
    the posterior mean), floored.

    Residual sums go through the collective, so every rank sets the same variance.
    """
    names = model.decoded_names
    sums = np.zeros(2 * len(names))
    for batch in reader.iter_batches(batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        mu, _ = model.encode(batch)
        for i, n in enumerate(names):
            d = (batch[n] - model.decoders[n](mu)).flatten(1).double()
            sums[2 * i] += float((d ** 2).sum())
            sums[2 * i + 1] += d.numel()
    sums = collective.allreduce_sum([sums])[0]
    out = {}
    for i, n in enumerate(names):
        var = max(sums[2 * i] / max(sums[2 * i + 1], 1.0), model.cfg.image_noise_floor ** 2)
        model.set_recon_variance(n, var)
        out[n] = float(np.sqrt(var))
    return out
