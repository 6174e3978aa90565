"""Several nodes for real: Linux network namespaces give each simulated node its own address on a
bridge (tools/ci/netns_up.sh), and the launchers run across them as across hosts: torchrun with a
c10d rendezvous on 2 nodes x 1 process. The runs must equal one node's.

Needs root and iproute2; CI (.ci/run) sets PIMA_REQUIRE_NETNS=1 so these tests fail instead of
skipping. The namespaces are created for this module and always removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pima_hpc.collective import Collective

sys.path.insert(0, str(Path(__file__).parent))
from test_collectives import TORCHRUN, WORKERS, clean_env, fail_message, free_port  # noqa: E402
from test_distributed_training import STATS_WORKER, check_distributed_statistics  # noqa: E402

sys.path.insert(0, str(WORKERS))
import em_stats_worker as stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NODES = 2
TIMEOUT = 180


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if not TORCHRUN.exists():
        return f"torchrun not installed beside {sys.executable}"
    return None


@pytest.fixture(scope="module")
def nodes():
    reason = _skip_reason()
    if reason:
        if os.environ.get("PIMA_REQUIRE_NETNS") == "1":
            pytest.fail(f"PIMA_REQUIRE_NETNS=1 but {reason}")
        pytest.skip(reason)
    up = subprocess.run([REPO / "tools/ci/netns_up.sh", str(NODES)], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield [f"10.77.0.{i + 1}" for i in range(NODES)]
    finally:
        subprocess.run([REPO / "tools/ci/netns_down.sh"], capture_output=True)


def run_on_nodes(addresses: list[str], args: list, tmp_path: Path, timeout: float = TIMEOUT):
    """One torchrun agent per node (its own namespace and address), a c10d rendezvous on node 0."""
    port = free_port()
    env = clean_env()
    env["GLOO_SOCKET_IFNAME"] = "eth0"  # the node's own interface, not the shared hostname's address
    procs = []
    for i, addr in enumerate(addresses):
        cmd = ["ip", "netns", "exec", f"pima-node{i}", TORCHRUN, f"--nnodes={len(addresses)}", "--nproc_per_node=1",
               f"--node_rank={i}", "--rdzv_backend=c10d", f"--rdzv_endpoint={addresses[0]}:{port}",
               "--rdzv_id=pima-multinode", f"--local_addr={addr}", "--max_restarts=0",
               # node 0 hosts the store: torchrun would decide by the hostname, which every namespace shares
               f"--rdzv_conf=is_host={int(i == 0)}", *args]
        log = open(tmp_path / f"node{i}.log", "w")
        procs.append((subprocess.Popen([str(c) for c in cmd], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=REPO, start_new_session=True), log))
    end = time.monotonic() + timeout
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=max(end - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
        log.close()
    for p, _ in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
    logs = "\n".join(f"--- node{i}\n" + (tmp_path / f"node{i}.log").read_text()[-3000:] for i in range(len(procs)))
    return codes, logs


def test_em_and_experts_across_two_nodes_equal_one_process(nodes, tmp_path):
    codes, logs = run_on_nodes(nodes, [STATS_WORKER, "--out", tmp_path], tmp_path)
    assert codes == [0, 0], logs
    check_distributed_statistics(tmp_path, stats.closed_form(Collective()), "TorchCollective", "torchrun")


def test_training_across_two_nodes_equals_two_ranks_on_one_node(nodes, tmp_path):
    """The CLI on 2 nodes x 1 process: bitwise the metrics of 2 ranks on one node (same global
    batches, same rank order of every sum), rank 0 alone writing the run directory."""
    train = ["-m", "pima_hpc", "train", REPO / "configs/digits.yaml", "train.epochs=2", "crossmodal.epochs=1",
             "train.progress=false", "figures=false", "logging.tensorboard=false"]
    codes, logs = run_on_nodes(nodes, [*train, f"run_dir={tmp_path / 'multi'}"], tmp_path)
    assert codes == [0, 0], logs
    single = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *map(str, train),
                             f"run_dir={tmp_path / 'one'}"], env=clean_env(), cwd=REPO, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert single.returncode == 0, fail_message(single)

    def untimed(path):
        m = json.loads((path / "metrics.json").read_text())
        m.pop("wall_seconds_this_process")
        for h in m["history"]:
            h.pop("seconds")
        return m

    multi, one = untimed(tmp_path / "multi"), untimed(tmp_path / "one")
    assert multi["world_size"] == 2
    assert multi == one
    assert multi["multimodal"]["test"]["accuracy"] >= 0.5
    np.testing.assert_allclose(sorted(multi["experts"]["curve"]["slope"]), np.arange(10), atol=0.05)
