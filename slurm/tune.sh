#!/usr/bin/env bash
# Ray Tune sweep across the allocation: a Ray head on the first node, a Ray worker on each
# other node (Ray's documented Slurm pattern: `ray start --block` under srun, one per node),
# then `pima tune CONFIG` from this script with RAY_ADDRESS pointing at the head.
#
#   cd /path/to/pima-hpc
#   sbatch slurm/tune.sh [key=value ...]                         # one node
#   sbatch -N 4 --gpus-per-node=4 --cpus-per-task=32 slurm/tune.sh
#
# PIMA_CONFIG (the tune file: configs/tune_lattice.yaml; docs/tune.md), PIMA_OVERRIDES
# ("key=value ..." for the tune file, e.g. "num_samples=48 name=sweep1"), PIMA_VENV (.venv),
# PIMA_RAY_PORT (6379), PIMA_RAY_WAIT (seconds to wait for the Ray nodes; 120),
# PIMA_RAY_AUTH (token: a fresh Ray auth token per job; or disabled), PIMA_GPUS_PER_NODE
# (default: what Slurm allocated). Arguments go to `pima tune` (key=value, --resume).
#SBATCH --job-name=pima-tune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail

PIMA_ROOT=${PIMA_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $PIMA_ROOT/slurm/lib/common.sh ]] ||
    { echo "error: $PIMA_ROOT/slurm/lib/common.sh not found: submit from the pima-hpc checkout or set PIMA_ROOT" >&2; exit 1; }
# shellcheck source=slurm/lib/common.sh
source "$PIMA_ROOT/slurm/lib/common.sh"

pima_setup
config=${PIMA_CONFIG:-configs/tune_lattice.yaml}
[[ -f $config ]] || pima_die "config '$config' not found (PIMA_CONFIG; relative paths are from $PIMA_ROOT)"
command -v ray >/dev/null || pima_die "ray is not on PATH; install pima-hpc[tune] (make venv) or set PIMA_VENV"
port=${PIMA_RAY_PORT:-6379}
wait_s=${PIMA_RAY_WAIT:-120}
gpus=$(pima_gpus_per_node)
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
nnodes=${#PIMA_NODES[@]}

# Ray's token authentication, set explicitly and the same everywhere: left to itself, a head
# turns it on when ~/.ray/auth_token exists while a client may not, and then cannot connect.
# A fresh token per job travels in the environment (srun passes it to every node, and the
# trials inherit it), so no file needs to be shared. PIMA_RAY_AUTH=disabled opts out.
case ${PIMA_RAY_AUTH:-token} in
    token)
        export RAY_AUTH_MODE=token
        RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
        export RAY_AUTH_TOKEN
        unset RAY_AUTH_TOKEN_PATH
        ;;
    disabled) export RAY_AUTH_MODE=disabled ;;
    *) pima_die "PIMA_RAY_AUTH must be 'token' or 'disabled', got '$PIMA_RAY_AUTH'" ;;
esac

# The head's address as the other nodes reach it (the first one if it has several).
head_ip=$(srun --nodes=1 --ntasks=1 -w "$PIMA_HEAD" hostname --ip-address)
head_ip=${head_ip%% *}
export RAY_ADDRESS=$head_ip:$port

ray_steps=()
# shellcheck disable=SC2329  # called by the EXIT trap
stop_ray() {
    ((${#ray_steps[@]} > 0)) && pima_log "stopping the Ray cluster (srun reports its steps as killed)"
    # srun passes SIGTERM to every process of the Ray steps; `ray start --block` then stops
    # the node's Ray processes.
    if ((${#ray_steps[@]} > 0)); then
        kill -TERM "${ray_steps[@]}" 2>/dev/null || true
        wait "${ray_steps[@]}" 2>/dev/null || true
    fi
}
trap stop_ray EXIT

pima_log "starting the Ray head on $PIMA_HEAD ($RAY_ADDRESS, $cpus CPUs, $gpus GPUs)"
srun --nodes=1 --ntasks=1 -w "$PIMA_HEAD" --cpus-per-task="$cpus" \
    ray start --head --node-ip-address="$head_ip" --port="$port" \
    --num-cpus="$cpus" --num-gpus="$gpus" --include-dashboard=false --disable-usage-stats --block &
ray_steps+=($!)

# Bounded wait for the head (Ray's guide sleeps a fixed time; polling fails faster and clearer).
deadline=$((SECONDS + wait_s))
status_out=""
until status_out=$(ray status --address="$RAY_ADDRESS" 2>&1); do
    kill -0 "${ray_steps[0]}" 2>/dev/null || pima_die "the Ray head on $PIMA_HEAD exited during start-up (its output is above)"
    if ((SECONDS >= deadline)); then
        printf '%s\n' "$status_out" | tail -n 20 >&2
        pima_die "the Ray head at $RAY_ADDRESS did not answer within ${wait_s}s (PIMA_RAY_WAIT); 'ray status' said the above"
    fi
    sleep 2
done

for node in "${PIMA_NODES[@]:1}"; do
    pima_log "starting a Ray worker on $node"
    srun --nodes=1 --ntasks=1 -w "$node" --cpus-per-task="$cpus" \
        ray start --address="$RAY_ADDRESS" --num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats --block &
    ray_steps+=($!)
done

# Wait until every node has joined, so the sweep sees the whole allocation from the start.
alive=0
while :; do
    alive=$(python3 -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null || echo 0)
    ((alive >= nnodes)) && break
    ((SECONDS < deadline)) || pima_die "only $alive of $nnodes Ray nodes joined within ${wait_s}s (PIMA_RAY_WAIT); see the srun output above"
    sleep 2
done
pima_log "Ray cluster up: $alive node(s)"

overrides=()
read -r -a overrides <<<"${PIMA_OVERRIDES:-}"
pima_log "pima tune $config ${overrides[*]} $*"
rc=0
python3 -m pima_hpc tune "$config" "${overrides[@]}" "$@" || rc=$?
pima_log "done (exit status $rc)"
exit "$rc"
