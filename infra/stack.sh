#!/usr/bin/env bash
# The local stack: a Prefect server, an S3 endpoint (moto) with a bucket, the work pools, and workers:
# one orchestrator on pool soup-cpu and GPU_WORKERS fine-tune workers on pool gpu, each pinned to one
# device slot (CUDA_VISIBLE_DEVICES=i when GPUs are present, else a one-thread CPU slot).
#
#   infra/stack.sh up | down
#   STACK_DB=postgres infra/stack.sh up     # the server on PostgreSQL (needs initdb/postgres on PATH),
#                                          # started here as a cluster of its own; default: SQLite
#
# Everything listens on 127.0.0.1. State, logs and process ids live in $STACK_DIR; `source
# $STACK_DIR/env` points a shell at the stack. Only the processes recorded there are ever stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
STACK_DIR=${STACK_DIR:-$PWD/.stack}
PREFECT_PORT=${PREFECT_PORT:-4200}
S3_PORT=${S3_PORT:-5555}
GPU_WORKERS=${GPU_WORKERS:-2}
BUCKET=${BUCKET:-soup-bucket}
export PATH="$PWD/.venv/bin:$PATH"

start() {  # start NAME COMMAND... : in its own session, so that stopping it stops its children too
  local name=$1; shift
  setsid "$@" >"$STACK_DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$STACK_DIR/pids/$name"
}

wait_for() {  # wait_for WHAT URL
  for _ in $(seq 1 120); do
    if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$2" 2>/dev/null; then return 0; fi
    sleep 1
  done
  echo "stack: $1 did not come up at $2; see $STACK_DIR/logs" >&2
  return 1
}

start_postgres() {  # a throwaway cluster on 127.0.0.1:PG_PORT, trust auth, database "prefect"
  local bin data port=${PG_PORT:-5433} as_postgres=()
  bin=$(dirname "$(readlink -f "$(command -v initdb)")")
  data=$(mktemp -d /tmp/soup-stack-pg-XXXXXX)  # outside STACK_DIR, which may be private to this user
  echo "$data" >"$STACK_DIR/pg-data"
  if [ "$(id -u)" = 0 ]; then  # PostgreSQL refuses to run as root: use its own account then
    chown postgres "$data"
    as_postgres=(runuser -u postgres --)
  fi
  "${as_postgres[@]}" "$bin/initdb" -D "$data" -A trust -U prefect >"$STACK_DIR/logs/initdb.log"
  start postgres "${as_postgres[@]}" "$bin/postgres" -D "$data" -p "$port" -k "$data" \
    -c listen_addresses=127.0.0.1 -c max_connections=200
  for _ in $(seq 1 60); do "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && break; sleep 0.5; done
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U prefect prefect
  echo "export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect@127.0.0.1:$port/prefect" >>"$STACK_DIR/env"
}

up() {
  mkdir -p "$STACK_DIR/logs" "$STACK_DIR/pids"
  cat >"$STACK_DIR/env" <<ENV
export PREFECT_HOME=$STACK_DIR/prefect-home
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=\${AWS_ACCESS_KEY_ID:-stack-key}
export AWS_SECRET_ACCESS_KEY=\${AWS_SECRET_ACCESS_KEY:-stack-secret}
export SOUP_PROJECT_DIR=$PWD
export SOUP_STORAGE_ROOT=s3://$BUCKET/soups
export PREFECT_CLI_PROMPT=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false
ENV
  if [ "${STACK_DB:-sqlite}" = postgres ]; then start_postgres; fi
  # shellcheck disable=SC1091
  source "$STACK_DIR/env"
  start server prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
  start s3 moto_server -H 127.0.0.1 -p "$S3_PORT"
  wait_for "Prefect server" "$PREFECT_API_URL/health"
  wait_for "S3 endpoint" "$AWS_ENDPOINT_URL/moto-api/"
  python -c "import s3fs, sys; s3fs.S3FileSystem().mkdir(sys.argv[1])" "$BUCKET"
  prefect work-pool create soup-cpu --type process --overwrite >/dev/null
  prefect work-pool create gpu --type process --base-job-template infra/gpu-process-job-template.json --overwrite >/dev/null
  start worker-orchestrator env SOUP_SLOT=orchestrator prefect worker start --pool soup-cpu --name orchestrator --limit 4
  local gpus
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  for i in $(seq 0 $((GPU_WORKERS - 1))); do
    if [ "${gpus:-0}" -gt 0 ]; then
      start "worker-gpu-$i" env CUDA_VISIBLE_DEVICES=$((i % gpus)) SOUP_SLOT="gpu-$i" \
        prefect worker start --pool gpu --name "gpu-$i" --limit 1
    else
      start "worker-gpu-$i" env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 SOUP_SLOT="gpu-$i" \
        prefect worker start --pool gpu --name "gpu-$i" --limit 1
    fi
  done
  echo "stack up: Prefect UI http://127.0.0.1:$PREFECT_PORT, S3 endpoint $AWS_ENDPOINT_URL (bucket $BUCKET), $GPU_WORKERS gpu workers"
  echo "point a shell at it: source $STACK_DIR/env"
}

stop_pid_file() {  # a background worker ignores the first SIGTERM: send a second, then SIGKILL
  local file=$1 pid
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6; do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6; do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  [ -d "$STACK_DIR/pids" ] || { echo "stack: nothing recorded in $STACK_DIR"; return 0; }
  for file in "$STACK_DIR"/pids/worker-*; do [ -e "$file" ] && stop_pid_file "$file" & done
  wait
  for name in server s3 postgres; do [ -e "$STACK_DIR/pids/$name" ] && stop_pid_file "$STACK_DIR/pids/$name"; done
  if [ -e "$STACK_DIR/pg-data" ]; then rm -rf "$(cat "$STACK_DIR/pg-data")" "$STACK_DIR/pg-data"; fi
  echo "stack down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: infra/stack.sh up|down" >&2; exit 2 ;;
esac
