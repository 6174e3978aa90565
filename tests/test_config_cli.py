"""Config validation and CLI errors: one clear line, exit 2, nothing written."""

import subprocess
import sys

import pytest

from pima_hpc.config import ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config("configs/digits.yaml", ["train.epochs=3", "model.latent_dim=2"])
    assert cfg.train.epochs == 3 and cfg.model.latent_dim == 2 and cfg.data.source == "digits"


@pytest.mark.parametrize("override, message", [
    ("train.epocs=3", "unknown config key 'train.epocs'; did you mean 'train.epochs'?"),
    ("train.epochs=many", "train.epochs"),
    ("train.lr=-1", "config key 'train.lr': must be > 0"),
    ("model.expert=quadratic", "config key 'model.expert': must be one of"),
    ("data.source=hdf5", "data.path"),
    ("trainepochs", "must look like key=value"),
])
def test_bad_config_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/digits.yaml", [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cli_reports_one_line_and_exits_2(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pima_hpc", "train", "configs/digits.yaml", "train.bach_size=3",
                           f"run_dir={run}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "pima: error: unknown config key 'train.bach_size'; did you mean 'train.batch_size'?")
    assert "Traceback" not in proc.stderr
    assert not run.exists()


def test_overrides_may_follow_options():
    from pima_hpc.cli import parse

    args = parse(["tune", "sweep.yaml", "--resume", "name=x", "trials=2"])
    assert args.resume and args.config == "sweep.yaml" and args.overrides == ["name=x", "trials=2"]
    assert parse(["train", "c.yaml", "a=1", "b=2"]).overrides == ["a=1", "b=2"]
    for argv in (["show", "runs/x", "a=1"], ["train", "c.yaml", "--epochs=3"]):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 2


def test_every_user_error_has_one_base_that_the_cli_turns_into_one_line(tmp_path, capsys):
    from pima_hpc import errors
    from pima_hpc.cli import main
    from pima_hpc.tune import TuneError
    for name in ("ConfigError", "DataError", "CheckpointError", "ResumeError", "NonFiniteError",
                 "DistributedSetupError"):
        assert issubclass(getattr(errors, name), errors.UserError), name
    assert issubclass(TuneError, errors.UserError)
    # a data error and a config error, each through the one catch in pima_hpc.cli
    assert main(["data", "info", str(tmp_path / "missing.h5")]) == 2
    assert main(["train", "model.n_clusters=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("pima: error: ") for line in err), err
    assert "model.n_clusters" in err[1]
