#!/usr/bin/env bash
# A real Flower deployment on loopback: one SuperLink, two SuperNodes (one partition each), and
# fedpara's apps submitted with `flwr run`. Checks the run completed, then stops every process it
# started, by PID. What docs/flower.md describes for several machines, on one.
#
#   scripts/local_deployment.sh                      # 2 rounds of a small FedPara MLP
#   scripts/local_deployment.sh "rounds=3 lr=0.05"   # run-config overrides (they win)
#
# Needs the venv (make install) and Fashion-MNIST (Debian's dataset-fashion-mnist). Offline:
# the app runs in this environment (no `uv sync`), with a private FLWR_HOME. Exit status 0 when
# the run finished completed and its history was written.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VENV_BIN:-$ROOT/.venv/bin}"
EXTRA_CONFIG="${1:-}"
NUM_NODES=2
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedpara-deployment.XXXXXX")"
export FLWR_HOME="$WORK/flwr-home"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 UV_OFFLINE=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
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

# 2. the SuperNodes, each told which partition it holds
for ((i = 0; i < NUM_NODES; i++)); do
  setsid flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" --port "${PORTS[$((i + 1))]}" \
    --node-config "partition-id=$i num-partitions=$NUM_NODES" \
    >"$WORK/supernode-$i.log" 2>&1 &
  PIDS+=($!)
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
RESULTS="$WORK/results"
CONFIG=""
for pair in "num-clients=$NUM_NODES" "clients-per-round=$NUM_NODES" "rounds=2" \
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
echo "loopback deployment: OK"
