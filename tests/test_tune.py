"""`pima tune`: tune-file validation (no Ray started) and small real sweeps on the embedded digits.

The sweeps run `python -m pima_hpc tune` in a subprocess with a local Ray instance, exactly as a
user does: one with ASHA and 2-worker DDP trials (Ray Train's TorchTrainer inside each Tune trial),
its --resume, and one with one-worker trials on a plain training config (slurm/tune.sh's default).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pima_hpc.cli import main
from pima_hpc.config import load_config
from pima_hpc.tune import TrialRow, format_table, format_value, load_tune_spec, rank_rows, write_results_csv

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"

GOOD = {
    "base": str(DIGITS),
    "overrides": ["train.epochs=2", "crossmodal.epochs=0", "train.batch_size=128"],
    "space": {"train.lr": {"loguniform": [1.0e-3, 5.0e-3]},
              "model.latent_dim": {"choice": [2, 3]},
              "loss.expert_weight": {"uniform": [0.5, 1.5]}},
    "num_samples": 3,
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "search_seed": 0,
    "workers_per_trial": 2,
    "cpus_per_worker": 0.5,
}


def tune_file(path: Path, **changes) -> Path:
    """GOOD with top-level keys replaced (or, with value None, removed), written as YAML."""
    data = {**GOOD, **changes}
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False))
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_pima(*args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a local Ray instance
    proc = subprocess.run([sys.executable, "-m", "pima_hpc", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# The tune file, validated before Ray starts


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("--resume", "--address", "--num-cpus", "num_samples=16"):
        assert word in out


def test_good_file_parses(tmp_path):
    spec = load_tune_spec(tune_file(tmp_path / "t.yaml"), ["num_samples=5", "scheduler.grace_period=2",
                                                            "train.batch_size=64"])
    assert spec.num_samples == 5 and spec.scheduler.grace_period == 2 and spec.scheduler.reduction_factor == 2
    assert spec.epochs == 2 and spec.workers_per_trial == 2 and spec.cpus_per_worker == 0.5
    assert spec.overrides[-1] == "train.batch_size=64"
    assert spec.space["train.lr"].kind == "loguniform" and spec.space["model.latent_dim"].args == [2, 3]
    assert spec.name is None and spec.storage_path == (Path.cwd() / "runs" / "tune").resolve()


def test_scheduler_short_forms_and_command_line_types(tmp_path, capsys):
    """`scheduler: fifo` in the file and `scheduler=fifo` on the command line name the type; a
    tune key of the wrong type on the command line is one line naming the key."""
    spec = load_tune_spec(write(tmp_path / "t.yaml", "base: %s\nscheduler: fifo\nspace: {train.lr: {uniform: "
                                "[0.001, 0.002]}}\n" % (Path.cwd() / "configs/digits.yaml")))
    assert (spec.scheduler.type, spec.scheduler.grace_period) == ("fifo", 1)
    spec = load_tune_spec(tune_file(tmp_path / "u.yaml"), ["scheduler=fifo"])
    assert spec.scheduler.type == "fifo"
    assert main(["tune", str(tune_file(tmp_path / "v.yaml")), "num_samples=many"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tune key 'num_samples'" in err and "'many'" in err, err


def test_base_is_found_next_to_the_tune_file(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 3}\n")
    text = "base: base.yaml\nspace: {train.lr: {uniform: [0.001, 0.002]}}\n"
    spec = load_tune_spec(write(tmp_path / "t.yaml", text))
    assert spec.base == (tmp_path / "base.yaml").resolve() and spec.epochs == 3


def test_a_training_config_sweeps_the_default_space():
    spec = load_tune_spec(DIGITS, ["train.epochs=1", "num_samples=2"])
    assert spec.base == DIGITS.resolve() and spec.num_samples == 2 and spec.epochs == 1
    lr = load_config(DIGITS).train.lr
    assert spec.space["train.lr"].args == pytest.approx([lr / 3, lr * 3])


@pytest.mark.parametrize("value", [1e-05, 0.002, 3, True, "affine", [16, 32], 2.5e10])
def test_sampled_values_round_trip_through_load_config(value):
    key = {bool: "model.prior_expert", str: "model.expert", list: "model.image_channels",
           int: "model.latent_dim"}.get(type(value), "train.lr")
    cfg = load_config(None, [f"{key}={format_value(value)}"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_ranking_puts_trials_without_the_metric_last(tmp_path):
    rows = rank_rows([TrialRow("c", math.nan, None, 0, "error", {"train.lr": 0.1}, "boom"),
                      TrialRow("a", -5.0, 0.5, 2, "done", {"train.lr": 0.01}),
                      TrialRow("b", 3.0, None, 1, "stopped", {"train.lr": 0.001})])
    assert [r.trial_id for r in rows] == ["b", "a", "c"]
    write_results_csv(rows, tmp_path / "r.csv", "val_elbo", ["train.lr"])
    assert [(r["rank"], r["trial_id"], r["val_elbo"], r["train.lr"]) for r in read_rows(tmp_path / "r.csv")] == [
        ("1", "b", "3.0", "0.001"), ("2", "a", "-5.0", "0.01"), ("3", "c", "", "0.1")]
    table = format_table(rows, "val_elbo", ["train.lr"]).splitlines()
    assert table[0].split() == ["#", "trial", "val_elbo", "val_acc", "epochs", "status", "train.lr"]
    assert table[2].split() == ["2", "a", "-5", "50.0%", "2", "done", "0.01"]


BAD = [
    ("num_sample: 3\n", "unknown tune key 'num_sample'; did you mean 'num_samples'?"),
    ("train: {lr: 0.1}\n", "config settings go under overrides"),
    ("space: {train.lrr: {uniform: [0.001, 0.01]}}\n",
     "space key 'train.lrr' is not a config key; did you mean 'train.lr'?"),
    ("space: {train.lr: {loguniformm: [0.001, 0.01]}}\n",
     "unknown distribution 'loguniformm'; did you mean 'loguniform'?"),
    ("space: {train.lr: 0.01}\n", "space key 'train.lr' must be one distribution"),
    ("space: {train.lr: {loguniform: [0, 0.01]}}\n", "space key 'train.lr': loguniform needs 0 < low < high"),
    ("space: {train.lr: {uniform: [0.01, 0.001]}}\n", "space key 'train.lr': uniform needs low < high"),
    ("space: {train.lr: {uniform: [0.01]}}\n", "uniform takes [low, high]"),
    ("space: {model.latent_dim: {uniform: [2, 6]}}\n", "model.latent_dim is int; use randint or choice"),
    ("space: {model.expert: {randint: [1, 3]}}\n", "needs a numeric key"),
    ("space: {model.latent_dim: {choice: [0, 3]}}\n",
     "space key 'model.latent_dim' value 0 gives an invalid config: config key 'model.latent_dim': must be >= 1"),
    ("space: {model.expert: {choice: [affine, nosuch]}}\n", "value 'nosuch' gives an invalid config"),
    ("space: {train.epochs: {randint: [1, 3]}}\n",
     "space key 'train.epochs' cannot be swept: it is the trial budget"),
    ("space: {data.curve_noise: {uniform: [0.0, 0.1]}}\n", "cannot be swept: trials must see the same data"),
    ("space: {}\n", "space must map config keys to distributions"),
    ("metric: val_accuracy\n", "val_accuracy is only reported"),
    ("metric: val_elb\n", "metric must be one of ['val_elbo']"),
    ("scheduler: {type: ashaa}\n", "did you mean 'asha'?"),
    ("scheduler: {type: asha, grace: 1}\n", "unknown scheduler key 'grace'; did you mean 'grace_period'?"),
    ("scheduler: {type: asha, grace_period: 5}\n", "grace_period (5) exceeds train.epochs (2)"),
    ("scheduler: {reduction_factor: 1}\n", "reduction_factor must be > 1"),
    ("workers_per_trial: 0\n", "workers_per_trial must be an integer >= 1"),
    ("cpus_per_worker: 0\n", "cpus_per_worker must be > 0"),
    ("search: grid\n", "search must be one of ['random', 'optuna']"),
    ("mode: min\n", "mode must be 'max'"),
    ("name: ../x\n", "name must be a plain directory name"),
    ("overrides: [train.lrr=0.1]\n", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_tune_files_give_one_clear_line(tmp_path, capsys, change, message):
    path = tune_file(tmp_path / "t.yaml", **yaml.safe_load(change))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err


def test_missing_files_and_cli_arguments(tmp_path, capsys):
    assert main(["tune", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = tune_file(tmp_path / "t.yaml", base="no/such/base.yaml")
    assert main(["tune", str(path)]) == 2
    assert "base config 'no/such/base.yaml' not found" in capsys.readouterr().err
    path = tune_file(tmp_path / "t.yaml")
    assert main(["tune", str(path), "num_samples"]) == 2
    assert "must look like key=value" in capsys.readouterr().err
    assert main(["tune", str(path), "space.train.lr=0.1"]) == 2
    assert "cannot be set on the command line" in capsys.readouterr().err


def test_resume_without_a_sweep_says_so(tmp_path, capsys):
    pytest.importorskip("ray.tune")
    path = tune_file(tmp_path / "t.yaml", storage_path=str(tmp_path / "runs"))
    assert main(["tune", str(path), "--resume"]) == 2
    assert "no sweep of t.yaml to resume" in capsys.readouterr().err
    assert main(["tune", str(path), "name=gone", "--resume"]) == 2
    assert "no sweep to resume at" in capsys.readouterr().err


def test_optuna_missing_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("ray.tune")
    try:
        import optuna  # noqa: F401
        pytest.skip("optuna is installed")
    except ImportError:
        pass
    path = tune_file(tmp_path / "t.yaml", search="optuna")
    assert main(["tune", str(path)]) == 2
    assert "search: optuna needs the optuna package" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Real sweeps


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    pytest.importorskip("ray.tune")
    tmp = tmp_path_factory.mktemp("tune")
    path = tune_file(tmp / "tune_ddp.yaml", storage_path=str(tmp / "runs"), name="ddp")
    proc = run_pima("tune", str(path), "--num-cpus", "4")
    assert proc.returncode == 0, describe(proc)
    return path, tmp / "runs" / "ddp", proc


def test_ddp_sweep_ranks_trials_and_writes_the_best_config(sweep):
    _, exp, proc = sweep
    rows = read_rows(exp / "results.csv")
    assert len(rows) == 3, rows
    values = [float(r["val_elbo"]) for r in rows]
    assert all(math.isfinite(v) for v in values) and values == sorted(values, reverse=True)
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows)
    assert {r["status"] for r in rows} <= {"done", "stopped"} and rows[0]["status"] == "done"
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    # Every trial trained with 2 DDP workers, in its own directory.
    for r in rows:
        results = [json.loads(line) for line in (exp / r["trial_id"] / "result.json").read_text().splitlines()]
        assert results and all(res["world_size"] == 2 for res in results)
        assert (exp / r["trial_id"] / "run" / "config.yaml").is_file()
        trial_cfg = load_config(exp / r["trial_id"] / "run" / "config.yaml")
        assert trial_cfg.run_dir == str(exp / r["trial_id"] / "run") and trial_cfg.stages == ["multimodal"]

    best = load_config(exp / "best_config.yaml")
    top = rows[0]
    assert best.train.lr == pytest.approx(float(top["train.lr"]))
    assert best.model.latent_dim == int(top["model.latent_dim"])
    assert best.loss.expert_weight == pytest.approx(float(top["loss.expert_weight"]))
    assert float(top["val_elbo"]) == max(values)
    # The base config's settings and stages, ready for `pima train`.
    assert best.train.epochs == 2 and best.crossmodal.epochs == 0 and best.stages == ["multimodal", "crossmodal"]
    assert best.run_dir == str(exp / "best")
    assert f"best trial {top['trial_id']}" in proc.stdout
    assert "val_elbo" in proc.stdout and str(exp / "best_config.yaml") in proc.stdout


def test_a_finished_sweep_resumes_to_the_same_result(sweep, capsys):
    path, exp, _ = sweep
    before = read_rows(exp / "results.csv")
    assert main(["tune", str(path)]) == 2  # never silently mixes two sweeps in one directory
    assert "already exists: continue it with --resume" in capsys.readouterr().err
    proc = run_pima("tune", str(path), "--resume", "--num-cpus", "4")
    assert proc.returncode == 0, describe(proc)
    after = read_rows(exp / "results.csv")
    assert [(r["trial_id"], r["val_elbo"]) for r in after] == [(r["trial_id"], r["val_elbo"]) for r in before]
    assert f"best trial {before[0]['trial_id']}" in proc.stdout


def test_single_worker_sweep_of_a_training_config(tmp_path):
    pytest.importorskip("ray.tune")
    proc = run_pima("tune", "configs/digits.yaml", "num_samples=2", "scheduler=fifo", "train.epochs=1",
                    f"storage_path={tmp_path}", "name=plain", "--num-cpus", "2")
    assert proc.returncode == 0, describe(proc)
    rows = read_rows(tmp_path / "plain" / "results.csv")
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    assert set(rows[0]) >= {"train.lr", "loss.expert_weight", "loss.prior_weight"}
    assert load_config(tmp_path / "plain" / "best_config.yaml").train.epochs == 1
