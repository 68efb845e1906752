#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for trying the service's router by hand: a head node
# (no GPUs; room for the router and job queue actors) plus N worker nodes, each declaring fake
# GPUs and as many `edit_slot`s, the resources an EditWorker asks for (cluster/README.md).
#
#   cluster/local_cluster.sh up N [options]   start the head and N worker nodes
#   cluster/local_cluster.sh status           `ray status` of the running cluster
#   cluster/local_cluster.sh env              the exports a client shell needs (eval it)
#   cluster/local_cluster.sh down             stop every node this script started
#
# It runs the `ray` of the active Python environment. Every node runs in its own process group,
# recorded in the state file, and `down` stops those groups only: unlike `ray stop`, it leaves
# any other Ray on the machine alone.
set -euo pipefail

TEMP_DIR=${FISEDIT_RAY_TEMP_DIR:-/tmp/fisedit-ray}
GCS_PORT=6379
CLIENT_PORT=10001
DASHBOARD_PORT=8265
HEAD_CPUS=2
WORKER_CPUS=1
GPUS_PER_NODE=1
OBJECT_STORE_MB=150
AUTH=disabled
SLOT_RESOURCE=edit_slot
STOP_GRACE_S=10

usage() {
    cat <<EOF
usage: $0 up N [options] | status | env | down   [--temp-dir DIR]

options of up (defaults in brackets):
  --temp-dir DIR          Ray's temp dir, logs and this script's state [$TEMP_DIR]
                          (also FISEDIT_RAY_TEMP_DIR; keep it short: socket paths live in it)
  --port P                GCS port of the head [$GCS_PORT]
  --client-port P         Ray Client server port (ray://) [$CLIENT_PORT]
  --dashboard-port P      dashboard and Jobs API port [$DASHBOARD_PORT]
  --head-cpus C           logical CPUs of the head node [$HEAD_CPUS]
  --worker-cpus C         logical CPUs of each worker node [$WORKER_CPUS]
  --gpus-per-node G       fake GPUs, and as many $SLOT_RESOURCE, per worker node [$GPUS_PER_NODE]
  --object-store-mb M     object store of each node, in MiB [$OBJECT_STORE_MB]
  --auth disabled|token   token authentication [$AUTH]; token writes a fresh token to
                          DIR/auth_token, which every client must be given (see env)
EOF
}

die() {
    echo "local_cluster.sh: $*" >&2
    exit 1
}

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
COMMAND=$1
shift
WORKERS=
if [[ $COMMAND == up ]]; then
    [[ $# -ge 1 && $1 =~ ^[0-9]+$ ]] || die "up needs the number of worker nodes, e.g. 'up 2'"
    WORKERS=$1
    shift
fi
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || die "option $1 needs a value"
    case $1 in
        --temp-dir) TEMP_DIR=$2 ;;
        --port) GCS_PORT=$2 ;;
        --client-port) CLIENT_PORT=$2 ;;
        --dashboard-port) DASHBOARD_PORT=$2 ;;
        --head-cpus) HEAD_CPUS=$2 ;;
        --worker-cpus) WORKER_CPUS=$2 ;;
        --gpus-per-node) GPUS_PER_NODE=$2 ;;
        --object-store-mb) OBJECT_STORE_MB=$2 ;;
        --auth) AUTH=$2 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift 2
done
[[ $AUTH == disabled || $AUTH == token ]] || die "--auth must be 'disabled' or 'token', not '$AUTH'"
command -v ray >/dev/null || die "no 'ray' on PATH: activate the Python environment that has ray"

TEMP_DIR=$(mkdir -p "$TEMP_DIR" && cd "$TEMP_DIR" && pwd)
STATE_FILE=$TEMP_DIR/local_cluster.state
TOKEN_FILE=$TEMP_DIR/auth_token

# The state file holds RAY_ADDRESS, NODE_PGIDS and the auth settings; `up` writes it.
load_state() {
    [[ -f $STATE_FILE ]] || die "no cluster started from $TEMP_DIR (no $STATE_FILE)"
    # shellcheck source=/dev/null
    source "$STATE_FILE"
}

auth_exports() {
    echo "export RAY_AUTH_MODE=$AUTH"
    if [[ $AUTH == token ]]; then
        echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
    fi
}

group_members() {  # group_members WANT PGID...: live pids of the groups; WANT: raylet|gcs|other
    ps -eo pid=,pgid=,stat=,comm= | awk -v want="$1" -v groups=" ${*:2} " '
        index(groups, " " $2 " ") && $3 !~ /^Z/ {
            kind = ($4 == "raylet") ? "raylet" : ($4 == "gcs_server") ? "gcs" : "other"
            if (want == kind || want == "all") print $1
        }'
}

group_alive() {
    [[ -n $(group_members all "$1") ]]
}

stop_groups() {  # stop_groups PGID...
    # As `ray stop` does: raylets first, GCS last (it waits for the others), each with SIGTERM
    # and then SIGKILL for whatever is left after the grace period.
    local kind pids waited
    for kind in raylet other gcs; do
        pids=$(group_members "$kind" "$@")
        [[ -n $pids ]] || continue
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        for ((waited = 0; waited < STOP_GRACE_S; waited++)); do
            [[ -n $(group_members "$kind" "$@") ]] || break
            sleep 1
        done
    done
    pids=$(group_members all "$@")
    # shellcheck disable=SC2086
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
}

start_node() {  # start_node NAME RAY_START_ARGS...: one `ray start` in a new process group
    local name=$1 pgid_file=$TEMP_DIR/$1.pgid
    shift
    rm -f "$pgid_file"
    # setsid makes this `ray start` a process group leader; the daemons it leaves behind
    # (GCS, raylet, dashboard, agents) stay in its group, which `down` stops.
    if ! setsid --wait bash -c 'echo $$ >"$0"; exec "$@"' "$pgid_file" \
        ray start --temp-dir "$TEMP_DIR" --object-store-memory $((OBJECT_STORE_MB << 20)) \
        --min-worker-port 0 --max-worker-port 0 --dashboard-agent-listen-port 0 \
        --disable-usage-stats "$@" >"$TEMP_DIR/$name.log" 2>&1; then
        tail -n 20 "$TEMP_DIR/$name.log" >&2
        [[ -f $pgid_file ]] && stop_groups "$(cat "$pgid_file")"
        return 1
    fi
    NODE_PGIDS+=" $(cat "$pgid_file")"
    write_state
}

write_state() {
    {
        echo "RAY_ADDRESS=${RAY_ADDRESS:-}"
        echo "NODE_PGIDS='${NODE_PGIDS# }'"
        echo "AUTH=$AUTH"
    } >"$STATE_FILE"
}

abort_up() {
    echo "local_cluster.sh: a node failed to start (log above); stopping the others" >&2
    # shellcheck disable=SC2086
    [[ -z ${NODE_PGIDS// /} ]] || stop_groups $NODE_PGIDS
    rm -f "$STATE_FILE" "$TOKEN_FILE"
    exit 1
}

up() {
    local pgid
    if [[ -f $STATE_FILE ]]; then
        # A subshell, so that the old state's settings do not replace this call's options.
        for pgid in $(source "$STATE_FILE" && echo "$NODE_PGIDS"); do
            if group_alive "$pgid"; then
                die "a cluster from $TEMP_DIR is running; '$0 down --temp-dir $TEMP_DIR' first"
            fi
        done
    fi
    export RAY_AUTH_MODE=$AUTH
    if [[ $AUTH == token ]]; then
        # Ray's own `ray get-auth-token --generate` always writes ~/.ray/auth_token; a token per
        # cluster directory keeps this cluster's clients explicit. 256 random bits, as Ray's.
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE")
        export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
    fi
    NODE_PGIDS=
    RAY_ADDRESS=
    rm -f "$TEMP_DIR/ray_current_cluster"

    echo "starting the head node (GCS :$GCS_PORT, client :$CLIENT_PORT, dashboard :$DASHBOARD_PORT)"
    start_node head --head --port "$GCS_PORT" --ray-client-server-port "$CLIENT_PORT" \
        --dashboard-port "$DASHBOARD_PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 || abort_up
    RAY_ADDRESS=$(cat "$TEMP_DIR/ray_current_cluster")
    write_state

    local i
    for ((i = 1; i <= WORKERS; i++)); do
        echo "starting worker node $i of $WORKERS ($GPUS_PER_NODE fake GPU, $SLOT_RESOURCE)"
        start_node "worker$i" --address "$RAY_ADDRESS" --num-cpus "$WORKER_CPUS" \
            --num-gpus "$GPUS_PER_NODE" --resources "{\"$SLOT_RESOURCE\": $GPUS_PER_NODE}" || abort_up
    done

    cat <<EOF

Local Ray cluster up: a head node and $WORKERS worker node(s) with $GPUS_PER_NODE fake GPU(s) and \
$SLOT_RESOURCE each. Logs: $TEMP_DIR.
In each client shell:
  export RAY_ADDRESS=$RAY_ADDRESS
$(auth_exports | sed 's/^/  /')
  (or: eval "\$($0 env --temp-dir $TEMP_DIR)")
Ray Client: ray://127.0.0.1:$CLIENT_PORT    dashboard and Jobs API: http://127.0.0.1:$DASHBOARD_PORT
Next:
  $0 status --temp-dir $TEMP_DIR
  fisedit up --config cluster/examples/service-local.yaml    # the service's actors
  $0 down --temp-dir $TEMP_DIR
EOF
}

case $COMMAND in
    up) up ;;
    status)
        load_state
        eval "$(auth_exports)"
        ray status --address "$RAY_ADDRESS"
        ;;
    env)
        load_state
        echo "export RAY_ADDRESS=$RAY_ADDRESS"
        auth_exports
        ;;
    down)
        load_state
        # shellcheck disable=SC2086
        [[ -z ${NODE_PGIDS// /} ]] || stop_groups $NODE_PGIDS
        rm -f "$STATE_FILE" "$TOKEN_FILE"
        echo "stopped the cluster of $TEMP_DIR (logs kept there)"
        ;;
    -h | --help | help) usage ;;
    *) usage >&2; die "unknown command $COMMAND" ;;
esac
