"""Initialisation from every modality (``train.init: pretrain``): a short autoencoder pre-training without
the mixture, then a Gaussian mixture fitted to the fused latent means (VaDE's recipe, with PIMA's
fusion).

Pre-training: the encoders of every modality, fused by the product of experts (eqs 7-8), and the image
decoders (eq 12) at z = mu, maximising the reconstruction term alone (no prior, no clusters, so nothing
pulls the code towards an arbitrary start). Curve modalities take part through the fusion. Then a
diagonal GaussianMixture (scikit-learn, k-means++ starts) on a subsample of the fused means, gathered
from every rank through the collective so every rank fits the identical mixture, sets the cluster
means, variances and weights. Labels are never read.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from pima_hpc.collective import gather_subsample
from pima_hpc.model.elbo import gaussian_recon_log_likelihood
from pima_hpc.runtime import to_device

log = logging.getLogger("pima")


def pretrain_autoencoder(model, reader, ctx, epochs: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train encoders + image decoders on the reconstruction at z = mu; returns the mean loss per epoch."""
    if not model.image_names or epochs == 0:
        return []
    params = [p for m in (model.encoders, model.decoders) for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    counts = reader.global_counts(batch_size)
    model.train()
    losses = []
    for epoch in range(epochs):
        total = 0.0
        for step, idx in enumerate(reader.batch_index_lists(batch_size, epoch, seed + 23, shuffle=True)):
            batch = to_device(reader.read_batch(idx), ctx.device)
            mu, _ = model.encode(batch)
            recon = sum(gaussian_recon_log_likelihood(batch[n], model.decoders[n](mu)) for n in model.image_names)
            loss = -recon.sum() / float(counts[step])  # per-sample mean over the global batch
            optimizer.zero_grad(set_to_none=True)
            (loss * ctx.world_size).backward()
            ctx.average_gradients(params)
            optimizer.step()
            total += float(loss.detach())  # this rank's share of the global per-sample mean
        losses.append(float(ctx.collective.allreduce_sum([np.array([total])])[0][0]) / max(1, len(counts)))
        if ctx.is_root:
            log.info("pre-training %d/%d  recon loss per sample %.4g", epoch + 1, epochs, losses[-1])
    return losses


@torch.no_grad()
def fit_latent_mixture(model, reader, batch_size: int, collective, device, seed: int,
                       max_rows: int = 20000) -> dict:
    """Set the mixture prior (means, log-variances, weights) from a GaussianMixture on the fused means."""
    model.eval()
    mus = np.concatenate([model.encode(to_device(b, device))[0].double().cpu().numpy()
                          for b in reader.iter_batches(batch_size, shuffle=False)])
    sample = gather_subsample(collective, mus, max_rows)
    gmm = GaussianMixture(n_components=model.cfg.n_clusters, covariance_type="diag", init_params="k-means++",
                          n_init=3, reg_covar=1e-4, random_state=seed).fit(sample)
    model.cluster_means.copy_(torch.as_tensor(gmm.means_, dtype=model.cluster_means.dtype))
    model.cluster_logvars.data.copy_(torch.as_tensor(np.log(gmm.covariances_), dtype=model.cluster_logvars.dtype))
    model.pi_logits.data.copy_(torch.as_tensor(np.log(gmm.weights_), dtype=model.pi_logits.dtype))
    return {"gmm_mean_log_likelihood": float(gmm.score(sample)), "gmm_converged": bool(gmm.converged_),
            "gmm_samples": int(len(sample)), "cluster_weights": gmm.weights_.tolist()}
