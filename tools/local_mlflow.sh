#!/usr/bin/env bash
# A local MLflow tracking server for calm_dist: sqlite backend store, proxied artifacts, loopback only.
#
#   tools/local_mlflow.sh up     [--dir DIR] [--port P]   start (or reuse) a server, wait until healthy
#   tools/local_mlflow.sh down   [--dir DIR]              stop it (TERM its process group, then KILL)
#                                                         only when the pid is this DIR's server
#   tools/local_mlflow.sh status [--dir DIR]              exit 0 and print the URI when it is healthy
#
# Defaults: DIR=$MLFLOW_LOCAL_DIR or <repo>/mlruns (git-ignored), P=$MLFLOW_LOCAL_PORT or 5000.
# Files in DIR: mlflow.db (runs, params, metrics), artifacts/ (uploaded artifacts), server.log,
# server.pid (the server's pid, which is also its process group id) and server.port.
# Env: MLFLOW_LOCAL_PYTHON (the python that has mlflow; default <repo>/.venv/bin/python or python3),
#      MLFLOW_LOCAL_START_TIMEOUT (seconds to wait for /health, default 120).
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CMD="${1:-}"
[ -n "$CMD" ] || usage
shift
DIR="${MLFLOW_LOCAL_DIR:-$REPO/mlruns}"
PORT="${MLFLOW_LOCAL_PORT:-5000}"
PORT_GIVEN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --dir=*) DIR="${1#*=}"; shift ;;
        --port) PORT="$2"; PORT_GIVEN=1; shift 2 ;;
        --port=*) PORT="${1#*=}"; PORT_GIVEN=1; shift ;;
        -h|--help) usage ;;
        *) echo "local_mlflow.sh: unknown argument: $1" >&2; usage ;;
    esac
done
case "$PORT" in ''|*[!0-9]*) echo "local_mlflow.sh: --port must be a number, got '$PORT'" >&2; exit 2 ;; esac

[ "$CMD" = up ] && mkdir -p "$DIR"
DIR="$(realpath -m "$DIR")"
PIDFILE="$DIR/server.pid"
PORTFILE="$DIR/server.port"
LOG="$DIR/server.log"
START_TIMEOUT="${MLFLOW_LOCAL_START_TIMEOUT:-120}"

if [ -n "${MLFLOW_LOCAL_PYTHON:-}" ]; then
    PY="$MLFLOW_LOCAL_PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
else
    PY="$(command -v python3)"
fi

# A zombie still answers kill -0: read its state from /proc instead.
alive() {
    local pid="$1" state
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    state="$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)"
    [ "$state" != "Z" ] && [ "$state" != "X" ]
}

healthy() {  # healthy PORT: /health answers OK
    local body
    if command -v curl >/dev/null 2>&1; then
        body="$(curl -fsS --max-time 2 "http://127.0.0.1:$1/health" 2>/dev/null)" || return 1
    else
        body="$("$PY" -c 'import sys, urllib.request
url = "http://127.0.0.1:%s/health" % sys.argv[1]
print(urllib.request.urlopen(url, timeout=2).read().decode())' "$1" 2>/dev/null)" || return 1
    fi
    [ "$body" = "OK" ]
}

port_busy() {  # something accepts connections on 127.0.0.1:PORT
    "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
EOF
}

descendants() {  # all descendants of a pid, deepest first
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}

read_pid() { [ -f "$PIDFILE" ] && tr -dc '0-9' <"$PIDFILE" || true; }
read_port() { [ -f "$PORTFILE" ] && tr -dc '0-9' <"$PORTFILE" || true; }

# our_server PID: PID runs `mlflow server` on this DIR's store and port, as `up` started it. A pid file can
# outlive its server (a crash, a reboot) and its number can be reused by any process, which must not be signalled.
our_server() {
    local pid="$1" port args
    port="$(read_port)"
    alive "$pid" && [ -n "$port" ] || return 1
    args="$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    grep -qx -- mlflow <<<"$args" && grep -qx -- server <<<"$args" &&
        grep -qxF -- "sqlite:///$DIR/mlflow.db" <<<"$args" &&
        grep -A1 -x -- --port <<<"$args" | tail -n1 | grep -qxF -- "$port"
}

stop_server() {
    local pid kids deadline
    pid="$(read_pid)"
    if [ -z "$pid" ] || ! alive "$pid"; then
        rm -f "$PIDFILE" "$PORTFILE"
        echo "local_mlflow.sh: no server running for $DIR"
        return 0
    fi
    if ! our_server "$pid"; then
        rm -f "$PIDFILE" "$PORTFILE"
        echo "local_mlflow.sh: no server running for $DIR (pid $pid in $PIDFILE is another process: left alone)"
        return 0
    fi
    kids="$(descendants "$pid")"
    # The server was started with setsid: its pid is its process group id.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    for k in $kids; do alive "$k" && kill -KILL "$k" 2>/dev/null || true; done
    deadline=$((SECONDS + 10))
    while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    rm -f "$PIDFILE" "$PORTFILE"
    echo "local_mlflow.sh: stopped server $pid ($DIR)"
}

case "$CMD" in
up)
    pid="$(read_pid)"
    if [ -n "$pid" ] && our_server "$pid"; then
        oldport="$(read_port)"
        if [ "$PORT_GIVEN" = 1 ] && [ "$oldport" != "$PORT" ]; then
            echo "local_mlflow.sh: a server for $DIR already runs on port $oldport (pid $pid); 'down' it first" >&2
            exit 1
        fi
        PORT="$oldport"
        if healthy "$PORT"; then
            echo "local_mlflow.sh: already running (pid $pid) on http://127.0.0.1:$PORT"
            echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT"
            exit 0
        fi
        echo "local_mlflow.sh: server $pid is not healthy; restarting it" >&2
        stop_server >/dev/null
    fi
    rm -f "$PIDFILE" "$PORTFILE"
    if port_busy "$PORT"; then
        echo "local_mlflow.sh: port $PORT on 127.0.0.1 is already in use by another process" >&2
        exit 1
    fi
    mkdir -p "$DIR/artifacts"
    # --workers 1 and no job execution: all a local store needs, and a faster start with fewer processes.
    # setsid: the server leads its own process group, so 'down' can stop it and every child.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PY" -m mlflow server \
        --backend-store-uri "sqlite:///$DIR/mlflow.db" \
        --artifacts-destination "$DIR/artifacts" \
        --host 127.0.0.1 --port "$PORT" --workers 1 \
        >>"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    echo "$PORT" >"$PORTFILE"
    deadline=$((SECONDS + START_TIMEOUT))
    until healthy "$PORT"; do
        if ! alive "$pid"; then
            echo "local_mlflow.sh: the server exited during start; last lines of $LOG:" >&2
            tail -n 30 "$LOG" >&2 || true
            rm -f "$PIDFILE" "$PORTFILE"
            exit 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            echo "local_mlflow.sh: not healthy after ${START_TIMEOUT}s; stopping it. Last lines of $LOG:" >&2
            tail -n 30 "$LOG" >&2 || true
            stop_server >/dev/null
            exit 1
        fi
        sleep 0.5
    done
    echo "local_mlflow.sh: MLflow server $pid healthy on http://127.0.0.1:$PORT (store $DIR/mlflow.db, log $LOG)"
    echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT"
    ;;
down)
    stop_server
    ;;
status)
    pid="$(read_pid)"
    port="$(read_port)"
    if [ -n "$pid" ] && our_server "$pid" && healthy "$port"; then
        echo "local_mlflow.sh: running (pid $pid) on http://127.0.0.1:$port (store $DIR/mlflow.db)"
        echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$port"
        exit 0
    elif [ -n "$pid" ] && our_server "$pid"; then
        echo "local_mlflow.sh: process $pid is alive but http://127.0.0.1:${port:-?}/health does not answer OK"
        exit 1
    fi
    echo "local_mlflow.sh: not running ($DIR)"
    exit 3
    ;;
*)
    usage
    ;;
esac
