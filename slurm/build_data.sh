#!/usr/bin/env bash
# Build a data set as a batch job: `pima data ARGS...` on one node.
#
#   cd /path/to/pima-hpc
#   sbatch slurm/build_data.sh lattice --out data/lattice.h5
#   sbatch slurm/build_data.sh mnist --out data/mnist.h5      (see `pima data mnist --help`)
#   jid=$(sbatch --parsable slurm/build_data.sh lattice --out data/lattice.h5)
#   PIMA_DATA=data/lattice.h5 sbatch --dependency=afterok:$jid slurm/train_lattice.sh
#
# The arguments are those of `pima data` (see `pima data --help`); PIMA_DATA_ARGS is used
# when there are none. Partition, account and time: sbatch flags or SBATCH_* variables;
# PIMA_VENV as for the training scripts.
#SBATCH --job-name=pima-data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail

PIMA_ROOT=${PIMA_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $PIMA_ROOT/slurm/lib/common.sh ]] ||
    { echo "error: $PIMA_ROOT/slurm/lib/common.sh not found: submit from the pima-hpc checkout or set PIMA_ROOT" >&2; exit 1; }
# shellcheck source=slurm/lib/common.sh
source "$PIMA_ROOT/slurm/lib/common.sh"

args=("$@")
if ((${#args[@]} == 0)); then
    read -r -a args <<<"${PIMA_DATA_ARGS:-}"
fi
((${#args[@]} > 0)) ||
    pima_die "no data set named; usage: sbatch slurm/build_data.sh lattice|mnist --out PATH [options] (or set PIMA_DATA_ARGS)"

pima_setup
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
pima_log "job $SLURM_JOB_ID on ${PIMA_NODES[*]}: pima data ${args[*]}"
rc=0
python3 -m pima_hpc data "${args[@]}" || rc=$?
pima_log "done (exit status $rc)"
exit "$rc"
