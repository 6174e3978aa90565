"""What each modality gives without the model: k-means on it alone, scored exactly like the model's
read-outs (Hungarian map fitted on the training split, applied to val and test), so a user sees at
once whether the fused latent clustering adds anything.

Images are flattened and reduced by PCA (50 components, the usual k-means-on-pixels baseline);
curves are clustered as they are stored (normalised). The fit uses a subsample of at most
``max_fit_rows`` training rows gathered from every rank through the collective, so every rank fits
the identical k-means; every sample of every split is then assigned and scored. Labels are only
read for scoring.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from pima_hpc.data.base import IMAGE

PCA_COMPONENTS = 50
GATHER_BYTES = 1 << 28  # cap on the gathered subsample (rows x features x 8 bytes)


def gather_subsample(collective, rows: np.ndarray, max_rows: int) -> np.ndarray:
    """Evenly spaced rows of every rank (at most ``max_rows`` in total), the same array on every rank.

    A sum of zero-padded per-rank slots through the one collective; slots are as large as the
    fullest rank's share, not ``max_rows``.
    """
    world, rank = collective.world_size, collective.rank
    share = max(1, max_rows // world)
    take = np.linspace(0, len(rows) - 1, min(share, len(rows))).astype(int) if len(rows) else np.zeros(0, int)
    counts = collective.allreduce_sum([np.eye(world)[rank] * len(take)])[0].astype(int)
    slots = np.zeros((world, int(counts.max()), rows.shape[1]))
    slots[rank, :len(take)] = rows[take]
    summed = collective.allreduce_sum([slots])[0]
    return np.concatenate([summed[r, :counts[r]] for r in range(world)])


def _features(batch: dict, name: str) -> np.ndarray:
    return batch[name].reshape(len(batch[name]), -1).double().cpu().numpy()


def kmeans_baselines(ev, max_fit_rows: int = 10000) -> dict:
    """{"kmeans_<modality>": scores per split} for every modality of ``ev``'s model (an Evaluator)."""
    model, reader = ev.model, ev.splits["train"]
    out = {}
    for m in model.spec.modalities:
        dim = int(np.prod(m.shape))
        cap = max(model.cfg.n_clusters, min(max_fit_rows, GATHER_BYTES // (8 * dim)))
        local = np.concatenate([_features(b, m.name) for b in reader.iter_batches(ev.batch_size, shuffle=False)])
        sample = gather_subsample(ev.collective, local, cap)
        reduce = None
        if m.kind == IMAGE and dim > PCA_COMPONENTS:
            reduce = PCA(n_components=min(PCA_COMPONENTS, len(sample) - 1), random_state=ev.seed).fit(sample)
            sample = reduce.transform(sample)
        km = KMeans(n_clusters=model.cfg.n_clusters, n_init=10, random_state=ev.seed).fit(sample)

        def predict(batch, name=m.name, reduce=reduce, km=km):
            x = _features(batch, name)
            return torch.as_tensor(km.predict(reduce.transform(x) if reduce is not None else x))
        out[f"kmeans_{m.name}"] = ev.score(predict)
    return out


def below_baselines(metrics: dict, split: str = "test") -> list[str]:
    """Sentences naming each modality's k-means that the latent clustering (``multimodal``) does not beat."""
    model = metrics.get("multimodal", {}).get(split, {}).get("accuracy")
    if model is None:
        return []
    return [f"the latent clustering (multimodal, {100 * model:.1f} %) is not above k-means on {key[7:]} alone "
            f"({100 * b[split]['accuracy']:.1f} %) on the {split} split"
            for key, b in metrics.get("baselines", {}).items() if split in b and b[split]["accuracy"] >= model]
