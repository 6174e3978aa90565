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

from pima_hpc.collective import gather_subsample
from pima_hpc.data.base import IMAGE

PCA_COMPONENTS = 50
GATHER_BYTES = 1 << 28  # cap on the gathered subsample (rows x features x 8 bytes)


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
