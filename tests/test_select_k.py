"""Choosing K without labels: the criteria on data with a known number of groups, and `pima select-k`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from pima_hpc.cli import main as pima
from pima_hpc.train.select_k import choose, mixture_scores, parse_k_range


def _blobs(k: int, n: int, seed: int, draw: int = 0) -> np.ndarray:
    """n points of k unit Gaussians around centres fixed by ``seed``; ``draw`` picks an independent sample."""
    centres = 8.0 * np.random.default_rng(seed).standard_normal((k, 3))
    rng = np.random.default_rng([seed, draw])
    return centres[rng.integers(0, k, n)] + rng.standard_normal((n, 3))


@pytest.mark.parametrize("criterion, covariance", [("icl", "diag"), ("bic", "diag"), ("heldout", "diag"),
                                                   ("icl", "full"), ("bic", "full")])
def test_every_criterion_finds_the_number_of_separated_groups(criterion, covariance):
    # (held-out likelihood with full covariances prefers K = 5 here by 1e-3 nats: it has no complexity penalty)
    rows = mixture_scores(_blobs(4, 1500, 0), _blobs(4, 1500, 0, draw=1), [2, 3, 4, 5, 6, 7], seed=0,
                          covariance=covariance)
    assert choose(rows, criterion) == 4


def test_scores_are_scikit_learns_bic_and_the_responsibility_entropy():
    x, v = _blobs(3, 800, 1), _blobs(3, 300, 1, draw=1)
    (row,) = mixture_scores(x, v, [3], seed=0)
    gmm = GaussianMixture(3, covariance_type="diag", init_params="k-means++", n_init=3, reg_covar=1e-4,
                          random_state=0).fit(x)
    resp = gmm.predict_proba(x)
    entropy = -(resp * np.log(np.clip(resp, 1e-300, None))).sum()
    assert row["bic"] == pytest.approx(gmm.bic(x), rel=1e-12)
    assert row["icl"] == pytest.approx(gmm.bic(x) + 2 * entropy, rel=1e-12)
    assert row["heldout"] == pytest.approx(gmm.score(v), rel=1e-12)


def test_parse_k_range():
    assert parse_k_range("2:5") == [2, 3, 4, 5] and parse_k_range("8,4,4") == [4, 8]
    for bad in ("1:4", "a:b", "", "5:3"):
        with pytest.raises(Exception, match="--range"):
            parse_k_range(bad)


def test_select_k_command_writes_scores_and_plot(tmp_path, capsys):
    run = tmp_path / "sel"
    assert pima(["select-k", "configs/digits.yaml", f"run_dir={run}", "train.pretrain_epochs=2",
                 "train.progress=false", "--range", "2:4"]) == 0
    result = json.loads((run / "select_k.json").read_text())
    assert [r["k"] for r in result["scores"]] == [2, 3, 4]
    assert result["chosen_k"] == min(result["scores"], key=lambda r: r["icl"])["k"]
    assert len(result["pretrain"]["pretrain_losses"]) == 2
    assert (run / "select_k.png").stat().st_size > 1000
    assert f"chosen K = {result['chosen_k']}" in capsys.readouterr().out
    assert pima(["select-k", "configs/digits.yaml", f"run_dir={run}", "--range", "1:3"]) == 2
    assert "--range '1:3'" in capsys.readouterr().err


def test_train_select_k_trains_with_the_chosen_k_and_keeps_it_on_resume(tmp_path, caplog):
    """`pima train --select-k`: the same model as training with that K given by hand, and a second call
    (a resume) reads K back from select_k.json instead of choosing again."""
    common = ["configs/digits.yaml", "train.pretrain_epochs=1", "train.epochs=1", "stages=[multimodal]",
              "train.progress=false", "figures=false"]
    sel, plain = tmp_path / "sel", tmp_path / "plain"
    assert pima(["train", *common, f"run_dir={sel}", "--select-k", "3:5"]) == 0
    chosen = json.loads((sel / "select_k.json").read_text())["chosen_k"]
    assert f"n_clusters: {chosen}" in (sel / "config.yaml").read_text()
    assert pima(["train", *common, f"run_dir={plain}", f"model.n_clusters={chosen}"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (sel, plain))
    assert a["multimodal"] == b["multimodal"]
    assert [h["train_elbo"] for h in a["history"]] == [h["train_elbo"] for h in b["history"]]
    caplog.clear()
    with caplog.at_level("INFO", logger="pima"):
        assert pima(["train", *common, f"run_dir={sel}", "--select-k", "3:5"]) == 0
    assert f"select-k: K = {chosen} from {sel / 'select_k.json'}" in caplog.text
