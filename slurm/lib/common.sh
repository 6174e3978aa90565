# shellcheck shell=bash
# Shared by the slurm/*.sh batch scripts; sourced, never run. It finds the checkout and its
# virtual environment, expands the allocation's node list, and launches the trainer on every
# node with signal forwarding and requeue-on-checkpoint. See docs/slurm.md.
#
# Inside a job Slurm runs a *copy* of the batch script from its spool directory, so the
# scripts locate the checkout through $PIMA_ROOT, else $SLURM_SUBMIT_DIR (submit from the
# repository root), and source this file from there.

# Exit status with which `pima train` says "I checkpointed after SIGUSR1/SIGTERM: requeue me"
# (EX_TEMPFAIL from sysexits.h).
readonly PIMA_EXIT_REQUEUE=75

pima_log() { printf '[%s] %s: %s\n' "$(date +%H:%M:%S)" "${SLURM_JOB_NAME:-pima}" "$*" >&2; }
pima_die() {
    pima_log "error: $*"
    exit 1
}

# pima_setup: cd to the checkout, put the virtual environment first on PATH, check that the
# package imports, and set PIMA_NODES (array) and PIMA_HEAD (first node of the allocation).
pima_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || pima_die "not inside a Slurm job: submit this script with sbatch"
    cd "${PIMA_ROOT:?the batch script sets PIMA_ROOT before sourcing common.sh}" || pima_die "cannot cd to PIMA_ROOT=$PIMA_ROOT"

    local venv=${PIMA_VENV:-$PIMA_ROOT/.venv}
    if [[ -x $venv/bin/python ]]; then
        # What `activate` does, minus the prompt handling that needs an interactive shell.
        export VIRTUAL_ENV=$venv
        export PATH=$venv/bin:$PATH
    elif [[ -n ${PIMA_VENV:-} ]]; then
        pima_die "PIMA_VENV=$PIMA_VENV has no bin/python; create it with 'make venv' in $PIMA_ROOT or point PIMA_VENV at a virtual environment"
    else
        pima_log "no virtual environment at $venv (set PIMA_VENV); using $(command -v python3 || echo 'no python3')"
    fi
    command -v python3 >/dev/null || pima_die "python3 not found on PATH on $(hostname -s)"
    local err
    if ! err=$(python3 -c 'import pima_hpc' 2>&1); then
        pima_die "python3 ($(command -v python3)) cannot import pima_hpc (${err##*$'\n'}); run 'make venv' in $PIMA_ROOT or set PIMA_VENV"
    fi

    local name
    for name in PIMA_NPROC PIMA_GPUS_PER_NODE PIMA_NODE_CPUS PIMA_RDZV_PORT PIMA_MAX_REQUEUES; do
        [[ -z ${!name:-} || ${!name} =~ ^[0-9]+$ ]] || pima_die "$name must be a whole number, got '${!name}'"
    done
    [[ ${PIMA_NPROC:-1} != 0 ]] || pima_die "PIMA_NPROC must be at least 1"

    mapfile -t PIMA_NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
    ((${#PIMA_NODES[@]} > 0)) || pima_die "could not expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
    PIMA_HEAD=${PIMA_NODES[0]}
}

# pima_gpus_per_node: GPUs this job has on each node (PIMA_GPUS_PER_NODE overrides Slurm).
pima_gpus_per_node() {
    if [[ -n ${PIMA_GPUS_PER_NODE:-} ]]; then
        echo "$PIMA_GPUS_PER_NODE"
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != -1 ]]; then
        local -a ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    else
        echo 0
    fi
}

# pima_rdzv_port: a TCP port derived from the job id, so jobs sharing a node do not collide;
# in [20000, 30000), below Linux's ephemeral ports. PIMA_RDZV_PORT overrides it.
pima_rdzv_port() { echo "${PIMA_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"; }

# pima_launch_command ARGS...: set the array PIMA_CMD to the command that starts
# `python -m pima_hpc ARGS...` on every rank of the allocation, per PIMA_LAUNCH.
pima_launch_command() {
    local mode=${PIMA_LAUNCH:-torchrun}
    local nnodes=${SLURM_NNODES:-1}
    local gpus nproc
    gpus=$(pima_gpus_per_node)
    # CPUs of one node's share of the allocation (a step must not ask for more).
    local node_cpus=${PIMA_NODE_CPUS:-${SLURM_CPUS_ON_NODE:-1}}
    local -a srun_extra=()
    read -r -a srun_extra <<<"${PIMA_SRUN_ARGS:-}"
    case $mode in
        torchrun)
            # One torchrun agent per node; it starts nproc workers there. GPU nodes: one per
            # GPU; CPU-only nodes: PIMA_NPROC or 1.
            nproc=${PIMA_NPROC:-}
            if [[ -z $nproc ]]; then
                if ((gpus > 0)); then nproc=$gpus; else nproc=1; fi
            fi
            local port
            port=$(pima_rdzv_port)
            # Slurm signals every process of a step (the agent and its workers). The workers
            # checkpoint on the first SIGUSR1/SIGTERM; the agent must not relay a second one
            # (the trainer treats a second signal as "exit now"), so it ignores both: bash's
            # `trap ''` is inherited through exec, and torchrun installs handlers only for its
            # --signals-to-handle, whose default (which has SIGTERM) PET_SIGNALS_TO_HANDLE
            # replaces. (torchrun releases without that option handle SIGTERM regardless.)
            export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
            export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((node_cpus / nproc > 0 ? node_cpus / nproc : 1))}
            PIMA_CMD=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1
                --cpus-per-task="$node_cpus" "${srun_extra[@]}"
                bash -c 'trap "" USR1 TERM; exec "$@"' pima-torchrun
                torchrun --nnodes="$nnodes" --nproc_per_node="$nproc" --max_restarts=0
                --rdzv_backend=c10d --rdzv_endpoint="$PIMA_HEAD:$port" --rdzv_id="$SLURM_JOB_ID"
                -m pima_hpc "$@")
            PIMA_LAUNCH_DESC="srun torchrun: $nnodes node(s) x $nproc worker(s), rendezvous $PIMA_HEAD:$port"
            ;;
        srun)
            # One Slurm task per rank: --ntasks / --ntasks-per-node of the job, or PIMA_NPROC
            # ranks per node. The trainer reads SLURM_PROCID & co.; MASTER_* name the rendezvous.
            local ntasks=${SLURM_NTASKS:-$nnodes} per_node_args=()
            if [[ -n ${PIMA_NPROC:-} ]]; then
                ntasks=$((nnodes * PIMA_NPROC))
                per_node_args=(--ntasks-per-node="$PIMA_NPROC")
            fi
            local cpus_per_rank=${SLURM_CPUS_PER_TASK:-1}
            if [[ -n ${PIMA_NPROC:-} ]]; then
                cpus_per_rank=$((node_cpus / PIMA_NPROC > 0 ? node_cpus / PIMA_NPROC : 1))
            fi
            export MASTER_ADDR=${MASTER_ADDR:-$PIMA_HEAD}
            MASTER_PORT=${MASTER_PORT:-$(pima_rdzv_port)}
            export MASTER_PORT
            export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_rank}
            PIMA_CMD=(srun --nodes="$nnodes" --ntasks="$ntasks" "${per_node_args[@]}"
                --cpus-per-task="$cpus_per_rank" "${srun_extra[@]}"
                python3 -m pima_hpc "$@")
            PIMA_LAUNCH_DESC="srun: $ntasks rank(s) on $nnodes node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
            ;;
        mpi)
            # mpiexec (MPICH's Hydra from the venv, or the site's MPI) starts SLURM_NTASKS ranks;
            # under Slurm it launches its per-node proxies with srun by itself. The proxies'
            # step gets the node's CPUs (srun does not inherit --cpus-per-task since 22.05).
            local ntasks=${SLURM_NTASKS:-$nnodes}
            [[ -n ${PIMA_NPROC:-} ]] && ntasks=$((nnodes * PIMA_NPROC))
            command -v "${PIMA_MPIEXEC:-mpiexec}" >/dev/null ||
                pima_die "PIMA_LAUNCH=mpi but ${PIMA_MPIEXEC:-mpiexec} is not on PATH; install pima-hpc[mpi] or set PIMA_MPIEXEC"
            export SRUN_CPUS_PER_TASK=$node_cpus
            local -a mpi_extra=()
            read -r -a mpi_extra <<<"${PIMA_MPIEXEC_ARGS:-}"
            export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((node_cpus * nnodes / ntasks > 0 ? node_cpus * nnodes / ntasks : 1))}
            PIMA_CMD=("${PIMA_MPIEXEC:-mpiexec}" -n "$ntasks" "${mpi_extra[@]}"
                python3 -m pima_hpc "$@")
            PIMA_LAUNCH_DESC="mpiexec: $ntasks rank(s) on $nnodes node(s)"
            ;;
        *)
            pima_die "PIMA_LAUNCH=$mode is not one of: torchrun (default), srun, mpi"
            ;;
    esac
}

# _pima_forward SIG: the batch shell got SIG (--signal=B:USR1@120, `scancel --batch --signal`,
# or Slurm's SIGTERM when it ends the job); pass it on to the running launcher.
_pima_forward() {
    local sig=$1
    pima_log "received SIG$sig; forwarding it to the trainer (pid ${_PIMA_CHILD:-none})"
    _PIMA_SIGNALS+=" $sig"
    if [[ -n ${_PIMA_CHILD:-} ]]; then
        kill -s "$sig" "$_PIMA_CHILD" 2>/dev/null || true
    fi
}

# pima_run_requeueable CMD...: run CMD in the background with USR1/TERM forwarded to it, wait,
# and requeue the job if CMD stopped to be resumed. Returns CMD's exit status (0 if requeued).
#
# Requeue when CMD exits 75, or fails after a forwarded SIGUSR1 (torchrun reports its workers'
# 75 as a plain failure). Never after a SIGTERM: Slurm sends that when the job is cancelled,
# out of time or preempted, and `scontrol requeue` would then undo a user's scancel (it
# succeeds on a job that is being cancelled). Time limits are covered by the SIGUSR1 that
# --signal=B:USR1@120 sends before the SIGTERM.
pima_run_requeueable() {
    _PIMA_SIGNALS=""
    _PIMA_CHILD=""
    trap '_pima_forward USR1' USR1
    trap '_pima_forward TERM' TERM
    "$@" &
    _PIMA_CHILD=$!
    # `wait` returns early (status > 128) when a trapped signal arrives; wait again until the
    # launcher is gone. Bash keeps the status of a reaped child, so the last wait returns it.
    while kill -0 "$_PIMA_CHILD" 2>/dev/null; do
        wait "$_PIMA_CHILD" 2>/dev/null || true
    done
    local rc=0
    wait "$_PIMA_CHILD" || rc=$?
    trap - USR1 TERM

    ((rc == 0)) && return 0
    if [[ $_PIMA_SIGNALS == *TERM* ]]; then
        pima_log "trainer stopped after SIGTERM (exit $rc): the job is ending (scancel, time limit, preemption or a node failure), so this script does not requeue it (Slurm itself requeues a --requeue job after a node failure); its last checkpoint is in ${PIMA_RUN_DIR_USED:-the run directory}: resubmit with PIMA_RUN_DIR set to it to resume"
        return "$rc"
    fi
    if ((rc != PIMA_EXIT_REQUEUE)) && [[ $_PIMA_SIGNALS != *USR1* ]]; then
        pima_log "trainer failed with exit status $rc"
        return "$rc"
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} max=${PIMA_MAX_REQUEUES:-20}
    if ((restarts >= max)); then
        pima_log "trainer stopped to be resumed (exit $rc) but the requeue limit is reached ($restarts restarts, PIMA_MAX_REQUEUES=$max); not requeueing"
        return "$rc"
    fi
    pima_log "trainer stopped to be resumed (exit $rc, signals:${_PIMA_SIGNALS:- none}); requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    if scontrol requeue "$SLURM_JOB_ID"; then
        # Slurm now ends this run of the script; the next one resumes from the run directory.
        return 0
    fi
    pima_log "scontrol requeue $SLURM_JOB_ID failed; the checkpoint is in ${PIMA_RUN_DIR_USED:-the run directory}: resubmit with PIMA_RUN_DIR set to it to resume"
    return "$rc"
}

# pima_train_job DEFAULT_CONFIG [key=value ...]: the body of slurm/train_*.sh.
pima_train_job() {
    local default_config=$1
    shift
    pima_setup
    local config=${PIMA_CONFIG:-$default_config}
    [[ -f $config ]] || pima_die "config '$config' not found (PIMA_CONFIG; relative paths are from $PIMA_ROOT)"
    # One run directory per job id: a requeued job (same id) resumes from its checkpoint.
    local run_dir=${PIMA_RUN_DIR:-runs/${SLURM_JOB_NAME:-pima}-$SLURM_JOB_ID}
    PIMA_RUN_DIR_USED=$run_dir
    local -a overrides=()
    read -r -a overrides <<<"${PIMA_OVERRIDES:-}"
    local -a args=(train "$config" "run_dir=$run_dir")
    if [[ -n ${PIMA_DATA:-} ]]; then
        [[ -e $PIMA_DATA ]] || pima_die "PIMA_DATA=$PIMA_DATA does not exist; build it first: sbatch slurm/build_data.sh"
        args+=(data.source=hdf5 "data.path=$PIMA_DATA")
    fi
    args+=("${overrides[@]}" "$@")

    pima_launch_command "${args[@]}"
    pima_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${PIMA_NODES[*]}; $PIMA_LAUNCH_DESC"
    pima_log "run directory: $run_dir"
    pima_log "command: ${PIMA_CMD[*]}"
    local rc=0
    pima_run_requeueable "${PIMA_CMD[@]}" || rc=$?
    pima_log "done (exit status $rc)"
    return "$rc"
}
