"""report.html: self-contained (every image a data URI, nothing fetched), the read-outs with the
baselines, every figure, the config escaped; rendered by a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from pima_hpc.config import load_config
from pima_hpc.evaluation.report import render_report
from pima_hpc.train.run import train_from_config

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    cfg = load_config("configs/digits.yaml", [f"run_dir={run}", "train.progress=false", "train.epochs=2",
                                              "crossmodal.epochs=2"])
    assert train_from_config(cfg) == 0
    return run


class _Tags(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.bad = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag in ("script", "link", "iframe"):
            self.bad.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_report_is_self_contained_and_complete(run):
    text = (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    tags = _Tags()
    tags.feed(text)
    assert not tags.stack and not tags.bad
    assert tags.imgs and all(src.startswith("data:image/png;base64,") for src in tags.imgs)
    assert "http://" not in text and "https://" not in text and "file:" not in text
    figures = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert all(f"<figcaption>{name}</figcaption>" in text for name in figures)
    assert len(tags.imgs) == len(figures) + 3  # + ELBO, validation accuracy, cross-modal losses
    headline = f"{100 * metrics['multimodal']['test']['accuracy']:.2f} %"
    assert "<tr class='head'><td>multimodal</td>" in text and headline in text
    assert "kmeans_image" in text and "includes the experts" in text
    assert "image_to_curve" in text and "slope" in text


def test_config_and_names_are_escaped(run):
    metrics = json.loads((run / "metrics.json").read_text())
    page = render_report(run, metrics, "name: <script>alert('x')</script> & more", [])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp; more" in page


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("PIMA_REQUIRE_CHROMIUM"),
                    reason="chromium not installed; .ci/run installs it")
def test_report_renders_in_headless_chromium(run, tmp_path):
    from PIL import Image
    assert CHROMIUM is not None, "PIMA_REQUIRE_CHROMIUM is set but no chromium is on PATH"
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1200,2400", (run / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (2400, 1200)
    # not blank: text and figures darken a real share of the page, and the top has the title
    assert (img < 128).mean() > 0.01 and img[:150].std() > 10


def test_optional_sections_from_plain_metrics(tmp_path):
    """No training: baselines under their own group, the free-amplitude table, and no invented world
    size or wall time when metrics (as after `pima evaluate`) lack them; missing history keys are skipped."""
    from pima_hpc.evaluation.report import write_report
    split = {"accuracy": 0.5, "nmi": 0.4, "ari": 0.3, "n": 10}
    metrics = {"multimodal": {"test": split, "train": split},
               "baselines": {"gmm<x>": {"test": split}},
               "experts": {"curve": {"slope": [1.0, 2.0]}}, "cluster_weights": [0.5, 0.5],
               "expert_amplitude": {"curve": [{"cluster": 0, "n": 3, "mean": 1.0, "sd": 0.1, "q05": 0.9,
                                               "q50": 1.0, "q95": 1.1, "slope": {"q05": 0.9, "q50": 1.0, "q95": 1.1}},
                                              {"cluster": 1, "n": 0}]},
               "history": [{"epoch": 1, "train_elbo": -3.0}, {"epoch": 2, "train_elbo": -2.0}]}
    path = write_report(tmp_path, metrics, "a: 1", [], {"curve": {"units": "V", "t_units": "ms"}})
    text = path.read_text()
    assert path == tmp_path / "report.html"
    tags = _Tags()
    tags.feed(text)
    assert not tags.stack and len(tags.imgs) == 1  # only the ELBO panel: no val/cross-modal keys
    assert "<tr class='group'><td colspan='8'>baselines</td></tr><tr><td>gmm&lt;x&gt;</td>" in text
    assert "per-sample amplitude" in text and "0.9 / 1 / 1.1" in text
    assert "curve units V, t units ms" in text
    assert "world size" not in text and "wall time" not in text
