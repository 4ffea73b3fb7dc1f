#!/usr/bin/env bash
# A real Slurm (Debian's slurmctld + slurmd + munge) on this one machine, with 1 or 2 simulated nodes.
#
#   tools/local_slurm.sh up     [--nodes 1|2] [--dir DIR] [--port PORT]   start (idempotent)
#   tools/local_slurm.sh status [--dir DIR]                               sinfo + squeue
#   tools/local_slurm.sh down   [--dir DIR]                               stop everything it started
#   tools/local_slurm.sh env    [--dir DIR]                               print the export line only
#
# DIR (default /run/calm_dist_slurm, or $LOCAL_SLURM_DIR) must be private: created here with mode 700, or an
# existing directory owned by the caller with no group/other access, reached only through directories that
# nobody else can rename. Anything else is refused: root runs what it finds in DIR (state, munge key, conf).
# `up` prints `export SLURM_CONF=DIR/slurm.conf` on stdout (everything else goes to stderr), so
#   eval "$(tools/local_slurm.sh up)"
# leaves the shell ready for sbatch/squeue/scontrol.
#
# How it works (see docs/slurm.md):
#   * munged runs with its own key, socket, pid and log in DIR/munge.
#   * one "keeper" process holds a private mount namespace (unshare -m) in which a copy of /etc/hosts
#     naming the nodes (node1 -> 127.0.1.1, node2 -> 127.0.1.2) is bind-mounted over /etc/hosts. The real
#     /etc/hosts is never modified. slurmctld and every slurmd are started inside that namespace (nsenter),
#     each slurmd also in its own UTS namespace (unshare -u) whose hostname is its node name, so jobs see
#     `hostname` = node1/node2 and torch's rendezvous can resolve the node names.
#   * slurm.conf: proctrack/linuxproc, task/none, select/cons_tres (CR_Core), no accounting,
#     SlurmUser=root, one NodeName line per node (own Port, own loopback NodeAddr) with the hardware
#     stated as `slurmd -C` prints it; state, spool, logs and pid files under DIR.
#   * `down` cancels the jobs, stops the daemons by PID (state read from /proc/PID/stat: zombies answer
#     kill -0), then ends any process left in the private mount namespace (leftover job steps).
#   * DIR/cluster.env holds KEY=VALUE lines from a fixed list; it is parsed and validated, never sourced.
# Only loopback addresses (127.0.0.0/8) appear in the configuration. Slurm has no bind-address option:
# the daemons listen on their ports on every interface, and munge authenticates every message.
# Needs root (the daemons run as root; apt-get installs the packages when they are missing).
set -euo pipefail

PROG=$(basename "$0")
NODE_ADDRS=(127.0.1.1 127.0.1.2)
CLUSTER=calmlocal
PARTITION=debug

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

# ---------------------------------------------------------------- arguments
CMD=${1:-}
case "$CMD" in
    '') usage ;;
    -h|--help|help) usage 0 ;;
    up|down|status|env) ;;
    *) log "unknown command: $CMD"; usage ;;
esac
shift
NODES=${LOCAL_SLURM_NODES:-2}
DIR=${LOCAL_SLURM_DIR:-/run/calm_dist_slurm}
PORT=${LOCAL_SLURM_PORT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES=${2:?--nodes needs a value}; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
        --dir=*) DIR=${1#*=}; shift ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --port=*) PORT=${1#*=}; shift ;;
        -h|--help) usage 0 ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done
case "$NODES" in 1|2) ;; *) die "--nodes must be 1 or 2 (got $NODES)" ;; esac

# ---------------------------------------------------------------- the private directory
# A directory nobody else can rename or replace: owned by root or the caller, and when group/world-writable
# (/tmp) sticky, so that only its owner can move what is inside.
safe_ancestor() {
    local owner mode
    owner=$(stat -c %u -- "$1") mode=$((8#$(stat -c %a -- "$1")))
    [ "$owner" = 0 ] || [ "$owner" = "$2" ] || return 1
    [ $((mode & 8#022)) = 0 ] || [ $((mode & 8#1000)) != 0 ]
}

# Create DIR with mode 700, or accept an existing one only when it is the caller's and private; print its
# physical path.
private_dir() {
    local dir=$1 uid parent mode
    uid=$(id -u)
    mkdir -p -- "$(dirname -- "$dir")"
    mkdir -m 700 -- "$dir" 2>/dev/null || true
    [ -d "$dir" ] || die "$dir is not a directory"
    dir=$(cd -P -- "$dir" && pwd)
    [ "$(stat -c %u -- "$dir")" = "$uid" ] ||
        die "$dir belongs to uid $(stat -c %u -- "$dir"), not to the caller (uid $uid): refusing it; pick another --dir"
    mode=$(stat -c %a -- "$dir")
    [ $((8#$mode & 8#077)) = 0 ] ||
        die "$dir has mode $mode (group/other access): refusing it; use a private directory (mode 700)"
    parent=$dir
    while [ "$parent" != / ]; do
        parent=$(dirname -- "$parent")
        safe_ancestor "$parent" "$uid" ||
            die "$parent (above $dir; $(stat -c 'uid %u, mode %a' -- "$parent")) lets another user rename it:" \
                "refusing it"
    done
    echo "$dir"
}

DIR=$(private_dir "$DIR")
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
STATE_FILE=$DIR/cluster.env      # written by `up`: KEEPER_PID, KEEPER_START, MNT_NS, RUN_NODES, RUN_PORT

export SLURM_CONF=$CONF

# ---------------------------------------------------------------- process helpers
# Field 3 (state) and field 22 (start time) of /proc/PID/stat; the comm field may contain spaces.
proc_state() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; echo "${s%% *}"; }
proc_start() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; set -- $s; echo "${20}"; }
proc_comm() { cat "/proc/$1/comm" 2>/dev/null; }
# A process runs when /proc/PID/stat exists and its state is not Z (zombie) or X (dead).
alive() {
    local st
    [ -n "${1:-}" ] || return 1
    st=$(proc_state "$1") || return 1
    [ "$st" != Z ] && [ "$st" != X ]
}
# alive and its comm is $2 (guards against a recycled PID)
alive_as() { alive "$1" && [ "$(proc_comm "$1")" = "$2" ]; }
pid_from_file() { [ -s "$1" ] && tr -dc '0-9' <"$1" || true; }

# stop_pid PID NAME [SECONDS]: TERM, wait for it to leave, KILL after the grace period.
stop_pid() {
    local pid=$1 name=$2 grace=${3:-20} i
    alive "$pid" || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "$name (pid $pid) ignored TERM for ${grace}s: KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || return 0; sleep 0.1; done
    log "warning: $name (pid $pid) still present after KILL"
}

# One KEY=VALUE line of the state file: the key from the fixed list, the value of its expected form.
valid_state() {
    case "$1" in
        KEEPER_PID|KEEPER_START|RUN_PORT) [[ $2 =~ ^[0-9]{1,20}$ ]] ;;
        RUN_NODES) [[ $2 =~ ^[12]$ ]] ;;
        MNT_NS) [[ $2 =~ ^mnt:\[[0-9]{1,20}\]$ ]] ;;
        *) return 1 ;;
    esac
}

# Parsed, never sourced: a value is assigned as text and nothing in the file runs.
load_state() {
    KEEPER_PID='' KEEPER_START='' MNT_NS='' RUN_NODES='' RUN_PORT=''
    [ -f "$STATE_FILE" ] || return 0
    local line key n=0
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        key=${line%%=*}
        valid_state "$key" "${line#*=}" ||
            die "$STATE_FILE line $n is not one of its KEY=VALUE lines; stop the cluster's processes and" \
                "remove the file"
        printf -v "$key" '%s' "${line#*=}"
    done <"$STATE_FILE"
}

keeper_alive() {
    [ -n "${KEEPER_PID:-}" ] && alive "$KEEPER_PID" &&
        [ "$(proc_start "$KEEPER_PID")" = "$KEEPER_START" ] &&
        [ "$(readlink "/proc/$KEEPER_PID/ns/mnt" 2>/dev/null)" = "$MNT_NS" ]
}

# PIDs of the processes (other than the keeper) inside our private mount namespace.
ns_pids() {
    local p pid
    keeper_alive || return 0
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" = "$KEEPER_PID" ] && continue
        [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$MNT_NS" ] && echo "$pid"
    done
    return 0
}

node_name() { echo "node$1"; }

ctld_pid() { local p; p=$(pid_from_file "$DIR/run/slurmctld.pid"); alive_as "$p" slurmctld && echo "$p"; return 0; }
slurmd_pid() {
    local p
    p=$(pid_from_file "$DIR/run/slurmd-$(node_name "$1").pid")
    alive_as "$p" slurmd && echo "$p"
    return 0
}
munged_pid() { local p; p=$(pid_from_file "$DIR/munge/munged.pid"); alive_as "$p" munged && echo "$p"; return 0; }

all_nodes_idle() {
    local out
    out=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [ "$(echo "$out" | grep -c .)" -eq "$1" ] || return 1
    ! echo "$out" | awk '{print $2}' | grep -qv -E '^(idle|mix|alloc)$'
}

print_env() { echo "export SLURM_CONF=$CONF"; }

# ---------------------------------------------------------------- install
ensure_installed() {
    local missing='' b
    for b in slurmctld slurmd sbatch scontrol munged; do
        command -v "$b" >/dev/null 2>&1 || missing="$missing $b"
    done
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || die "missing:$missing; install slurmctld slurmd slurm-client munge (needs root)"
    command -v apt-get >/dev/null 2>&1 || die "missing:$missing and no apt-get to install them"
    log "installing slurmctld slurmd slurm-client munge (missing:$missing)"
    local pkgs=(slurmctld slurmd slurm-client munge)
    if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
            "${pkgs[@]}" >"$DIR/apt.log" 2>&1; then
        log "apt-get install failed; running apt-get update first"
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
            "${pkgs[@]}" >>"$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log" >&2; die "apt-get install failed"; }
    fi
    # Debian's maintainer scripts may start a system munged/slurm with systemd-less fallbacks: ours are separate.
    for b in slurmctld slurmd sbatch scontrol munged; do
        command -v "$b" >/dev/null 2>&1 || die "$b still missing after apt-get install (see $DIR/apt.log)"
    done
}

# ---------------------------------------------------------------- ports
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# First base port P (ctld on P, node i on P+i) whose ports are all free.
pick_port() {
    local base n ok
    for base in ${PORT:-16817 16917 17017 17117 17217 17317 17417 17517}; do
        ok=1
        for ((n = 0; n <= NODES; n++)); do
            if port_in_use $((base + n)); then ok=0; break; fi
        done
        if [ $ok = 1 ]; then echo "$base"; return 0; fi
        [ -n "$PORT" ] && die "port $base..$((base + NODES)) is in use (--port)"
    done
    die "no free port range found; pass --port"
}

# ---------------------------------------------------------------- configuration
write_hosts() {
    local i names=''
    # A copy of the real /etc/hosts; lines that map our node addresses elsewhere are moved to 127.0.0.1
    # (Debian puts "127.0.1.1 <hostname>" there) so each node address names exactly one node.
    awk -v a="${NODE_ADDRS[*]}" 'BEGIN{n=split(a,A," "); for(i=1;i<=n;i++) M[A[i]]=1}
        !/^[[:space:]]*#/ && ($1 in M) {$1="127.0.0.1"} {print}' /etc/hosts >"$DIR/hosts"
    {
        echo "# calm_dist local Slurm nodes (visible only inside the cluster's mount namespace)"
        for ((i = 1; i <= NODES; i++)); do
            echo "${NODE_ADDRS[i-1]} $(node_name "$i")"
        done
    } >>"$DIR/hosts"
}

write_conf() {
    local hw i FIRST_JOB_ID=$((1000 + RANDOM % 9000))
    # The hardware as slurmd -C sees it, minus the NodeName (e.g. "CPUs=2 Boards=1 SocketsPerBoard=1 ...").
    hw=$(slurmd -C 2>/dev/null | head -n1 | tr ' ' '\n' |
         grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
    [ -n "$hw" ] || die "slurmd -C printed nothing"
    cat >"$CONF" <<EOF
# Generated by tools/local_slurm.sh: a local test cluster. Do not edit; rerun 'up' instead.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$RUN_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: job credentials live 10 s, so a requeued job may start again after 11 s (default: 121 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# Job ids start at a random point so that two local clusters on one machine (two engineers, or a test run
# beside a manual one) do not derive the same MASTER_PORT (20000 + job id) for their rendezvous.
FirstJobId=$FIRST_JOB_ID
# KillWait=30 (Slurm's default): the grace between the TERM that ends a job (scancel, time limit) and the
# KILL, in which the ranks checkpoint and the batch script requeues. Quick scheduling passes; finished jobs
# kept 10 min.
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=120
SlurmctldTimeout=120
MessageTimeout=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool/%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$DIR/tmp
EOF
    for ((i = 1; i <= NODES; i++)); do
        echo "NodeName=$(node_name "$i") NodeAddr=${NODE_ADDRS[i-1]} NodeHostname=$(node_name "$i")" \
             "Port=$((RUN_PORT + i)) ${hw}State=UNKNOWN" >>"$CONF"
    done
    if [ "$NODES" = 1 ]; then
        echo "PartitionName=$PARTITION Nodes=node1 Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    else
        echo "PartitionName=$PARTITION Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    fi
}

# ---------------------------------------------------------------- up
start_munge() {
    if [ -n "$(munged_pid)" ]; then return 0; fi
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$DIR/munge/munged.pid"
    log "starting munged"
    nsenter -t "$KEEPER_PID" -m -- setsid munged -F --force \
        --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
        --log-file="$DIR/log/munged.log" --num-threads=2 \
        </dev/null >>"$DIR/log/munged.out" 2>&1 &
    local i
    for ((i = 0; i < 100; i++)); do
        if [ -S "$MUNGE_SOCKET" ] &&
            munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    tail -20 "$DIR/log/munged.log" "$DIR/log/munged.out" >&2 2>/dev/null || true
    die "munged did not come up"
}

start_keeper() {
    if keeper_alive; then return 0; fi
    log "starting the namespace keeper (private mount namespace with $DIR/hosts on /etc/hosts)"
    # unshare without --fork execs in place, so $! is the keeper itself.
    setsid unshare -m --propagation private -- \
        sh -c 'mount --bind "$1" /etc/hosts && exec sleep infinity' keeper "$DIR/hosts" \
        </dev/null >>"$DIR/log/keeper.out" 2>&1 &
    local pid=$! i ns=''
    for ((i = 0; i < 50; i++)); do
        if alive "$pid" && [ "$(proc_comm "$pid")" = sleep ]; then
            ns=$(readlink "/proc/$pid/ns/mnt")
            break
        fi
        alive "$pid" || break
        sleep 0.1
    done
    [ -n "$ns" ] || {
        cat "$DIR/log/keeper.out" >&2 || true
        die "could not create the private mount namespace (unshare -m)"
    }
    [ "$ns" != "$(readlink /proc/self/ns/mnt)" ] || die "keeper is in the host mount namespace"
    KEEPER_PID=$pid KEEPER_START=$(proc_start "$pid") MNT_NS=$ns
    # The bind mount is visible inside only.
    nsenter -t "$KEEPER_PID" -m -- grep -q " node1$" /etc/hosts || die "hosts bind mount not visible in the namespace"
}

save_state() {
    cat >"$STATE_FILE" <<EOF
KEEPER_PID=$KEEPER_PID
KEEPER_START=$KEEPER_START
MNT_NS=$MNT_NS
RUN_NODES=$NODES
RUN_PORT=$RUN_PORT
EOF
}

start_ctld() {
    [ -n "$(ctld_pid)" ] && return 0
    log "starting slurmctld on port $RUN_PORT"
    # -i: ignore state from an earlier run of a different shape; we start from a clean state dir anyway.
    nsenter -t "$KEEPER_PID" -m -- setsid slurmctld -D -i -f "$CONF" \
        </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
}

start_slurmd() {
    local i=$1 name
    name=$(node_name "$i")
    [ -n "$(slurmd_pid "$i")" ] && return 0
    mkdir -p "$DIR/spool/$name"
    log "starting slurmd $name (${NODE_ADDRS[i-1]}, port $((RUN_PORT + i)))"
    nsenter -t "$KEEPER_PID" -m -- setsid unshare -u -- \
        sh -c 'hostname "$1" && exec slurmd -D -N "$1" -f "$2"' slurmd "$name" "$CONF" \
        </dev/null >>"$DIR/log/slurmd-$name.out" 2>&1 &
}

cmd_up() {
    [ "$(id -u)" = 0 ] || die "must run as root (the daemons run as root: SlurmUser=root)"
    command -v unshare >/dev/null && command -v nsenter >/dev/null || die "unshare/nsenter (util-linux) missing"
    ensure_installed
    load_state
    # Already up?
    if keeper_alive && [ -n "$(ctld_pid)" ] && [ -n "$(munged_pid)" ]; then
        if [ "$RUN_NODES" != "$NODES" ]; then
            die "cluster in $DIR already runs with $RUN_NODES node(s); run '$PROG down --dir $DIR' first"
        fi
        local i ok=1
        for ((i = 1; i <= NODES; i++)); do [ -n "$(slurmd_pid "$i")" ] || ok=0; done
        if [ $ok = 1 ] && all_nodes_idle "$NODES"; then
            log "already up ($NODES node(s), port $RUN_PORT) in $DIR"
            print_env
            return 0
        fi
        log "cluster in $DIR is partly up: restarting it"
    fi
    cmd_down quiet
    RUN_PORT=$(pick_port)
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/tmp"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/tmp"
    write_hosts
    write_conf
    start_keeper
    save_state
    start_munge
    start_ctld
    local i deadline=$((SECONDS + 60))
    until timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; do
        if [ $SECONDS -ge $deadline ] || ! alive_pidfile_or_starting ctld; then
            tail -30 "$DIR/log/slurmctld.log" "$DIR/log/slurmctld.out" >&2 2>/dev/null || true
            cmd_down quiet
            die "slurmctld did not come up"
        fi
        sleep 0.5
    done
    for ((i = 1; i <= NODES; i++)); do start_slurmd "$i"; done
    deadline=$((SECONDS + 90))
    until all_nodes_idle "$NODES"; do
        if [ $SECONDS -ge $deadline ]; then
            timeout 10 sinfo -N -l >&2 2>/dev/null || true
            for ((i = 1; i <= NODES; i++)); do
                tail -20 "$DIR/log/slurmd-$(node_name "$i").log" >&2 2>/dev/null || true
            done
            tail -20 "$DIR/log/slurmctld.log" >&2 2>/dev/null || true
            cmd_down quiet
            die "nodes did not become idle within 90 s"
        fi
        sleep 0.5
    done
    log "up: $NODES node(s) [$(timeout 10 sinfo -h -o %N)], controller 127.0.0.1:$RUN_PORT, dir $DIR"
    print_env
}

# While slurmctld starts, its pid file may not exist yet: accept that for a few seconds.
alive_pidfile_or_starting() {
    [ -n "$(ctld_pid)" ] && return 0
    # Not yet written: is a slurmctld for our conf running in the namespace?
    local p
    for p in $(ns_pids); do
        [ "$(proc_comm "$p")" = slurmctld ] && return 0
    done
    return 1
}

# ---------------------------------------------------------------- down
cmd_down() {
    local quiet=${1:-} p i name any=0 jobs
    load_state
    # 1. Cancel the jobs (best effort: the controller may be gone already).
    if [ -n "$(ctld_pid)" ]; then
        jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do
                [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null || true)" ] && break
                sleep 0.5
            done
        fi
    fi
    # 2. The daemons, by PID: nodes first, then the controller, then munge.
    for p in "$DIR"/run/slurmd-*.pid; do
        [ -e "$p" ] || continue
        name=${p##*/slurmd-}; name=${name%.pid}
        i=$(pid_from_file "$p")
        if alive_as "$i" slurmd; then any=1; stop_pid "$i" "slurmd $name" 20; fi
        rm -f "$p"
    done
    i=$(ctld_pid)
    if [ -n "$i" ]; then any=1; stop_pid "$i" slurmctld 30; fi
    rm -f "$DIR/run/slurmctld.pid"
    # 3. Anything left in the private mount namespace (slurmstepd, job processes, a daemon that had not
    #    written its pid file yet), then munged and the keeper.
    local m
    m=$(munged_pid)
    local left=()
    for p in $(ns_pids); do
        [ "$p" = "$m" ] && continue
        left+=("$p")
    done
    if [ ${#left[@]} -gt 0 ]; then
        any=1
        log "ending ${#left[@]} process(es) left in the cluster namespace: ${left[*]}"
        kill -TERM "${left[@]}" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            local still=0
            for p in "${left[@]}"; do alive "$p" && still=1; done
            [ $still = 0 ] && break
            sleep 0.1
        done
        for p in "${left[@]}"; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
    fi
    if [ -n "$m" ]; then any=1; stop_pid "$m" munged 10; fi
    rm -f "$DIR/munge/munged.pid" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    if keeper_alive; then any=1; stop_pid "$KEEPER_PID" keeper 5; fi
    rm -f "$STATE_FILE"
    if [ -z "$quiet" ]; then
        if [ $any = 1 ]; then log "down ($DIR)"; else log "nothing was running in $DIR"; fi
    fi
}

# ---------------------------------------------------------------- status
cmd_status() {
    load_state
    local rc=0 i
    if [ -z "$(ctld_pid)" ]; then
        log "slurmctld not running (dir $DIR)"
        rc=1
    fi
    echo "dir:        $DIR"
    echo "conf:       $CONF"
    echo "controller: ${RUN_PORT:+127.0.0.1:$RUN_PORT} pid=$(ctld_pid)"
    echo "munged:     pid=$(munged_pid)"
    echo "namespace:  ${MNT_NS:-none} keeper=$(keeper_alive && echo "$KEEPER_PID" || echo none)"
    for ((i = 1; i <= ${RUN_NODES:-0}; i++)); do
        echo "slurmd:     $(node_name "$i") pid=$(slurmd_pid "$i")"
    done
    if [ $rc = 0 ]; then
        timeout 10 sinfo -N -l || rc=1
        timeout 10 squeue || rc=1
    fi
    print_env
    return $rc
}

case "$CMD" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) print_env ;;
    *) log "unknown command: $CMD"; usage ;;
esac
