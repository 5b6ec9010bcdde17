#!/usr/bin/env bash
# Paired comparison of two relayd builds under the same load: A B A B …, one relay-load run each, then the rates of
# every run, each build's median and the B/A ratio of each pair and of the medians. On a shared, noisy machine only
# such interleaved ratios mean anything.
#
#   tools/load/paired.sh OLD_RELAYD NEW_RELAYD PAIRS [relay-load arguments, default: online]
#   e.g. tools/load/paired.sh /tmp/old/relayd target/release/relayd 5 online --msgs 1000
#
# RELAY_LOAD selects the load tool (default: target/release/relay-load); B_ARGS, extra relay-load arguments for the
# B runs only (e.g. B_ARGS=--stream-per-send with the same relayd twice compares two protocols). Needs python3.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
a=$1 b=$2 pairs=$3
shift 3
[ $# -gt 0 ] || set -- online
load=${RELAY_LOAD:-target/release/relay-load}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq 1 "$pairs"); do
  for side in a b; do
    relayd=$a extra=()
    [ "$side" = b ] && relayd=$b && read -ra extra <<<"${B_ARGS:-}"
    "$load" "$@" "${extra[@]}" --relayd "$relayd" --json "$out/$side$i.json" >"$out/$side$i.txt" 2>&1 ||
      { cat "$out/$side$i.txt" >&2; exit 1; }
    echo "$side$i: $(tail -n 1 "$out/$side$i.txt")"
  done
done
python3 - "$out" "$pairs" <<'PY'
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
rate = lambda k: json.load(open(f"{d}/{k}.json"))["msgs_per_s"]
a = [rate(f"a{i}") for i in range(1, n + 1)]
b = [rate(f"b{i}") for i in range(1, n + 1)]
print("A msg/s:", " ".join(f"{x:,.0f}" for x in a), f"median {statistics.median(a):,.0f}")
print("B msg/s:", " ".join(f"{x:,.0f}" for x in b), f"median {statistics.median(b):,.0f}")
ratios = [y / x for x, y in zip(a, b)]
print("B/A per pair:", " ".join(f"{r:.2f}" for r in ratios), f"median {statistics.median(ratios):.2f}")
print(f"B/A of medians: {statistics.median(b) / statistics.median(a):.2f}")
PY
