#!/usr/bin/env bash
# Train PIMA on the MNIST data set (configs/mnist.yaml) on one node or many.
#
#   cd /path/to/pima-hpc                      # submit from the checkout: logs and runs go here
#   sbatch slurm/build_data.sh mnist --out data/mnist.h5
#   PIMA_DATA=data/mnist.h5 sbatch slurm/train_mnist.sh [key=value ...]
#   sbatch -N 4 --gpus-per-node=4 --cpus-per-task=32 -p gpu -A myproject slurm/train_mnist.sh
#
# Site-specific values come from sbatch flags or SBATCH_* variables (SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_TIMELIMIT, SBATCH_GPUS_PER_NODE, ...); the launch from PIMA_*:
#   PIMA_CONFIG (configs/mnist.yaml)    PIMA_RUN_DIR (runs/<job name>-<job id>)
#   PIMA_DATA (an HDF5 file or shard directory: sets data.source=hdf5 data.path=...)
#   PIMA_OVERRIDES ("key=value key=value")  PIMA_VENV (.venv)  PIMA_LAUNCH (torchrun|srun|mpi)
#   PIMA_NPROC (workers per node; default: GPUs per node, or 1)  PIMA_MAX_REQUEUES (20)
# Arguments after the script name are more key=value overrides. docs/slurm.md has the rest.
#
# 120 s before the time limit Slurm sends SIGUSR1 to this script, which passes it on; the
# trainer checkpoints and exits 75, and the job requeues itself and resumes (same job id,
# same run directory).
#SBATCH --job-name=pima-mnist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail

PIMA_ROOT=${PIMA_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $PIMA_ROOT/slurm/lib/common.sh ]] ||
    { echo "error: $PIMA_ROOT/slurm/lib/common.sh not found: submit from the pima-hpc checkout or set PIMA_ROOT" >&2; exit 1; }
# shellcheck source=slurm/lib/common.sh
source "$PIMA_ROOT/slurm/lib/common.sh"

pima_train_job configs/mnist.yaml "$@"
