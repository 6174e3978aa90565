import numpy as np
import pytest

from pima_hpc.evaluation.metrics import contingency, fit_cluster_to_label, hungarian_accuracy, table_metrics


def test_hungarian_accuracy_is_one_under_any_relabelling():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 1000)
    for _ in range(5):
        perm = rng.permutation(10)
        assert hungarian_accuracy(perm[labels], labels) == 1.0


def test_hungarian_accuracy_counts_errors_and_mapping_transfers():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    clusters = np.array([2, 2, 1, 0, 0, 0, 1, 1])
    assert hungarian_accuracy(clusters, labels) == pytest.approx(7 / 8)
    mapping = fit_cluster_to_label(contingency(clusters, labels, 3, 3))
    # A held-out split is scored with the train mapping, not re-mapped.
    held = table_metrics(contingency(np.array([0, 1, 2]), np.array([1, 2, 0]), 3, 3), mapping)
    assert held["accuracy"] == 1.0
    held = table_metrics(contingency(np.array([0, 1, 2]), np.array([0, 1, 2]), 3, 3), mapping)
    assert held["accuracy"] == 0.0
    assert np.array(held["confusion"]).sum() == 3


def test_nmi_ari_are_scikit_learns():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 500)
    clusters = np.where(rng.random(500) < 0.8, labels, rng.integers(0, 4, 500))
    m = table_metrics(contingency(clusters, labels, 4, 4), np.arange(4))
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters))
    assert m["ari"] == pytest.approx(adjusted_rand_score(labels, clusters))
