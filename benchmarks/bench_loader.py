"""Data-layer benchmarks: storage choices, loader throughput against the training step, and the
peak memory of large lattice generation. Numbers and the exact commands: docs/benchmarks.md.

    python benchmarks/bench_loader.py compression   # size / write / read for codecs and chunk sizes
    python benchmarks/bench_loader.py loader        # loader samples/s per rank vs training-step samples/s
    python benchmarks/bench_loader.py memory --sizes 2000 10000 50000   # peak RSS of `pima data lattice`

Each section prints a Markdown table and, with ``--json FILE``, writes its raw numbers.
MNIST comes from ``--mnist-dir`` (default /work/shared/data/mnist); lattice data are generated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MNIST_DIR = "/work/shared/data/mnist"


def _table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def _lattice_arrays(n: int, size: int = 152, seed: int = 1):
    from pima_hpc.data.lattice import LatticeConfig, generate_specimen
    cfg = LatticeConfig(size=size, augment="none")
    sp = [generate_specimen(seed, i, cfg) for i in range(n)]
    return (np.concatenate([s["images"] for s in sp]), np.stack([s["curve"] for s in sp]),
            np.array([s["topology"] for s in sp]), cfg)


def _mnist_arrays(mnist_dir):
    from pima_hpc.data.mnist import load_mnist
    a, _ = load_mnist(mnist_dir)
    lab = a["train_labels"].astype(np.int64)
    t = np.linspace(0, 1, 20)
    curve = lab[:, None] * t + 0.01 * np.random.default_rng(0).standard_normal((len(lab), 20))
    return a["train_images"][:, None], curve, lab, t


def _write(path, images, curves, labels, t, label_names, compression, chunk_bytes):
    from pima_hpc.data.storage import ModalityLayout
    from pima_hpc.data.writer import DatasetWriter
    mods = [ModalityLayout("image", "image", images.shape[1:], storage="uint8"),
            ModalityLayout("curve", "curve", curves.shape[1:], t=t)]
    t0 = time.perf_counter()
    with DatasetWriter(path, mods, {"train": len(images)}, label_names=label_names, compression=compression,
                       chunk_bytes=chunk_bytes, overwrite=True) as w:
        for a in range(0, len(images), 4096):
            w.write("train", {"image": images[a:a + 4096], "curve": curves[a:a + 4096]}, labels[a:a + 4096])
    return time.perf_counter() - t0


def _read_rate(path, batch=128, max_batches=60, in_memory="no", rank=0, world=1, workers=0, seconds=8.0):
    """Samples/s of one rank reading shuffled batches (epoch 0), after one warm-up batch."""
    from pima_hpc.data.hdf5 import make_loader, open_split
    t_open = time.perf_counter()
    reader = open_split(path, "train", rank, world, in_memory=in_memory)
    t_open = time.perf_counter() - t_open
    loader = make_loader(reader, batch, epoch=0, seed=0, shuffle=True, num_workers=workers)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for i, b in enumerate(it):
        n += len(b["index"])
        if i + 1 >= max_batches or time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    del it
    return n / dt, t_open


def compression(args):
    from pima_hpc.data.layout import human_bytes
    tmp = Path(tempfile.mkdtemp(prefix="bench_codec_"))
    t0 = time.time()
    li, lc, ll, cfg = _lattice_arrays(args.lattice_n)
    print(f"generated {len(li)} lattice samples in {time.time() - t0:.1f} s", file=sys.stderr)
    mi, mc, ml, mt = _mnist_arrays(args.mnist_dir)
    data = {"mnist": (mi, mc, ml, mt, [str(d) for d in range(10)]),
            "lattice": (li, lc, ll, cfg.strain, ["gyroid", "octet"])}
    from pima_hpc.data.storage import CHUNK_BYTES
    codecs = {"auto": "auto", "none": None, "gzip-1": ("gzip", 1), "gzip-4": ("gzip", 4), "gzip-9": ("gzip", 9),
              "lzf": ("lzf", None)}
    rows = []
    for name, (im, cu, lab, t, names) in data.items():
        raw = im.nbytes + cu.size * 4 + lab.nbytes
        plan = [(c, CHUNK_BYTES) for c in codecs] + [(c, k) for c in ("none", "gzip-1")
                                                     for k in (1 << 14, 1 << 16, 1 << 20)]
        for codec, chunk in plan:
            path = tmp / f"{name}-{codec}-{chunk}.h5"
            wt = _write(path, im, cu, lab, t, names, codecs[codec], chunk)
            rate, _ = _read_rate(path, in_memory="no", seconds=args.seconds)
            rows.append({"data": name, "codec": codec, "chunk KiB": chunk >> 10, "size": human_bytes(path.stat().st_size),
                         "ratio": f"{raw / path.stat().st_size:.2f}", "write s": f"{wt:.1f}",
                         "stream read samples/s": f"{rate:,.0f}"})
            print(rows[-1], file=sys.stderr)
            path.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    print(_table(rows, list(rows[0])))
    return rows


def _step_rate(spec, batch, steps=4):
    """Samples/s of one PIMA training step (forward, ELBO, backward, Adam) at this batch."""
    import torch
    from pima_hpc.config import ModelConfig
    from pima_hpc.model.pima import PIMA, elbo_from_terms
    expert = "strain_hardening" if spec.attrs.get("name") == "lattice" else "affine"
    model = PIMA(spec, ModelConfig(latent_dim=2 if expert != "affine" else 3,
                                   n_clusters=2 if expert != "affine" else 10, expert=expert))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step():
        terms = model(batch, gen)
        loss = -elbo_from_terms(terms).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(batch["index"]) / (time.perf_counter() - t0)


def loader(args):
    import torch
    from pima_hpc.data.hdf5 import open_split
    from pima_hpc.data.lattice import LatticeConfig, build_lattice
    from pima_hpc.data.mnist import build_mnist
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    paths = {}
    paths["mnist"] = args.mnist or build_mnist(args.mnist_dir, tmp / "mnist.h5", "clean", progress=False)
    paths["lattice"] = args.lattice or build_lattice(tmp / "lattice", args.lattice_n, cfg=LatticeConfig(augment="none"),
                                                     shard_size=max(1, args.lattice_n // 4), progress=False)
    rows = []
    for name, path in paths.items():
        reader = open_split(path, "train", in_memory="yes")
        batch = reader.read_batch(reader.batch_index_lists(args.batch)[0])
        step = _step_rate(reader.spec, batch)
        print(f"{name}: training step {step:,.0f} samples/s at batch {args.batch}", file=sys.stderr)
        for world in (1, 2):
            for mem, workers in (("yes", 0), ("no", 0), ("no", 2)):
                rate, t_open = _read_rate(path, args.batch, in_memory=mem, world=world, workers=workers,
                                          seconds=args.seconds)
                rows.append({"data": name, "ranks": world, "in memory": mem, "workers": workers,
                             "open s": f"{t_open:.2f}", "loader samples/s (rank 0)": f"{rate:,.0f}",
                             "step samples/s": f"{step:,.0f}", "loader / step": f"{rate / step:,.0f}x"})
                print(rows[-1], file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
    print(_table(rows, list(rows[0])))
    return rows


def _rss_kib(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(args):
    """Peak RSS of `pima data lattice` (single process) at several sizes, sharded output."""
    from pima_hpc.data.layout import dataset_bytes, human_bytes
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench_mem_"))
    rows = []
    base = subprocess.Popen([sys.executable, "-c", "import pima_hpc.data.lattice, pima_hpc.cli"])
    _, _, ru = os.wait4(base.pid, 0)
    rows.append({"specimens": "0 (imports only)", "peak RSS": human_bytes(ru.ru_maxrss * 1024)})
    for n in args.sizes:
        out = tmp / f"lattice-{n}"
        cmd = [sys.executable, "-m", "pima_hpc", "data", "lattice", "--n", str(n), "--augment", "none",
               "--shard-size", str(args.shard_size), "--out", str(out), "--overwrite", "--quiet"]
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        samples = []
        while p.poll() is None:
            samples.append(_rss_kib(p.pid))
            time.sleep(0.5)
        _, status, ru = os.wait4(p.pid, 0) if p.returncode is None else (p.pid, 0, None)
        dt = time.time() - t0
        peak = ru.ru_maxrss if ru is not None else max(samples)
        q = [samples[int(f * (len(samples) - 1))] for f in (0.25, 0.5, 0.75)] if samples else [0, 0, 0]
        rows.append({"specimens": n, "peak RSS": human_bytes(peak * 1024),
                     "RSS at 25/50/75 %": " / ".join(human_bytes(v * 1024) for v in q),
                     "time s": f"{dt:.0f}", "ms/specimen": f"{1000 * dt / n:.1f}",
                     "output": human_bytes(dataset_bytes(out))})
        print(rows[-1], file=sys.stderr)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(_table(rows, ["specimens", "peak RSS", "RSS at 25/50/75 %", "time s", "ms/specimen", "output"]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=("compression", "loader", "memory"))
    p.add_argument("--mnist-dir", default=MNIST_DIR)
    p.add_argument("--mnist", default=None, help="loader: an existing MNIST dataset instead of building one")
    p.add_argument("--lattice", default=None, help="loader: an existing lattice dataset instead of generating one")
    p.add_argument("--lattice-n", type=int, default=2000, help="lattice specimens to generate (augment none)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the training step")
    p.add_argument("--seconds", type=float, default=8.0, help="time budget per read measurement")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="memory: keep the generated datasets")
    p.add_argument("--json", default=None, help="also write the raw rows to this JSON file")
    args = p.parse_args(argv)
    rows = {"compression": compression, "loader": loader, "memory": memory}[args.section](args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
