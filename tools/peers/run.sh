#!/usr/bin/env bash
# Peer comparison: the `online` workload against Mosquitto (MQTT QoS 1, persistence on, plain TCP on loopback, one
# inbox topic per user) and against relayd, interleaved A B A B, then every run's rate, each side's median and the
# relay/Mosquitto ratio. Not part of CI: it may install a package.
#
#   tools/peers/run.sh [PAIRS] [relay-load online arguments]     (default: 2 pairs, 100 clients × 1,000 × 256 B, W 32)
#   e.g. tools/peers/run.sh 3 --clients 100 --msgs 1000 --window 32
#
# Installs Mosquitto from the distribution's packages (apt-get, as root) when `mosquitto` is not on PATH.
# RELAY_LOAD selects the load tool (default target/release/relay-load; relayd is taken from beside it), so build
# first: cargo build --release -p relay-load -p relay-server. SWEEP_OUT=DIR also runs `relay-load sweep` against
# both (SWEEP_ARGS, default "--seconds 5") into DIR/mosquitto and DIR/relayd, and draws the two curves on the same
# axes in DIR/sweep.svg (and DIR/sweep.json).
# Needs python3 for the summary.
set -euo pipefail
pairs=${1:-2}
[ $# -gt 0 ] && shift
load=${RELAY_LOAD:-target/release/relay-load}
[ -x "$load" ] || { echo "no $load: cargo build --release -p relay-load -p relay-server" >&2; exit 2; }
window=32
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = --window ] && window=${args[$((i + 1))]}
done

if ! command -v mosquitto >/dev/null; then
  echo "installing mosquitto from the distribution's packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Mosquitto started as root drops to its own user, which must be able to write the persistence directory.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then chown mosquitto "$dir"; fi
cat >"$dir/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $dir/
set_tcp_nodelay true
max_inflight_messages $window
max_queued_messages 0
log_dest file $dir/mosquitto.log
EOF
mosquitto -c "$dir/mosquitto.conf" &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
echo "mosquitto $(mosquitto -h 2>/dev/null | head -n 1 | awk '{print $3}') on 127.0.0.1:$port, persistence in $dir"

for i in $(seq 1 "$pairs"); do
  for side in mqtt relay; do
    target=()
    [ "$side" = mqtt ] && target=(--target "mqtt://127.0.0.1:$port")
    "$load" online "${args[@]}" "${target[@]}" --json "$dir/$side$i.json" >"$dir/$side$i.txt" 2>&1 ||
      { cat "$dir/$side$i.txt" >&2; exit 1; }
    echo "$side$i: $(tail -n 1 "$dir/$side$i.txt")"
  done
done
python3 - "$dir" "$pairs" <<'PY'
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
rate = lambda k: json.load(open(f"{d}/{k}.json"))["msgs_per_s"]
m = [rate(f"mqtt{i}") for i in range(1, n + 1)]
r = [rate(f"relay{i}") for i in range(1, n + 1)]
print("Mosquitto msg/s:", " ".join(f"{x:,.0f}" for x in m), f"median {statistics.median(m):,.0f}")
print("relayd msg/s:   ", " ".join(f"{x:,.0f}" for x in r), f"median {statistics.median(r):,.0f}")
print("relayd/Mosquitto per pair:", " ".join(f"{y / x:.2f}" for x, y in zip(m, r)),
      f"of medians {statistics.median(r) / statistics.median(m):.2f}")
PY

if [ -n "${SWEEP_OUT:-}" ]; then
  read -r -a sweep_args <<<"${SWEEP_ARGS:---seconds 5}"
  "$load" sweep "${sweep_args[@]}" --target "mqtt://127.0.0.1:$port" --label mosquitto --out "$SWEEP_OUT/mosquitto"
  "$load" sweep "${sweep_args[@]}" --out "$SWEEP_OUT/relayd"
  "$load" plot "$SWEEP_OUT/relayd/sweep.json" "$SWEEP_OUT/mosquitto/sweep.json" --out "$SWEEP_OUT"
fi
