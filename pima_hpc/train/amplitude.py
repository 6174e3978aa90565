"""The amplitude model of cross-modal curve predictions (free expert amplitude, docs/method.md).

With ``model.expert_amplitude: free`` each curve is a_d E_c(t): a curve predicted from another
modality alone needs its amplitude. Per (source modality, curve modality) and cluster, log a_c is
regressed linearly on the source's cross-modal latent mean, [mu~, 1] W_c, with the residual variance
as its uncertainty; the MoE band (eqs 13-14) then widens by it. The fit is closed-form least squares
from sums over this rank's training split, added over ranks in ONE collective call, so every rank
holds the same W. a_c is the curve's profiled amplitude under cluster c's shape, defined for every
cluster, so every cluster's regression is fitted on every sample (no labels).
"""

from __future__ import annotations

import numpy as np
import torch

from pima_hpc.model.crossmodal import CrossModalEncoders, amplitude_key
from pima_hpc.model.pima import PIMA
from pima_hpc.model.statistics import StreamingStatistics, regression_statistics, solve_regression
from pima_hpc.runtime import to_device
from pima_hpc.train.em import reduce_all


@torch.no_grad()
def fit_amplitude_models(model: PIMA, crossmodal: CrossModalEncoders, reader, batch_size: int, collective,
                         device) -> dict[str, float]:
    """Fit every amplitude regression; returns the residual sd of log a per pair (mean over clusters)."""
    pairs = [(src, dst) for src in model.names for dst in model.curve_names
             if amplitude_key(src, dst) in crossmodal.amplitude_keys]
    if not pairs:
        return {}
    was_training = crossmodal.training
    crossmodal.eval()
    p, c = model.cfg.latent_dim + 1, model.cfg.n_clusters
    sums = {pair: StreamingStatistics({"xtx": (p, p), "xty": (p, c), "yty": (c,), "n": ()}) for pair in pairs}
    for batch in reader.iter_batches(batch_size, shuffle=False):
        batch = to_device(batch, device)
        for src, dst in pairs:
            x = crossmodal.amplitude_features(src, batch[src]).double().cpu().numpy()
            y = model.amplitudes(dst, batch[dst]).clamp_min(1e-6).log().double().cpu().numpy()
            sums[(src, dst)].add(**regression_statistics(x, y))
    reduce_all(collective, list(sums.values()))
    out = {}
    for (src, dst), st in sums.items():
        coef, var = solve_regression(st["xtx"], st["xty"], st["yty"], float(st["n"]))
        crossmodal.set_amplitude_model(src, dst, coef, np.log(var))
        out[f"amplitude_sd_{src}_to_{dst}"] = float(np.sqrt(var).mean())
    crossmodal.train(was_training)
    return out
