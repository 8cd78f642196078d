#!/usr/bin/env bash
# Stop what deployments/serve.sh started, and only that: the process groups recorded in
# $CKPT_STACK_DIR/*.pid (both workers together, then both servers). Each gets SIGINT; if it is
# still there after 2 s, SIGTERM (a Prefect worker's first SIGINT starts a slow shutdown, the
# next signal ends it), SIGINT again after 6 s and SIGKILL after 12 s.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${CKPT_STACK_DIR:-$ROOT/deployments/.run}"

alive() { kill -0 -- "-$1" 2>/dev/null || kill -0 "$1" 2>/dev/null; }

signal() {  # signal SIG PID: the group serve.sh created with setsid, else the process
    kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true
}

stop_one() {
    local name="$1" pidfile="$STACK/$1.pid" pid waited=0
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if [ -z "$pid" ] || ! alive "$pid"; then
        rm -f "$pidfile"
        return 0
    fi
    signal INT "$pid"
    while alive "$pid"; do
        sleep 0.5
        waited=$((waited + 1))
        case "$waited" in
            4) signal TERM "$pid" ;;
            12) signal INT "$pid" ;;
            24) signal KILL "$pid" ;;
            34) echo "stop: $name ($pid) did not exit" >&2; return 1 ;;
        esac
    done
    rm -f "$pidfile"
    echo "stop: $name stopped"
}

stop_together() {  # stop_together NAME...: in parallel; fails if any fails
    local pids=() rc=0
    for name in "$@"; do
        stop_one "$name" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do
        wait "$p" || rc=1
    done
    return "$rc"
}

status=0
stop_together cpu-worker gpu-worker || status=1
stop_together server moto || status=1
rm -f "$STACK/env"
exit "$status"
