"""k-means baselines of each modality alone: equal to scikit-learn run directly, scored with the
read-outs' Hungarian rule, and gathered from several ranks into the rows one process would use."""

from __future__ import annotations

import threading

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from pima_hpc.collective import Collective
from pima_hpc.config import ModelConfig
from pima_hpc.data.digits import open_digits_split
from pima_hpc.collective import gather_subsample
from pima_hpc.evaluation.baselines import below_baselines, kmeans_baselines
from pima_hpc.evaluation.evaluate import Evaluator
from pima_hpc.evaluation.metrics import contingency, fit_cluster_to_label, table_metrics
from pima_hpc.model.pima import PIMA


class ThreadCollective(Collective):
    """``world`` ranks as threads of one process: allreduce_sum sums every thread's arrays."""

    def __init__(self, rank, shared):
        self.rank, self.world_size, self.shared = rank, shared["world"], shared

    def allreduce_sum(self, arrays):
        s = self.shared
        s["barrier"].wait()
        with s["lock"]:
            s["acc"] = [a.astype(float) for a in arrays] if s["acc"] is None else \
                [x + np.asarray(a, float) for x, a in zip(s["acc"], arrays)]
        s["barrier"].wait()
        out = [x.copy() for x in s["acc"]]
        s["barrier"].wait()
        s["acc"] = None
        s["barrier"].wait()
        return out


def test_gathered_subsample_is_every_ranks_rows_in_rank_order():
    rows = np.arange(50, dtype=float).reshape(25, 2)
    blocks = [rows[:13], rows[13:]]
    shared = {"world": 2, "barrier": threading.Barrier(2), "lock": threading.Lock(), "acc": None}
    got = [None, None]

    def work(r):
        got[r] = gather_subsample(ThreadCollective(r, shared), blocks[r], max_rows=100)
    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    np.testing.assert_array_equal(got[0], rows)
    np.testing.assert_array_equal(got[1], rows)
    one = gather_subsample(Collective(), rows, max_rows=5)
    np.testing.assert_array_equal(one, rows[np.linspace(0, 24, 5).astype(int)])


def test_kmeans_baselines_equal_scikit_learn_directly():
    splits = {s: open_digits_split(s) for s in ("train", "val", "test")}

    model = PIMA(splits["train"].spec, ModelConfig(n_clusters=10))  # untrained: baselines never use it
    ev = Evaluator(model, None, splits, Collective(), "cpu", batch_size=100, seed=0)
    got = kmeans_baselines(ev)

    def arrays(s, name):
        b = splits[s].read_batch(splits[s].indices)
        return b[name].reshape(len(b[name]), -1).double().numpy(), b["label"].numpy()
    xtr, ytr = arrays("train", "image")
    xte, yte = arrays("test", "image")
    pca = PCA(n_components=50, random_state=0).fit(xtr)
    km = KMeans(n_clusters=10, n_init=10, random_state=0).fit(pca.transform(xtr))
    mapping = fit_cluster_to_label(contingency(km.labels_, ytr, 10, 10))
    expected = table_metrics(contingency(km.predict(pca.transform(xte)), yte, 10, 10), mapping)["accuracy"]
    assert got["kmeans_image"]["test"]["accuracy"] == expected
    assert 0.5 < expected < 0.95          # pixels alone are far from the labels on digits
    assert got["kmeans_curve"]["test"]["accuracy"] > 0.99  # the digits' curve is the label (X2 = c t)
    metrics = {"multimodal": {"test": {"accuracy": 0.98}}, "baselines": got}
    warnings = below_baselines(metrics)
    assert len(warnings) == 1 and "k-means on curve alone" in warnings[0]
