"""Distributed training gives the single-process answer: the EM and expert closed forms exactly,
the DDP training steps up to rounding, and the CLI under torchrun and mpiexec end to end.

Workers live in tests/dist_workers/: em_stats_worker.py (statistics, M-steps, expert solves),
train_equivalence_worker.py (the Trainer on a small digits slice) and audit/sitecustomize.py
(records which process writes under the run directory). Every launch runs in its own session with
a timeout (tests/test_collectives.py's ``launch``), so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from pima_hpc.collective import Collective

sys.path.insert(0, str(Path(__file__).parent))
from test_collectives import (MPIEXEC, TORCHRUN, WORKERS, clean_env, fail_message, launch,  # noqa: E402
                              needs_mpi, needs_torchrun)

sys.path.insert(0, str(WORKERS))
import em_stats_worker as stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STATS_WORKER = WORKERS / "em_stats_worker.py"
TRAIN_WORKER = WORKERS / "train_equivalence_worker.py"
AUDIT = WORKERS / "audit"


# ----------------------------------------------------------------------------------------------- EM and experts

@pytest.fixture(scope="module")
def single_process():
    return stats.closed_form(Collective())


def scipy_reference() -> dict[str, np.ndarray]:
    """Every closed form re-derived on the pooled data as a least-squares problem on sqrt(gamma)-weighted rows."""
    d = stats.synthetic_data()
    w = np.sqrt(d["gamma"])
    ref = {"weights": d["gamma"].sum(0) / len(d["gamma"])}
    # Means: min_m sum_d gamma_cd ||mu_d - m||^2, one column of ones per cluster.
    ref["means"] = np.stack([scipy.linalg.lstsq(w[:, c, None], w[:, c, None] * d["mu"])[0][0]
                             for c in range(stats.C)])
    # Variances: the two-pass pooled form (no S2 / S0 - mean^2 cancellation).
    ref["variances"] = np.stack([(d["gamma"][:, c, None] * (d["var"] + (d["mu"] - ref["means"][c]) ** 2)).sum(0)
                                 / d["gamma"][:, c].sum() for c in range(stats.C)])
    # Affine expert theta_c t: stacked rows sqrt(gamma_cd) t_n against sqrt(gamma_cd) x_dn.
    t, x = stats.T, d["affine"]
    ref["theta_affine"] = np.stack([
        scipy.linalg.lstsq((w[:, c, None] * t).reshape(-1, 1), (w[:, c, None] * x).ravel())[0]
        for c in range(stats.C)])
    return ref


def hardening_fit(c: int):
    """scipy's bounded nonlinear least squares for cluster c of the strain-hardening expert, best of
    several starts (the yield point makes the problem non-convex: single starts can stop in a kink)."""
    from pima_hpc.model.experts import build_expert

    d = stats.synthetic_data()
    expert = build_expert("strain_hardening", stats.T)
    w, x = np.sqrt(d["gamma"][:, c])[:, None], d["strain_hardening"]

    def residuals(theta):
        return (w * (x - expert.evaluate(theta[None])[0])).ravel()

    lo, hi = expert.eps_bounds
    fits = [scipy.optimize.least_squares(residuals, [100.0, e0, 10.0], bounds=([0, lo, 0], [np.inf, hi, np.inf]),
                                         x_scale=[100.0, 0.01, 10.0], xtol=1e-15, ftol=1e-15, gtol=1e-15)
            for e0 in np.linspace(lo, hi, 9)]
    return min(fits, key=lambda f: f.cost), residuals


def test_single_process_closed_forms_match_scipy(single_process):
    ref = scipy_reference()
    for key in ("weights", "means", "variances", "theta_affine"):
        np.testing.assert_allclose(single_process[key], ref[key], rtol=1e-12, atol=0, err_msg=key)
    for c in range(stats.C):
        fit, residuals = hardening_fit(c)
        ours = single_process["theta_strain_hardening"][c]
        # Both are optima of the same weighted SSE: equal objective to 1e-12, ours never worse.
        sse_ours, sse_scipy = (residuals(ours) ** 2).sum(), (residuals(fit.x) ** 2).sum()
        assert sse_ours <= sse_scipy * (1 + 1e-12), (c, sse_ours, sse_scipy)
        # The SSE is flat at the optimum, so parameters agree to about sqrt(solver tolerance): the
        # yield-point search stops at 1e-10 * eps_max, and a flat direction (small H against eps_y) moves
        # a little more. Measured worst: 1.1e-6 relative (H of the plateau-like cluster).
        np.testing.assert_allclose(ours, fit.x, rtol=1e-5, atol=0, err_msg=f"cluster {c}")


def test_free_amplitude_solve_is_the_profiled_least_squares_optimum(single_process):
    """The scale-free strain-hardening shape against scipy on the per-sample profiled residuals."""
    from pima_hpc.model.experts import build_expert

    d = stats.synthetic_data()
    expert = build_expert("strain_hardening", stats.T, "free")
    x = d["strain_hardening_free"]
    lo, hi = expert.eps_bounds
    for c in range(stats.C):
        w = np.sqrt(d["gamma"][:, c])[:, None]

        def residuals(theta):  # theta = (eps_y, H/E): the shape; each sample's amplitude profiled out
            m = expert.evaluate(np.array([[1.0, theta[0], theta[1]]]))[0]
            a = x @ m / (m @ m)
            return (w * (x - a[:, None] * m)).ravel()

        fits = [scipy.optimize.least_squares(residuals, [e0, 0.05], bounds=([lo, 0.0], [hi, np.inf]),
                                             xtol=1e-15, ftol=1e-15, gtol=1e-15) for e0 in np.linspace(lo, hi, 9)]
        best = min(fits, key=lambda f: f.cost)
        ours = single_process["theta_strain_hardening_free"][c]
        sse_ours = (residuals([ours[1], ours[2] / ours[0]]) ** 2).sum()
        assert sse_ours <= (best.fun ** 2).sum() * (1 + 1e-12), c
        np.testing.assert_allclose([ours[1], ours[2] / ours[0]], best.x, rtol=1e-5, atol=1e-9)


def check_distributed_statistics(out: Path, single: dict, collective: str, launcher: str) -> None:
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(i["rank"], i["world_size"], i["collective"], i["launcher"]) for i in infos] == \
        [(r, 2, collective, launcher) for r in range(2)]
    ranks = [np.load(out / f"rank{r}.npz") for r in range(2)]
    for key in single:
        # The exact collective adds the ranks' sums in rank order: bitwise the same on every rank.
        assert ranks[0][key].tobytes() == ranks[1][key].tobytes(), key
        # Against one process the sums only group the same terms differently (ERRATA 6): the
        # statistics differ by ~4e-16 relative, the M-steps and every expert solve by as little (the
        # strain-hardening yield point is closed form per grid interval, so no search tolerance
        # enters; the free-amplitude shape is a top eigenvector of the reduced M2).
        np.testing.assert_allclose(ranks[0][key], single[key], rtol=1e-12, atol=0, err_msg=key)
    assert float(ranks[0]["count"]) == stats.N  # uneven blocks (151 + 150) add up to every sample once
    from pima_hpc.model.experts import build_expert
    expert = build_expert("strain_hardening", stats.T)
    s0, s1 = single["s0_strain_hardening"], single["s1_strain_hardening"]
    for c in range(stats.C):  # weighted SSE up to a constant: S0 ||S1/S0 - E(theta)||^2
        sse = [s0[c] * ((s1[c] / s0[c] - expert.evaluate(th[c][None])[0]) ** 2).sum()
               for th in (ranks[0]["theta_strain_hardening"], single["theta_strain_hardening"])]
        np.testing.assert_allclose(sse[0], sse[1], rtol=1e-12, atol=0)


@needs_torchrun
def test_em_and_experts_under_torchrun(tmp_path, single_process):
    proc, _ = launch([TORCHRUN, "--standalone", "--nproc_per_node=2", STATS_WORKER, "--out", tmp_path])
    assert proc.returncode == 0, fail_message(proc)
    check_distributed_statistics(tmp_path, single_process, "TorchCollective", "torchrun")


@needs_mpi
def test_em_and_experts_under_mpiexec(tmp_path, single_process):
    proc, _ = launch([MPIEXEC, "-n", 2, sys.executable, STATS_WORKER, "--out", tmp_path])
    assert proc.returncode == 0, fail_message(proc)
    check_distributed_statistics(tmp_path, single_process, "MPICollective", "mpirun")


# ----------------------------------------------------------------------------------------------- training steps

def _max_relative(a, b) -> tuple[float, str]:
    """Largest |a - b| over each tensor, relative to the tensor's largest magnitude, and its name."""
    return max((np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30), k) for k in b.files)


def _elbo_history(path: Path) -> np.ndarray:
    # ELBO terms only: accuracies jump by 1/64 when a single sample flips, which says nothing about rounding.
    hist = json.loads(path.read_text())["history"]
    return np.array([[h[k] for k in sorted(h) if "elbo" in k or k.startswith("train_")] for h in hist])


@needs_torchrun
def test_two_ranks_train_like_one_rank_with_the_same_global_batch(tmp_path):
    """2 epochs of 3 steps (global batch 32) with expert initialisation, EM, GMM M-step and checkpoints.

    How the global batches, the noise and BatchNorm are made comparable is explained in
    tests/dist_workers/train_equivalence_worker.py: per-rank BatchNorm (the CPU case; torch's
    SyncBatchNorm is CUDA-only) is compared with one process whose BatchNorm normalises each half
    of the batch separately ("ghost"), and plain full-batch BatchNorm is the control.

    Tolerances. In float64 the two runs differ only in the order of additions: DDP's gradient
    average (g_0 + g_1) / 2 against one backward over the whole batch, and the EM statistics summed
    per rank then across ranks. That is ~1e-16 relative per operation; Adam divides each gradient
    by its own RMS, which turns the rounding of gradients that are nearly zero (conv biases feeding
    ELU + BatchNorm) into relatively larger step differences, measured up to 2e-8 relative to a
    tensor's largest entry after 6 steps. 1e-6 bounds that with margin, while the control differs
    by O(0.1). In float32 the same rounding is ~1e-7 and Adam turns it into O(lr) steps on those
    entries (measured 1e-2 relative on one bias tensor), so float32 parameters are no sharper than
    the control; there we compare the per-epoch ELBO terms instead (measured 3e-5 relative, control
    4e-3): rtol 5e-4.
    """
    one, launch_one = launch([sys.executable, TRAIN_WORKER, "--out", tmp_path, "--tag", "one", "--batch-size", 32,
                              "--bn", "ghost", "plain", "--dtype", "float64", "float32"])
    assert one.returncode == 0, fail_message(one)
    two, launch_two = launch([TORCHRUN, "--standalone", "--nproc_per_node=2", TRAIN_WORKER, "--out", tmp_path,
                              "--tag", "two", "--batch-size", 16, "--dtype", "float64", "float32"])
    assert two.returncode == 0, fail_message(two)

    for dtype in ("float64", "float32"):
        ghost, plain, rank0, rank1 = (np.load(tmp_path / f"{tag}-{dtype}-rank{r}.npz") for tag, r in
                                      (("one-ghost", 0), ("one-plain", 0), ("two-ddp", 0), ("two-ddp", 1)))
        assert json.loads((tmp_path / f"two-ddp-{dtype}-rank0.json").read_text())["world_size"] == 2
        # DDP's averaged gradients, the exact EM sums and the end-of-epoch BatchNorm sync leave
        # every rank with bitwise the same model.
        for k in rank0.files:
            assert rank0[k].tobytes() == rank1[k].tobytes(), (dtype, k)
        control, _ = _max_relative(plain, ghost)
        hist = {tag: _elbo_history(tmp_path / f"{tag}-{dtype}-rank0.json") for tag in ("one-ghost", "one-plain",
                                                                                       "two-ddp")}
        scale = np.maximum(np.abs(hist["one-ghost"]), 1e-3)  # some terms are exactly 0 (entropy_c)
        hist_err = np.max(np.abs(hist["two-ddp"] - hist["one-ghost"]) / scale)
        hist_control = np.max(np.abs(hist["one-plain"] - hist["one-ghost"]) / scale)
        if dtype == "float64":
            err, name = _max_relative(rank0, ghost)
            assert err < 1e-6, (name, err)
            assert control > 1e-3, control  # the comparison can tell per-rank from global BatchNorm
            assert hist_err < 1e-8, hist_err
        else:
            assert hist_err < 5e-4, hist_err
            assert hist_control > 1e-3, hist_control


@needs_torchrun
def test_two_ranks_pretrain_initialisation_equals_one_rank(tmp_path):
    """train.init=pretrain on 2 ranks: the per-step calibrated variances come from the global batch (one
    allreduce), the gradients are DDP's average and the mixture is fitted to the rank-gathered means, so the
    pre-training losses, noise levels, mixture and the first epoch trained from them equal one process with
    the same global batches (float64; per-rank BatchNorm emulated by the ghost BatchNorm, as above). The images
    are moved at random (train.augment=affine), one draw per sample of the split, so the moves do not
    depend on which rank reads a sample."""
    over = ["--", "train.init=pretrain", "train.pretrain_epochs=2", "model.image_noise=learned",
            "train.augment=affine"]
    one, _ = launch([sys.executable, TRAIN_WORKER, "--out", tmp_path, "--tag", "one", "--batch-size", 32,
                     "--bn", "ghost", "--dtype", "float64", *over])
    assert one.returncode == 0, fail_message(one)
    two, _ = launch([TORCHRUN, "--standalone", "--nproc_per_node=2", TRAIN_WORKER, "--out", tmp_path,
                     "--tag", "two", "--batch-size", 16, "--dtype", "float64", *over])
    assert two.returncode == 0, fail_message(two)
    init = {tag: json.loads((tmp_path / f"{tag}-float64-rank0.json").read_text())["init"]
            for tag in ("one-ghost", "two-ddp")}
    assert init["two-ddp"]["method"] == "pretrain" and len(init["two-ddp"]["pretrain_losses"]) == 2
    np.testing.assert_allclose(init["two-ddp"]["pretrain_losses"], init["one-ghost"]["pretrain_losses"], rtol=1e-10)
    for name, std in init["one-ghost"]["pretrain_noise_std"].items():
        assert init["two-ddp"]["pretrain_noise_std"][name] == pytest.approx(std, rel=1e-8), name
    assert init["two-ddp"]["gmm_mean_log_likelihood"] == pytest.approx(init["one-ghost"]["gmm_mean_log_likelihood"],
                                                                       rel=1e-8)
    # the first epoch trained from that initialisation (the second drifts by ~1e-3, not yet explained)
    first = [json.loads((tmp_path / f"{tag}-float64-rank0.json").read_text())["history"][0]
             for tag in ("one-ghost", "two-ddp")]
    for key in ("train_elbo", "train_recon", "train_expert", "train_prior_z"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-6), key


def two_ranks_against_one(tmp_path: Path, args: list) -> np.ndarray:
    """The worker on one process (ghost BatchNorm) and on 2 ranks with the same global batches and ``args``:
    every rank ends bitwise the same, 2 ranks where one process ends (float64 weights to 1e-6, the ELBO
    history to 1e-8). Returns the one-process final state."""
    one, _ = launch([sys.executable, TRAIN_WORKER, "--out", tmp_path, "--tag", "one", "--batch-size", 32,
                     "--bn", "ghost", *args])
    assert one.returncode == 0, fail_message(one)
    two, _ = launch([TORCHRUN, "--standalone", "--nproc_per_node=2", TRAIN_WORKER, "--out", tmp_path,
                     "--tag", "two", "--batch-size", 16, *args])
    assert two.returncode == 0, fail_message(two)
    ghost, rank0, rank1 = (np.load(tmp_path / f"{tag}-float64-rank{r}.npz") for tag, r in
                           (("one-ghost", 0), ("two-ddp", 0), ("two-ddp", 1)))
    for k in rank0.files:
        assert rank0[k].tobytes() == rank1[k].tobytes(), k
    err, name = _max_relative(rank0, ghost)
    assert err < 1e-6, (name, err)
    hist = {tag: _elbo_history(tmp_path / f"{tag}-float64-rank0.json") for tag in ("one-ghost", "two-ddp")}
    scale = np.maximum(np.abs(hist["one-ghost"]), 1e-3)
    assert np.max(np.abs(hist["two-ddp"] - hist["one-ghost"]) / scale) < 1e-8
    return ghost


@needs_torchrun
def test_two_ranks_streaming_statistics_equal_one_rank(tmp_path):
    """train.statistics=streaming: latent sums and the experts' information gathered inside the DDP
    steps, summed through the collective every 2 steps and at the epoch's end, leave 2 ranks where one
    process with the same global batches ends (float64, ghost BatchNorm as above)."""
    two_ranks_against_one(tmp_path, ["--", "train.statistics=streaming", "train.rls_sync_steps=2"])


@needs_torchrun
@pytest.mark.parametrize("statistics", ["exact", "streaming"])
def test_two_ranks_on_per_sample_grids_equal_one_rank(tmp_path, statistics):
    """Curves on per-sample grids (each its own points and length): the experts' information from the exact
    pass, or from the training steps synced every 2 steps, summed through the collective, leaves 2 ranks where
    one process with the same global batches ends (float64, ghost BatchNorm as above)."""
    ghost = two_ranks_against_one(tmp_path, ["--per-sample-grids", "--", f"train.statistics={statistics}",
                                             "train.rls_sync_steps=2"])
    # the experts were fitted to the measured points (slope 2 c there, c in the encoder's view)
    assert np.abs(np.sort(ghost["theta_curve"][:, 0]) - 2.0 * np.arange(10)).max() < 0.5


# ----------------------------------------------------------------------------------------------- the CLI

def run_cli(launcher_cmd: list, tmp_path: Path):
    """``<launcher> ... -m pima_hpc train configs/digits.yaml ...`` as typed, with writes audited."""
    run_dir, audit = tmp_path / "run", tmp_path / "audit"
    audit.mkdir()
    env = clean_env()
    env.update(PYTHONPATH=os.pathsep.join([str(AUDIT)] + [p for p in [env.get("PYTHONPATH")] if p]),
               PIMA_AUDIT_DIR=str(audit), PIMA_AUDIT_ROOT=str(run_dir))
    proc, _ = launch([*launcher_cmd, "-m", "pima_hpc", "train", REPO / "configs" / "digits.yaml", "train.epochs=2",
                      "crossmodal.epochs=1", f"run_dir={run_dir}", "train.progress=false"], env=env)
    return proc, run_dir, audit


def check_cli_run(proc, run_dir: Path, audit: Path) -> None:
    assert proc.returncode == 0, fail_message(proc)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 2 epochs of 10 steps at a global batch of 2 x 64: measured 64% (1 rank at batch 128: 67%).
    # Chance is 10%; eq 19 on the clean curve is exact once the experts are solved.
    assert metrics["multimodal"]["test"]["accuracy"] >= 0.5
    assert metrics["bayes_curve"]["test"]["accuracy"] >= 0.99
    np.testing.assert_allclose(sorted(metrics["experts"]["curve"]["slope"]), np.arange(10), atol=0.05)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "figures" / "latent.png").is_file()
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["latest"].startswith("ckpt-done")
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone prints the summary

    reports = [json.loads(p.read_text()) for p in audit.glob("writes-*.json")]
    by_rank = {r["rank"]: r["writes"] for r in reports}
    assert {0, 1} <= set(by_rank), [r["argv"] for r in reports]
    assert by_rank[1] == [], by_rank[1][:10]
    assert not [w for r in reports if r["rank"] is None for w in r["writes"]]  # nor the launcher
    written = {path for _, path in by_rank[0]}
    assert {"config.yaml", "metrics.json", "checkpoints/latest.json", "figures/latent.png"} <= written


@needs_torchrun
def test_cli_under_torchrun(tmp_path):
    check_cli_run(*run_cli([TORCHRUN, "--standalone", "--nproc_per_node=2"], tmp_path))


@needs_mpi
def test_cli_under_mpiexec(tmp_path):
    check_cli_run(*run_cli([MPIEXEC, "-n", 2, sys.executable], tmp_path))


def test_sync_batchnorm_on_cpu_is_a_config_error(tmp_path):
    """torch's SyncBatchNorm raises on CPU tensors only at the first step; refuse it up front instead."""
    from pima_hpc.config import ConfigError, load_config
    from pima_hpc.runtime import Context
    from pima_hpc.train.trainer import Trainer

    cfg = load_config("configs/digits.yaml", [f"run_dir={tmp_path}", "train.sync_batchnorm=true"])
    Trainer(cfg)  # one process: nothing to synchronise, accepted
    with pytest.raises(ConfigError, match="train.sync_batchnorm.*CUDA"):
        Trainer(cfg, Context(world_size=2))
