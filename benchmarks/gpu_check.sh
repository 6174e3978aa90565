#!/usr/bin/env bash
# The GPU check in one command (issue 13 item 4): writes ONE JSON file with the environment (GPU,
# torch/CUDA/NCCL, driver), the CUDA paths (digits on 1 process and on 2 processes of one GPU, and
# their agreement), bf16/tf32 against fp32, and time to 99 % / samples/s on multimodal MNIST.
# What each step does and how it is judged: the docstring of benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--idx-dir DIR] [gpu_check.py options]
#   bash benchmarks/gpu_check.sh --device cpu --quick          # the same steps on CPU, tiny (70-80 s here)
#   bash benchmarks/gpu_check.sh --prepare                     # HERE, before lending a GPU machine (below)
#
# Exit status 0 when no step failed, 1 when one did (every step is still run and recorded), 2 when
# the interpreter has no torch at all. The whole check stays under --budget-s (default 540 s).
#
# Interpreter. The project's `make venv` installs the CPU torch wheel, which is wrong on a GPU
# machine, so this script never builds a venv: it runs the repository from PYTHONPATH with an
# interpreter that already has torch, `python -m pima_hpc` standing for the `pima` command.
#   --device cpu: .venv/bin/python when present (make venv), else python3.
#   otherwise   : python3 (on the lent machines: /opt/torch/.venv/bin/python3, Python 3.12 with a
#                 CUDA torch, 2.11.0+cu130 when last seen), or $PYTHON when set.
#
# Packages on the lent GPU machines (/work/.library/device/KINDS.md, "Python packages already
# there", read 2026-11-17): torch, numpy, scipy, h5py, scikit-learn, matplotlib, tqdm, PyYAML and
# tensorboard are there; omegaconf is NOT (python-hostlist neither, but only Slurm host lists
# import it). omegaconf 2.4.0 is one pure-Python wheel (it vendors antlr4, needs only PyYAML), so
# it must be carried:
#
#   here (with the registry):  bash benchmarks/gpu_check.sh --prepare
#       downloads .whl/omegaconf-2.4.0-py3-none-any.whl (pip download --only-binary, Python 3.12),
#       adds /.whl/ to .git/info/exclude, and copies the four MNIST IDX files from
#       ../shared/data/mnist (or $PIMA_MNIST_DIR) to data/mnist-idx/ (git-ignored, 11 MB);
#   device tool:  run(command="bash benchmarks/gpu_check.sh --out $OUT/gpu_check.json",
#                     carry=[".whl", "data/mnist-idx"], timeout_s=600)
#
# This script installs every .whl/*.whl with `pip install --no-index --no-deps --target
# /tmp/pima-gpu-check-site` when the interpreter lacks omegaconf or another required module, and
# puts that folder on PYTHONPATH. Without the wheel every pima step fails with
# "ModuleNotFoundError: No module named 'omegaconf'" and the JSON says so.
#
# Not yet verified on a GPU: no device machine was lent to the task that wrote this script; only
# the --device cpu --quick mode has been run (tests/test_gpu_check.py runs it too).
set -u
# Relative paths in the options (--out, --idx-dir, ...) are the caller's; the runs start in the repository.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2

device=cuda
prepare=0
prev=
for a in "$@"; do
    [ "$prev" = "--device" ] && device=$a
    case $a in --device=*) device=${a#--device=} ;; --prepare) prepare=1 ;; esac
    prev=$a
done

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ "$device" = cpu ] && [ -x "$REPO/.venv/bin/python" ]; then
    PY=$REPO/.venv/bin/python
else
    PY=$(command -v python3 || command -v python)
fi

if [ "$prepare" = 1 ]; then
    set -e
    cd "$REPO"
    OMEGACONF_VERSION=${OMEGACONF_VERSION:-2.4.0}
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "omegaconf==$OMEGACONF_VERSION"
    if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
        mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude
    fi
    src=${PIMA_MNIST_DIR:-$REPO/../shared/data/mnist}
    if [ -f "$src/train-images-idx3-ubyte.gz" ]; then
        mkdir -p data/mnist-idx
        cp -f "$src"/train-images-idx3-ubyte.gz "$src"/train-labels-idx1-ubyte.gz \
           "$src"/t10k-images-idx3-ubyte.gz "$src"/t10k-labels-idx1-ubyte.gz data/mnist-idx/
        echo "copied the MNIST IDX files from $src to data/mnist-idx/"
    else
        echo "no MNIST IDX files at $src (set PIMA_MNIST_DIR): the check will record '$(
            echo 'mnist: skipped (no --idx-dir)')'"
    fi
    ls -l .whl
    echo 'now: run(command="bash benchmarks/gpu_check.sh --out $OUT/gpu_check.json", carry=[".whl", "data/mnist-idx"])'
    exit 0
fi

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch; set PYTHON=/path/to/python (with torch) and run again" >&2
    exit 2
fi

setup="interpreter $PY; repository on PYTHONPATH"
need='import numpy, scipy, h5py, omegaconf, yaml, sklearn, matplotlib, tqdm'
if ! PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "$need" 2>/dev/null; then
    if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        site=/tmp/pima-gpu-check-site
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
                "$REPO"/.whl/*.whl; then
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
            setup="$setup; installed $(cd "$REPO/.whl" && echo *.whl) into $site"
        else
            setup="$setup; installing .whl/*.whl FAILED"
        fi
    else
        setup="$setup; required modules missing and no .whl/ carried (see benchmarks/gpu_check.sh)"
    fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PIMA_GPU_CHECK_SETUP="$setup"
echo "gpu_check: $setup" >&2
exec "$PY" "$REPO/benchmarks/gpu_check.py" "$@"
