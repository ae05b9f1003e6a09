#!/usr/bin/env bash
# A real Flower deployment on loopback: one SuperLink, SuperNodes (by default two, one partition
# each), and fedpara's apps submitted with `flwr run`. Checks the run completed, then stops every
# process it started, by PID. What docs/flower.md describes for several machines, on one.
#
#   scripts/local_deployment.sh                      # 2 rounds of a small FedPara MLP
#   scripts/local_deployment.sh "rounds=3 lr=0.05"   # run-config overrides (they win)
#   NODES=1 PARTITIONS=10 scripts/local_deployment.sh "engine='cohort'"
#                       # one SuperNode holding all 10 partitions (node config partitions-held)
#   WORKER=1 NODES=1 PARTITIONS=10 scripts/local_deployment.sh "engine='cohort'"
#                       # the same, its ClientApps forwarding to one fedpara.worker process
#
# NODES SuperNodes share PARTITIONS partitions (default: one each) in contiguous blocks whose
# sizes differ by at most one; num-clients and clients-per-round default to PARTITIONS.
# Needs the venv (make install; VENV_BIN points elsewhere) and Fashion-MNIST (Debian's
# dataset-fashion-mnist) unless the overrides name other data. Offline: the app runs in this
# environment (no `uv sync`), with a private FLWR_HOME. Exit status 0 when the run finished
# completed and its history was written; RESULTS_DIR keeps that history (default: a temporary
# folder, removed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VENV_BIN:-$ROOT/.venv/bin}"
EXTRA_CONFIG="${1:-}"
NUM_NODES="${NODES:-2}"
NUM_PARTITIONS="${PARTITIONS:-$NUM_NODES}"
if ! [ "$NUM_NODES" -ge 1 ] 2>/dev/null || ! [ "$NUM_PARTITIONS" -ge "$NUM_NODES" ] 2>/dev/null; then
  echo "NODES must be an integer >= 1 and PARTITIONS an integer >= NODES; got NODES=$NUM_NODES" \
    "PARTITIONS=$NUM_PARTITIONS" >&2
  exit 2
fi
case "${WORKER:-0}" in
  0 | 1) ;;
  *) echo "WORKER must be 0 or 1, got '${WORKER}'" >&2; exit 2 ;;
esac
for tool in python flwr flower-superlink flower-supernode; do
  if [ ! -x "$BIN/$tool" ]; then
    echo "no $BIN/$tool: run \`make install\` first, or point VENV_BIN at the bin folder of" \
      "an environment with fedpara and flwr[simulation]" >&2
    exit 2
  fi
done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedpara-deployment.XXXXXX")"
export FLWR_HOME="$WORK/flwr-home"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 UV_OFFLINE=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# How often the SuperExecs look for a ServerApp or ClientApp to start (Flower's default: 1 s);
# every round starts at least one ClientApp process. benchmarks/server_poll.py measures it.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"
export PATH="$BIN:$PATH"
mkdir -p "$FLWR_HOME"

# Each daemon runs in its own process group (setsid), so that stopping it by its PID also stops
# the SuperExec and the ServerApp / ClientApp processes it spawned.
PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$status" -ne 0 ]; then
    echo "--- logs (kept in $WORK) ---" >&2
    tail -n 30 "$WORK"/*.log >&2 || true
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT INT TERM

# free TCP ports: the SuperLink's one HTTP port, then one per SuperNode
read -r -a PORTS <<<"$("$BIN/python" - "$((NUM_NODES + 1))" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
LINK_PORT="${PORTS[0]}"

# 1. the SuperLink (it hosts the ServerApp; --disable-...: use this environment, offline)
setsid flower-superlink --insecure --host 127.0.0.1 --port "$LINK_PORT" \
  --database "$WORK/state.db" --disable-runtime-dependency-installation \
  >"$WORK/superlink.log" 2>&1 &
PIDS+=($!)

# 2. with WORKER=1, one fedpara.worker for the machine (node config worker=<its socket>), then
# the SuperNodes, each told which block of partitions it holds
WORKER_CONFIG=""
if [ "${WORKER:-0}" = 1 ]; then
  setsid "$BIN/python" -m fedpara.worker --address "$WORK/worker.sock" >"$WORK/worker.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do [ -S "$WORK/worker.sock" ] && break; sleep 0.1; done
  if [ ! -S "$WORK/worker.sock" ]; then echo "the worker did not start within 60 s" >&2; exit 1; fi
  WORKER_CONFIG=" worker='$WORK/worker.sock'"
fi
FIRST=0
for ((i = 0; i < NUM_NODES; i++)); do
  HELD=$((NUM_PARTITIONS / NUM_NODES + (i < NUM_PARTITIONS % NUM_NODES ? 1 : 0)))
  setsid flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" --port "${PORTS[$((i + 1))]}" \
    --node-config "partition-id=$FIRST num-partitions=$NUM_PARTITIONS partitions-held=$HELD$WORKER_CONFIG" \
    >"$WORK/supernode-$i.log" 2>&1 &
  PIDS+=($!)
  FIRST=$((FIRST + HELD))
done

# 3. a connection named "loopback" to this SuperLink
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$LINK_PORT"
insecure = true
EOF

# 4. wait until the SuperLink listens, then submit the app and follow its log until it ends
"$BIN/python" - "$LINK_PORT" <<'EOF'
import socket, sys, time
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("the SuperLink did not start listening within 60 s")
EOF
RESULTS="${RESULTS_DIR:-$WORK/results}"
CONFIG=""
for pair in "num-clients=$NUM_PARTITIONS" "clients-per-round=$NUM_PARTITIONS" "rounds=2" \
            "partition='iid'" "client-samples=2000" "eval-samples=2000" "device='cpu'"; do
  case " $EXTRA_CONFIG" in *" ${pair%%=*}="*) ;; *) CONFIG="$CONFIG $pair" ;; esac  # extra wins
done
CONFIG="$CONFIG results-dir='$RESULTS' $EXTRA_CONFIG"
cd "$ROOT"
flwr run . loopback --stream --run-config "$CONFIG" 2>&1 | tee "$WORK/run.log"

# 5. `flwr run` exits 0 even when the run failed: ask the SuperLink for its status
flwr ls loopback --format json >"$WORK/ls.json"
"$BIN/python" - "$WORK/ls.json" "$RESULTS" <<'EOF'
import json, pathlib, sys
runs = json.load(open(sys.argv[1])).get("runs", [])
statuses = [run["status"] for run in runs]
histories = list(pathlib.Path(sys.argv[2]).rglob("*.json"))
print(f"runs: {statuses}; histories: {[str(h) for h in histories]}")
if statuses != ["finished:completed"] or len(histories) != 1:
    sys.exit("deployment run did not complete")
records = json.load(open(histories[0]))["records"]
print(f"{len(records)} rounds, accuracy {[round(r['accuracy'], 4) for r in records]}")
EOF
if [ "${WORKER:-0}" = 1 ]; then
  echo "worker: served $(grep -c '^served ' "$WORK/worker.log") requests, failed $(grep -c '^failed ' "$WORK/worker.log" || true)"
fi
echo "loopback deployment: OK"
