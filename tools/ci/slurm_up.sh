#!/usr/bin/env bash
# Bring up a real Slurm cluster (munged + slurmctld + slurmd) without systemd: one node (this
# host), or PIMA_SLURM_NODES=N simulated nodes, one slurmd in each network namespace pima-nodeI
# made by tools/ci/netns_up.sh N (its own address 10.77.0.I+1 and hostname; slurmctld runs here
# and is reached at the bridge address 10.77.0.254).
#
# Everything lives in one state directory ($PIMA_SLURM_DIR, default /tmp/pima-slurm): the
# slurm.conf, a private munge key and socket, pid files, logs and spool/state dirs. The
# daemons run in the background and are stopped by tools/ci/slurm_down.sh (by pid file).
# The script is idempotent: if the cluster in that directory is already up and answering,
# it only re-checks it. On success it writes $PIMA_SLURM_DIR/env.sh, which clients source:
#
#     tools/ci/slurm_up.sh && . /tmp/pima-slurm/env.sh && sinfo
#
# Environment (all optional):
#   PIMA_SLURM_DIR           state directory                          [/tmp/pima-slurm]
#   PIMA_SLURMCTLD_PORT      slurmctld port (non-default on purpose)  [16817]
#   PIMA_SLURMD_PORT         slurmd port                              [16818]
#   PIMA_SLURM_PARTITION     name of the single (default) partition   [debug]
#   PIMA_SLURM_NODES         1: this host; N > 1: the simulated nodes pima-node0..N-1  [1]
#   PIMA_SLURM_CPUS          CPUs of each node        [getconf _NPROCESSORS_ONLN]
#   PIMA_SLURM_WAIT          seconds to wait for the node to be idle  [90]
#   PIMA_SLURMD_TIMEOUT      seconds without an answer before slurmctld sets a node DOWN
#                            (and requeues its jobs: NODE_FAIL)                        [60]
#   PIMA_SLURM_CRED_EXPIRE   step credential lifetime; also how long a requeued job waits
#                            before it may start again (Slurm's default is 120)  [30]
#   PIMA_SLURM_NO_INSTALL=1  never call apt-get (fail if the packages are missing)
set -euo pipefail

die() {
    echo "slurm_up: error: $*" >&2
    exit 1
}
log() { echo "slurm_up: $*" >&2; }

STATE_DIR=${PIMA_SLURM_DIR:-/tmp/pima-slurm}
CTLD_PORT=${PIMA_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${PIMA_SLURMD_PORT:-16818}
PARTITION=${PIMA_SLURM_PARTITION:-debug}
WAIT_S=${PIMA_SLURM_WAIT:-90}
CRED_EXPIRE=${PIMA_SLURM_CRED_EXPIRE:-30}
SLURMD_TIMEOUT=${PIMA_SLURMD_TIMEOUT:-60}
NODE=$(hostname -s)
NODES=${PIMA_SLURM_NODES:-1}
CPUS=${PIMA_SLURM_CPUS:-$(getconf _NPROCESSORS_ONLN)}

case $STATE_DIR in
    /*) ;;
    *) STATE_DIR=$PWD/$STATE_DIR ;;
esac
for v in CTLD_PORT SLURMD_PORT WAIT_S CRED_EXPIRE SLURMD_TIMEOUT CPUS NODES; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a positive integer, got '${!v}'"
done

((NODES >= 1)) || die "PIMA_SLURM_NODES must be at least 1, got $NODES"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The compute nodes: name, address, and the slurmd's pid file name (RUN_DIR/<that>.pid).
if ((NODES == 1)); then
    NODE_NAMES=("$NODE") NODE_ADDRS=(127.0.0.1) SLURMD_PIDS=(slurmd)
    CTLD_HOST=$NODE NODE_LIST=$NODE
else
    NODE_NAMES=() NODE_ADDRS=() SLURMD_PIDS=()
    for ((i = 0; i < NODES; i++)); do
        [[ -e /run/netns/pima-node$i ]] ||
            die "PIMA_SLURM_NODES=$NODES needs the simulated nodes: run tools/ci/netns_up.sh $NODES first (root)"
        NODE_NAMES+=("pima-node$i") NODE_ADDRS+=("10.77.0.$((i + 1))") SLURMD_PIDS+=("slurmd-pima-node$i")
    done
    # The nodes reach slurmctld over the bridge; clients on this host reach it there too.
    CTLD_HOST="$NODE(10.77.0.254)" NODE_LIST="pima-node[0-$((NODES - 1))]"
fi
CONF=$STATE_DIR/slurm.conf
MUNGE_DIR=$STATE_DIR/munge           # socket + pid + seed: mode 755 (clients must reach the socket)
MUNGE_KEY_DIR=$STATE_DIR/munge-key   # the key: mode 700
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
LOG_DIR=$STATE_DIR/log
RUN_DIR=$STATE_DIR/run
ENV_FILE=$STATE_DIR/env.sh

# --- 1. packages -------------------------------------------------------------------------
install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    ((${#missing[@]} == 0)) && return 0
    [[ ${PIMA_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]} (PIMA_SLURM_NO_INSTALL=1)"
    ((EUID == 0)) || die "missing packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
    command -v apt-get >/dev/null || die "missing packages: ${missing[*]} and no apt-get on this machine"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists when the packages are not installable from the cached ones.
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$STATE_DIR/apt.log" 2>&1; then
        log "apt-get install failed with the cached package lists; running apt-get update"
        apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 || { cat "$STATE_DIR/apt.log" >&2; die "apt-get update failed"; }
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$STATE_DIR/apt.log" 2>&1 ||
            { tail -n 30 "$STATE_DIR/apt.log" >&2; die "apt-get install ${missing[*]} failed (log: $STATE_DIR/apt.log)"; }
    fi
    # Without systemd the packages' own services are not started; ours below are separate
    # anyway (own munge socket, ports and state directory).
}

# --- helpers ---------------------------------------------------------------------------
pid_alive() { # pid_alive PIDFILE -> 0 when the pid in PIDFILE is a running process
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

node_state() { # the first node that is not ready, or the (shared) state of all
    local states s
    states=$(SLURM_CONF=$CONF sinfo -h -N -n "$NODE_LIST" -o '%t' 2>/dev/null) || return 0
    [[ $(wc -w <<<"$states") -eq $NODES ]] || { echo "${states:-}" | head -n 1; return 0; }
    for s in $states; do
        [[ $s =~ ^(idle|mix|alloc|comp) ]] || { echo "$s"; return 0; }
    done
    head -n 1 <<<"$states"
}

slurmds_alive() {
    local p
    for p in "${SLURMD_PIDS[@]}"; do pid_alive "$RUN_DIR/$p.pid" || return 1; done
}

port_in_use() { # port_in_use PORT -> 0 when something on this host accepts connections there
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

dump_logs() {
    local f
    for f in "$LOG_DIR"/munged.log "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd*.log; do
        [[ -f $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 40 "$f" >&2
    done
}

fail() { # fail MESSAGE: show the daemons' logs, stop what this run started, exit 1
    dump_logs
    "$(dirname "${BASH_SOURCE[0]}")/slurm_down.sh" --quiet || true
    die "$*"
}

write_env_file() {
    # Written last, atomically: its presence means "the cluster came up at least once".
    cat >"$ENV_FILE.tmp" <<EOF
# Source this to talk to the Slurm cluster ($NODE_LIST) started by tools/ci/slurm_up.sh.
export SLURM_CONF=$CONF
export PIMA_SLURM_DIR=$STATE_DIR
export PIMA_SLURM_PARTITION=$PARTITION
EOF
    mv -f "$ENV_FILE.tmp" "$ENV_FILE"
}

mkdir -p "$STATE_DIR"
install_packages

# --- 0. already up? ---------------------------------------------------------------------
if pid_alive "$RUN_DIR/munged.pid" && pid_alive "$RUN_DIR/slurmctld.pid" && slurmds_alive; then
    state=$(node_state || true)
    if [[ $state =~ ^(idle|mix|alloc|comp) ]]; then
        write_env_file
        log "already up in $STATE_DIR (nodes $NODE_LIST are $state)"
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    log "daemons are running but nodes $NODE_LIST are '${state:-unknown}'; restarting them"
fi
# Anything half-up from an earlier attempt goes first, so the pid files describe this run.
"$(dirname "${BASH_SOURCE[0]}")/slurm_down.sh" --quiet || true

# --- 2. directories, munge key, slurm.conf -------------------------------------------------
SLURM_USER=$(id -un)
if ((NODES == 1)); then
    SLURMD_SPOOL=$STATE_DIR/slurmd-spool SLURMD_PIDFILE=$RUN_DIR/slurmd.pid SLURMD_LOG=$LOG_DIR/slurmd.log
else # one of each per slurmd: Slurm expands %n to the node's name
    SLURMD_SPOOL=$STATE_DIR/slurmd-spool/%n SLURMD_PIDFILE=$RUN_DIR/slurmd-%n.pid SLURMD_LOG=$LOG_DIR/slurmd-%n.log
    for n in "${NODE_NAMES[@]}"; do mkdir -p "$STATE_DIR/slurmd-spool/$n"; done
fi
mkdir -p "$MUNGE_DIR" "$MUNGE_KEY_DIR" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld-state" "$STATE_DIR/slurmd-spool"
chmod 755 "$STATE_DIR" "$MUNGE_DIR"
chmod 700 "$MUNGE_KEY_DIR"
if [[ ! -s $MUNGE_KEY_DIR/munge.key ]]; then
    # A private key per cluster; 1024 random bytes is what mungekey(8) creates by default.
    (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY_DIR/munge.key.tmp")
    mv -f "$MUNGE_KEY_DIR/munge.key.tmp" "$MUNGE_KEY_DIR/munge.key"
fi
chmod 400 "$MUNGE_KEY_DIR/munge.key"

cat >"$CONF.tmp" <<EOF
# Generated by tools/ci/slurm_up.sh; regenerated on every start. $NODES node(s), no cgroups,
# no accounting, no systemd: just enough of a real cluster to run sbatch/srun/scontrol.
ClusterName=pima-ci
SlurmctldHost=$CTLD_HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$SLURM_USER
SlurmdUser=$SLURM_USER
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/ctld-state
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$SLURMD_PIDFILE
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to 'scontrol show job' (there is no sacct without accounting).
MinJobAge=3600
KillWait=30
InactiveLimit=0
Waittime=0
SlurmctldTimeout=60
SlurmdTimeout=$SLURMD_TIMEOUT
$(for ((i = 0; i < NODES; i++)); do echo "NodeName=${NODE_NAMES[i]} NodeAddr=${NODE_ADDRS[i]} CPUs=$CPUS State=UNKNOWN"; done)
PartitionName=$PARTITION Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
mv -f "$CONF.tmp" "$CONF"
export SLURM_CONF=$CONF

# --- 3. daemons --------------------------------------------------------------------------
for p in "$CTLD_PORT" "$SLURMD_PORT"; do
    port_in_use "$p" && die "port $p is already in use (another Slurm cluster?); stop it, or choose other ports with PIMA_SLURMCTLD_PORT / PIMA_SLURMD_PORT"
done
# Fresh logs for this start (the previous ones are kept as *.log.prev), so a failure shows its own.
for f in munged slurmctld "${SLURMD_PIDS[@]}"; do
    [[ -f $LOG_DIR/$f.log ]] && mv -f "$LOG_DIR/$f.log" "$LOG_DIR/$f.log.prev"
done
log "starting munged (socket $MUNGE_SOCKET)"
munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY_DIR/munge.key" \
    --pid-file="$RUN_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" ||
    fail "munged failed to start"
for _ in $(seq 50); do
    [[ -S $MUNGE_SOCKET ]] && break
    sleep 0.1
done
[[ -S $MUNGE_SOCKET ]] || fail "munged did not create its socket $MUNGE_SOCKET"
if command -v munge >/dev/null && command -v unmunge >/dev/null; then
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null ||
        fail "munge round trip through $MUNGE_SOCKET failed"
fi

log "starting slurmctld (port $CTLD_PORT)"
slurmctld -f "$CONF" || fail "slurmctld failed to start"
if ((NODES == 1)); then
    log "starting slurmd (node $NODE, $CPUS CPUs, port $SLURMD_PORT)"
    slurmd -f "$CONF" || fail "slurmd failed to start"
else
    for ((i = 0; i < NODES; i++)); do
        log "starting slurmd on ${NODE_NAMES[i]} (${NODE_ADDRS[i]}, $CPUS CPUs, port $SLURMD_PORT)"
        "$here/on_node" "$i" slurmd -f "$CONF" || fail "slurmd on ${NODE_NAMES[i]} failed to start"
    done
fi

# --- 4. wait for the node ---------------------------------------------------------------
started=$SECONDS
deadline=$((SECONDS + WAIT_S))
state=""
while ((SECONDS < deadline)); do
    state=$(node_state || true)
    case $state in
        idle* | mix* | alloc*) break ;;
        drain* | down* | fail*)
            # A node recovered as DOWN from an earlier (killed) run comes back once.
            SLURM_CONF=$CONF scontrol update NodeName="$NODE_LIST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    for f in munged slurmctld "${SLURMD_PIDS[@]}"; do
        # The daemons write their pid files a moment after forking into the background.
        if [[ -s $RUN_DIR/$f.pid ]]; then
            pid_alive "$RUN_DIR/$f.pid" || fail "$f exited during start-up (logs above, all in $LOG_DIR)"
        elif ((SECONDS > started + 20)); then
            fail "$f wrote no pid file ($RUN_DIR/$f.pid) in 20 s (logs above, all in $LOG_DIR)"
        fi
    done
    sleep 1
done
if [[ ! $state =~ ^(idle|mix|alloc) ]]; then
    SLURM_CONF=$CONF scontrol show node "$NODE_LIST" >&2 2>/dev/null || true
    fail "nodes $NODE_LIST not idle after ${WAIT_S}s (state '${state:-no answer from slurmctld}'; logs above, all in $LOG_DIR)"
fi

write_env_file
log "up: nodes $NODE_LIST are $state; partition $PARTITION; source $ENV_FILE"
echo "export SLURM_CONF=$CONF"
