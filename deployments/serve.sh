#!/usr/bin/env bash
# Start the local stack on 127.0.0.1 and wait until everything answers:
#   a Prefect server (UI + API), moto's S3 server with the pipeline's buckets, the work pools
#   cpu-pool and gpu-pool (process; gpu-pool concurrency 1), every deployment of prefect.yaml
#   (`prefect deploy --all`), and one process worker per pool.
# Stop it with deployments/stop.sh (it stops exactly the processes recorded here).
#
# Settings (environment, all optional):
#   CKPT_STACK_DIR        state folder: pid files, logs, env, Prefect database  [deployments/.run]
#   CKPT_PREFECT_PORT     Prefect server port                                    [4200]
#   CKPT_MOTO_PORT        moto S3 port                                           [5055]
#   AWS_ENDPOINT_URL_S3   use this S3 endpoint instead of starting moto
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION   (moto: dummies by default)
#   CKPT_SCRATCH_URL      scratch prefix for the repartition deployment          [s3://ckpt-scratch/pipeline]
#   CKPT_WORK_DIR         workers' local work folder                             [$CKPT_STACK_DIR/work]
#   PREFECT_WORKER_QUERY_SECONDS   how often workers poll                        [1]
# Credentials and endpoints reach the workers through their environment only: nothing is
# stored in job variables, blocks or the database.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PY")"
STACK="${CKPT_STACK_DIR:-$ROOT/deployments/.run}"
PREFECT_PORT="${CKPT_PREFECT_PORT:-4200}"
MOTO_PORT="${CKPT_MOTO_PORT:-5055}"
BUCKETS=(ckpt-training ckpt-models ckpt-scratch)

mkdir -p "$STACK"
STACK="$(cd "$STACK" && pwd)"

for pidfile in "$STACK"/*.pid; do
    [ -e "$pidfile" ] || continue
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "serve: already running ($pidfile); run deployments/stop.sh first" >&2
        exit 1
    fi
    rm -f "$pidfile"
done

# --- environment shared by every process of the stack --------------------------------------
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT}/api"
# The deployments start runs as `python -m prefect.engine` (prefect.yaml): the workers' `python`
# is this interpreter.
export PATH="$BIN:$PATH"
# The pipeline's flows/ and tasks/ are this repository's (only ckptcore is pip-installed): every
# process of the stack (flow runs, Dask or Ray workers it starts) imports them from here.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_HOME="${PREFECT_HOME:-$STACK/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-1}"
export CKPT_SCRATCH_URL="${CKPT_SCRATCH_URL:-s3://ckpt-scratch/pipeline}"
export CKPT_WORK_DIR="${CKPT_WORK_DIR:-$STACK/work}"
export COLUMNS=200
START_MOTO=0
if [ -z "${AWS_ENDPOINT_URL_S3:-}" ]; then
    START_MOTO=1
    export AWS_ENDPOINT_URL_S3="http://127.0.0.1:${MOTO_PORT}"
    export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}"
    export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
fi
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"

on_error() {
    echo "serve: failed; stopping what was started (logs in $STACK)" >&2
    "$ROOT/deployments/stop.sh" >&2 || true
}
trap on_error ERR

# start NAME CMD...: run CMD in its own session (so stop.sh can signal its whole group).
start() {
    local name="$1"
    shift
    setsid nohup "$@" >"$STACK/$name.log" 2>&1 </dev/null &
    echo $! >"$STACK/$name.pid"
}

echo "serve: state in $STACK"
start server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
if [ "$START_MOTO" = 1 ]; then
    start moto "$BIN/moto_server" -H 127.0.0.1 -p "$MOTO_PORT"
    "$PY" deployments/stack.py wait-http "$AWS_ENDPOINT_URL_S3/" 60
fi
"$PY" deployments/stack.py buckets "${BUCKETS[@]}"
"$PY" deployments/stack.py wait-http "$PREFECT_API_URL/health" 180
echo "serve: Prefect server up at http://127.0.0.1:${PREFECT_PORT}"
"$PY" deployments/stack.py pools
"$BIN/prefect" --no-prompt deploy --all >"$STACK/deploy.log" 2>&1 || {
    cat "$STACK/deploy.log" >&2
    false
}
grep -o "Deployment '[^']*' successfully created" "$STACK/deploy.log" | sed 's/^/serve: /' || true
# Workers start a Python per run: compile the pipeline's modules once (where
# PYTHONDONTWRITEBYTECODE is set, each run's process would compile them again).
"$PY" -m compileall -q ckptcore tasks flows >/dev/null
start cpu-worker "$BIN/prefect" worker start --pool cpu-pool --type process --name cpu-worker
start gpu-worker "$BIN/prefect" worker start --pool gpu-pool --type process --name gpu-worker
"$PY" deployments/stack.py wait-workers cpu-pool gpu-pool --timeout 120

{
    echo "# source this file to talk to the local stack (written by deployments/serve.sh)"
    echo "export PREFECT_API_URL=$PREFECT_API_URL"
    echo "export AWS_ENDPOINT_URL_S3=$AWS_ENDPOINT_URL_S3"
    echo "export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION"
    if [ "$START_MOTO" = 1 ]; then  # moto's dummy credentials only, never real ones
        echo "export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
        echo "export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"
    fi
    echo "export CKPT_SCRATCH_URL=$CKPT_SCRATCH_URL"
    echo "export PREFECT_SERVER_ANALYTICS_ENABLED=false"
    echo "export COLUMNS=200"
} >"$STACK/env"
trap - ERR

cat <<EOF
serve: ready
  Prefect UI      http://127.0.0.1:${PREFECT_PORT}
  S3 endpoint     $AWS_ENDPOINT_URL_S3  (buckets: ${BUCKETS[*]})
  workers         cpu-pool, gpu-pool (logs: $STACK/*-worker.log)
  environment     . $STACK/env
  stop            deployments/stop.sh   (make stop)
EOF
