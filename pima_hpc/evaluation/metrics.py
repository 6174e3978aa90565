"""Unsupervised clustering metrics from contingency tables.

Everything is computed from a contingency table (clusters x labels), because tables add across
ranks: each rank counts its own predictions and one collective sum gives the global table.
Accuracy uses the Hungarian method (eq 21; scipy's linear_sum_assignment) with the
cluster-to-label mapping fitted on the training split and then applied unchanged to the
validation and test splits, so held-out accuracy is not optimistically re-mapped.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(clusters: np.ndarray, labels: np.ndarray, n_clusters: int, n_labels: int) -> np.ndarray:
    """Counts table[c, k] of samples in cluster c with label k (float64, ready for a collective sum)."""
    table = np.zeros((n_clusters, n_labels), dtype=np.float64)
    np.add.at(table, (clusters, labels), 1.0)
    return table


def fit_cluster_to_label(table: np.ndarray) -> np.ndarray:
    """The cluster -> label map maximising matches (eq 21), by the Hungarian method.

    With more clusters than labels, unmatched clusters take their majority label.
    """
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = table.argmax(axis=1)
    mapping[rows] = cols
    return mapping


def mapped_accuracy(table: np.ndarray, mapping: np.ndarray) -> float:
    total = table.sum()
    return float(sum(table[c, mapping[c]] for c in range(len(table))) / total) if total else float("nan")


def hungarian_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """acc of eq 21: the best one-to-one relabelling of ``clusters`` against ``labels``."""
    n_c, n_k = int(clusters.max()) + 1, int(labels.max()) + 1
    table = contingency(clusters, labels, n_c, n_k)
    return mapped_accuracy(table, fit_cluster_to_label(table))


def _labels_from_table(table: np.ndarray):
    c, k = np.nonzero(table)
    counts = table[c, k].astype(np.int64)
    return np.repeat(c, counts), np.repeat(k, counts)


def table_metrics(table: np.ndarray, mapping: np.ndarray) -> dict:
    """Accuracy under ``mapping``, NMI and ARI (scikit-learn) and the confusion matrix label x label."""
    clusters, labels = _labels_from_table(table)
    n_labels = table.shape[1]
    confusion = np.zeros((n_labels, n_labels), dtype=np.int64)
    for c in range(len(table)):
        confusion[:, mapping[c]] += table[c].astype(np.int64)
    return {
        "accuracy": mapped_accuracy(table, mapping),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "n": int(table.sum()),
        "confusion": confusion.tolist(),  # rows: true label, columns: predicted label
    }
