"""``report.html``: one self-contained page per run (figures embedded as data URIs, no external CSS,
scripts or fonts), written next to metrics.json: the read-outs with the k-means baselines, the
per-epoch curves, the experts' parameters with their units, the cross-modal quality, every figure and
the config. It opens from a laptop after ``scp`` of that one file.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from pima_hpc.atomic import atomic_write_text  # noqa: E402

REPORT_NAME = "report.html"

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td{white-space:nowrap}
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}td:nth-child(2){white-space:normal}tr.head td{font-weight:bold;background:#eef6ff}
tr.group td{font-style:italic;background:#fafafa;text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.8em;color:#555}
img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}.note{color:#666;font-size:.9em}"""

READOUT_NOTES = {
    "multimodal": "the latent clustering, argmax p(c | z = mu): the headline",
    "multimodal_joint": "argmax q(c | X): includes the experts' likelihood",
}


def _note(key: str) -> str:
    if key in READOUT_NOTES:
        return READOUT_NOTES[key]
    if key.startswith("bayes_"):
        return f"{key[6:]} experts alone (eq 19)"
    if key.startswith("crossmodal_latent_"):
        return f"from {key[18:]} alone, the paper's p(c | z = mu~)"
    if key.startswith("crossmodal_"):
        return f"from {key[11:]} alone (cluster head)"
    if key.startswith("kmeans_"):
        return f"baseline: k-means on {key[7:]} alone"
    return ""


def _png(path_or_fig) -> str:
    if isinstance(path_or_fig, (str, Path)):
        data = Path(path_or_fig).read_bytes()
    else:
        buf = io.BytesIO()
        path_or_fig.savefig(buf, format="png", dpi=90)
        plt.close(path_or_fig)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _esc(x) -> str:
    return html.escape(str(x))


def _pct(split: dict, key="accuracy") -> str:
    return f"{100 * split[key]:.2f} %" if key in split else ""


def _readout_table(metrics: dict) -> str:
    readouts = [k for k, v in metrics.items() if isinstance(v, dict) and isinstance(v.get("test", v.get("train")), dict)
                and "accuracy" in v.get("test", v.get("train"))]
    readouts.sort(key=lambda k: k != "multimodal")
    rows = [("", k, metrics[k]) for k in readouts]
    rows += [("baseline", k, v) for k, v in metrics.get("baselines", {}).items()]
    if not rows:
        return "<p class='note'>No labels: no read-out scores.</p>"
    out = ["<table><tr><th>read-out</th><th>meaning</th><th>test acc</th><th>test NMI</th><th>test ARI</th>"
           "<th>val acc</th><th>train acc</th><th>test n</th></tr>"]
    group_shown = ""
    for group, key, m in rows:
        if group != group_shown:
            out.append(f"<tr class='group'><td colspan='8'>{_esc(group)}s</td></tr>")
            group_shown = group
        test = m.get("test", {})
        cls = " class='head'" if key == "multimodal" else ""
        out.append(f"<tr{cls}><td>{_esc(key)}</td><td>{_esc(_note(key))}</td><td>{_pct(test)}</td>"
                   f"<td>{test.get('nmi', float('nan')):.3f}</td><td>{test.get('ari', float('nan')):.3f}</td>"
                   f"<td>{_pct(m.get('val', {}))}</td><td>{_pct(m.get('train', {}))}</td><td>{test.get('n', '')}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _history_figures(history: list[dict]) -> list[tuple[str, str]]:
    mm = [h for h in history if "stage" not in h]
    xm = [h for h in history if h.get("stage") == "crossmodal"]
    figs = []
    panels = [("ELBO per sample", mm, ("train_elbo", "val_elbo")),
              ("validation accuracy", mm, ("val_accuracy",)),
              ("cross-modal losses", xm, sorted({k for h in xm for k in h if k.startswith(("kl_", "distill_"))}))]
    for title, entries, keys in panels:
        keys = [k for k in keys if any(k in h for h in entries)]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(4.2, 3))
        for k in keys:
            pts = [(h["epoch"], h[k]) for h in entries if k in h]
            ax.plot(*zip(*pts), marker="o", ms=3, label=k)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs.append((title, _png(fig)))
    return figs


def _experts_table(metrics: dict, units: dict) -> str:
    out = []
    weights = metrics.get("cluster_weights", [])
    for curve, params in metrics.get("experts", {}).items():
        u = units.get(curve, {})
        out.append(f"<h3>{_esc(curve)}</h3><p class='note'>curve units {_esc(u.get('units') or '-')}, "
                   f"t units {_esc(u.get('t_units') or '-')}; noise sd in normalised units</p>")
        names = list(params)
        noise = metrics.get("expert_noise_std", {}).get(curve, [])
        out.append("<table><tr><th>cluster</th><th>weight</th>" + "".join(f"<th>{_esc(p)}</th>" for p in names)
                   + "<th>noise sd</th></tr>")
        for c in range(len(next(iter(params.values()), []))):
            cells = "".join(f"<td>{params[p][c]:.5g}</td>" for p in names)
            w = f"{weights[c]:.3f}" if c < len(weights) else ""
            sd = f"{noise[c]:.4g}" if c < len(noise) else ""
            out.append(f"<tr><td>{c}</td><td>{w}</td>{cells}<td>{sd}</td></tr>")
        out.append("</table>")
    return "".join(out)


def _amplitude_table(metrics: dict) -> str:
    """metrics["expert_amplitude"] (free amplitude only): per curve and cluster, the samples' profiled
    amplitudes a_d and the scale parameters they imply (a_d * theta_c), as quantiles."""
    out = []
    for curve, rows in (metrics.get("expert_amplitude") or {}).items():
        scale = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict)})
        out.append(f"<h3>{_esc(curve)}: per-sample amplitude</h3><table><tr><th>cluster</th><th>n</th>"
                   "<th>mean</th><th>sd</th><th>q05 / q50 / q95</th>"
                   + "".join(f"<th>{_esc(p)} = a theta, q05 / q50 / q95</th>" for p in scale) + "</tr>")
        for r in rows:
            qs = lambda d: " / ".join(f"{d[q]:.4g}" for q in ("q05", "q50", "q95") if q in d)  # noqa: E731
            num = lambda k: f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else ""  # noqa: E731
            out.append(f"<tr><td>{_esc(r.get('cluster', ''))}</td><td>{_esc(r.get('n', ''))}</td><td>{num('mean')}"
                       f"</td><td>{num('sd')}</td><td>{qs(r)}</td>"
                       + "".join(f"<td>{qs(r.get(p, {}))}</td>" for p in scale) + "</tr>")
        out.append("</table>")
    return "".join(out)


def _quality_table(metrics: dict) -> str:
    q = metrics.get("crossmodal_quality")
    if not q:
        return "<p class='note'>No cross-modal stage.</p>"
    out = ["<table><tr><th>prediction</th><th>split</th><th>RMSE</th><th>R^2</th><th>+-2 sd coverage</th>"
           "<th>samples</th></tr>"]
    for pair, splits in q.items():
        for split, v in splits.items():
            out.append(f"<tr><td>{_esc(pair)}</td><td>{_esc(split)}</td><td>{v['rmse']:.4g} {_esc(v.get('units', ''))}"
                       f"</td><td>{v['r2']:.3f}</td><td>{100 * v['coverage']:.1f} %</td><td>{v['n']}</td></tr>")
    out.append("</table>")
    return "".join(out)


def render_report(run_dir, metrics: dict, config_text: str, figures: list[str], units: dict | None = None) -> str:
    """The report as one HTML string (see the module docstring)."""
    run_dir = Path(run_dir)
    wall = metrics.get("wall_seconds_this_process")
    head = ", ".join([f"written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
                     + ([f"world size {metrics['world_size']}"] if "world_size" in metrics else [])
                     + ([f"wall time {wall:.0f} s (this process)"] if wall is not None else []))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>PIMA run {_esc(run_dir.name)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>PIMA run <code>{_esc(run_dir.name)}</code></h1><p class='note'>{_esc(str(run_dir))}: {_esc(head)}</p>",
             "<h2>Read-outs</h2>", _readout_table(metrics),
             "<h2>Training</h2>"]
    parts += [f"<figure><img alt='{_esc(t)}' src='{src}'><figcaption>{_esc(t)}</figcaption></figure>"
              for t, src in _history_figures(metrics.get("history", []))]
    parts += ["<h2>Experts</h2>", _experts_table(metrics, units or {}), _amplitude_table(metrics),
              "<h2>Cross-modal quality (curve from another modality alone)</h2>", _quality_table(metrics),
              "<h2>Figures</h2>"]
    parts += [f"<figure><img alt='{_esc(Path(p).name)}' src='{_png(p)}'><figcaption>{_esc(Path(p).name)}</figcaption>"
              "</figure>" for p in figures if Path(p).is_file()]
    parts += ["<h2>Config</h2>", f"<pre>{_esc(config_text)}</pre>", "</body></html>"]
    return "\n".join(parts)


def write_report(run_dir, metrics: dict, config_text: str, figures: list[str], units: dict | None = None) -> Path:
    """Write ``run_dir/report.html`` atomically; return its path."""
    path = Path(run_dir) / REPORT_NAME
    atomic_write_text(path, render_report(run_dir, metrics, config_text, figures, units))
    return path


def spec_units(spec) -> dict:
    """{curve name: {"units", "t_units"}} of a dataset spec, for the experts' table."""
    return {m.name: {"units": m.units, "t_units": m.t_units} for m in spec.modalities if m.t is not None}
