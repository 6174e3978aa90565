"""Results of a sweep: the ranked table, results.csv and best_config.yaml."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pima_hpc.config import load_config
from pima_hpc.tune.errors import TuneError
from pima_hpc.tune.space import format_value, overrides_for
from pima_hpc.tune.spec import TuneSpec

log = logging.getLogger("pima")


# ---------------------------------------------------------------------------------------------
# Results: the ranked table and the best config


@dataclass
class TrialRow:
    trial_id: str
    metric: float  # nan when the trial reported nothing
    val_accuracy: Optional[float]
    epochs: int
    status: str  # done | stopped (early, by the scheduler) | error | interrupted (--resume continues it)
    params: dict
    error: str = ""


@dataclass
class SweepResult:
    experiment_dir: Path
    rows: list[TrialRow]
    best: Optional[TrialRow]
    results_csv: Path
    best_config: Optional[Path]


def rows_from_results(grid, spec: TuneSpec) -> list[TrialRow]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = {k: (result.config or {}).get(k) for k in spec.space}
        epochs = int(m.get("epoch") or 0)
        value = m.get(spec.metric)
        if result.error is not None:
            status = "error"
        elif value is None:
            status = "interrupted"  # started, reported nothing
        elif epochs >= spec.epochs:
            status = "done"
        else:  # Tune marks the last result of a trial its scheduler stopped as done
            status = "stopped" if m.get("done") else "interrupted"
        err = str(result.error).strip().splitlines()[-1][:300] if result.error is not None else ""
        rows.append(TrialRow(trial_id=m.get("trial_id") or Path(result.path).name,
                             metric=float(value) if value is not None else math.nan,
                             val_accuracy=m.get("val_accuracy"), epochs=epochs, status=status, params=params,
                             error=err))
    return rank_rows(rows)


def rank_rows(rows: list[TrialRow]) -> list[TrialRow]:
    """Best first (highest metric); trials without the metric last."""
    return sorted(rows, key=lambda r: (math.isnan(r.metric), -r.metric if not math.isnan(r.metric) else 0.0,
                                       r.trial_id))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, str)):
        return json.dumps(value)
    return repr(float(value)) if isinstance(value, float) else str(value)


def write_results_csv(rows: list[TrialRow], path: Path, metric: str, space_keys: list[str]) -> None:
    import io

    from pima_hpc.atomic import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "trial_id", metric, "val_accuracy", "epochs", "status", *space_keys, "error"])
    for i, r in enumerate(rows, 1):
        writer.writerow([i, r.trial_id, repr(r.metric) if not math.isnan(r.metric) else "",
                         "" if r.val_accuracy is None else repr(float(r.val_accuracy)), r.epochs, r.status,
                         *[_csv_value(r.params.get(k)) for k in space_keys], r.error])
    atomic_write_text(path, buf.getvalue())


def format_table(rows: list[TrialRow], metric: str, space_keys: list[str]) -> str:
    header = ["#", "trial", metric, "val_acc", "epochs", "status", *space_keys]
    body = [[str(i), r.trial_id, _cell(r.metric),
             "" if r.val_accuracy is None else f"{100 * float(r.val_accuracy):.1f}%", str(r.epochs), r.status,
             *[_cell(r.params.get(k)) for k in space_keys]] for i, r in enumerate(rows, 1)]
    widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + body]
    return "\n".join(lines)


def write_best_config(exp: Path, best: TrialRow, metric: str) -> Path:
    """The sweep's base config with the best trial's values, ready for ``pima train``."""
    from omegaconf import OmegaConf

    from pima_hpc.atomic import atomic_write_text

    values = {k: v for k, v in best.params.items() if v is not None}
    run_dir = format_value(str(exp / "best"))
    cfg = load_config(exp / "base_config.yaml", overrides_for(values) + [f"run_dir={run_dir}"])
    acc = "" if best.val_accuracy is None else f", val_accuracy {float(best.val_accuracy):.4f}"
    header = [f"# Best trial {best.trial_id} of the sweep in {exp}: {metric} {best.metric:.6g}{acc} "
              f"after {best.epochs} epoch(s).",
              *[f"#   {k} = {format_value(v)}" for k, v in values.items()],
              f"# Train it: pima train {exp / 'best_config.yaml'}"]
    path = exp / "best_config.yaml"
    atomic_write_text(path, "\n".join(header) + "\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path


def finish_sweep(rows: list[TrialRow], spec: TuneSpec, exp: Path) -> SweepResult:
    keys = list(spec.space)
    csv_path = exp / "results.csv"
    write_results_csv(rows, csv_path, spec.metric, keys)
    print(format_table(rows, spec.metric, keys))
    print(f"results: {csv_path}")
    for r in rows:
        if r.status == "error":
            log.warning("trial %s failed: %s (see %s)", r.trial_id, r.error, exp / r.trial_id / "error.txt")
    best = rows[0] if rows and not math.isnan(rows[0].metric) else None
    if best is None:
        first = next((r for r in rows if r.error), None)
        detail = f"; first error ({first.trial_id}): {first.error}" if first else ""
        raise TuneError(f"no trial of the sweep in {str(exp)!r} reported {spec.metric}{detail}")
    best_path = write_best_config(exp, best, spec.metric)
    acc = "" if best.val_accuracy is None else f", val_accuracy {100 * float(best.val_accuracy):.1f}%"
    print(f"best trial {best.trial_id}: {spec.metric} {best.metric:.6g}{acc}, {best.epochs} epoch(s); "
          + " ".join(f"{k}={format_value(v)}" for k, v in best.params.items()))
    print(f"best config: {best_path}  (train it: pima train {best_path})")
    if any(r.status == "interrupted" for r in rows) or len(rows) < spec.num_samples:
        print(f"the sweep did not finish; continue it with: pima tune {spec.source} name={exp.name} "
              f"storage_path={exp.parent} --resume")
    return SweepResult(exp, rows, best, csv_path, best_path)
