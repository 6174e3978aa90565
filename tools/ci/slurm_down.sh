#!/usr/bin/env bash
# Stop the Slurm cluster started by tools/ci/slurm_up.sh (one node or several), by its pid files.
#
#   tools/ci/slurm_down.sh [--quiet]      (PIMA_SLURM_DIR as for slurm_up.sh)
#
# slurmd goes first (it ends running job steps), then slurmctld, then munged. Each gets
# SIGTERM, then SIGKILL after a grace period. Job state and logs stay in the state directory.
set -euo pipefail

quiet=0
[[ ${1:-} == --quiet ]] && quiet=1
log() { ((quiet)) || echo "slurm_down: $*" >&2; }

STATE_DIR=${PIMA_SLURM_DIR:-/tmp/pima-slurm}
RUN_DIR=$STATE_DIR/run
GRACE_S=${PIMA_SLURM_STOP_GRACE:-15}

stop() { # stop NAME [PIDFILE]: SIGTERM the pid in PIDFILE (RUN_DIR/NAME.pid), wait, SIGKILL if still there
    local name=$1 pidfile=${2:-$RUN_DIR/$1.pid} pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ ! $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$pidfile"
        return 0
    fi
    # Guard against a recycled pid: only signal a process that is the daemon we started.
    if [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) != "$name"* ]]; then
        log "pid $pid in $pidfile is $(</proc/"$pid"/comm), not $name; leaving it alone"
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((GRACE_S * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for ${GRACE_S}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

[[ -d $RUN_DIR ]] || { log "nothing to stop in $STATE_DIR"; exit 0; }
for f in "$RUN_DIR"/slurmd.pid "$RUN_DIR"/slurmd-*.pid; do # one, or one per simulated node
    [[ -e $f ]] && stop slurmd "$f"
done
stop slurmctld
stop munged
log "stopped (state and logs kept in $STATE_DIR)"
