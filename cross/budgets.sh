#!/usr/bin/env bash
# Measures the edge footprint budgets and prints one line per figure:
#   binary size per target (all features, and --no-default-features),
#   start to healthy and idle RSS (x86 native; ARM under qemu-user, RSS includes qemu),
#   reopen of a 10,000,000-event log (x86 native: start to healthy on that log).
# Not a test: it reports; the README keeps the latest figures.
#
#   cross/budgets.sh                 # everything (builds ARM targets, writes 10 M events)
#   EVENTS=1000000 cross/budgets.sh  # smaller log for a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
events=${EVENTS:-10000000}
scratch=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT

mib() { awk "BEGIN {printf \"%.2f MiB\", $1/1048576}"; }

echo "== binary sizes (stripped release, LTO)"
cargo build --release -q --locked -p tributary
echo "x86_64-unknown-linux-gnu all features: $(mib "$(stat -c %s target/release/tributary)")"
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl; do
  cross/build.sh "$t" >/dev/null 2>&1 && echo "$t all features: $(mib "$(stat -c %s "target/$t/release/tributary")")"
done
cp target/release/tributary "$scratch/tributary-full"
cargo build --release -q --locked -p tributary --no-default-features
echo "x86_64-unknown-linux-gnu --no-default-features: $(mib "$(stat -c %s target/release/tributary)")"
cargo build --release -q --locked -p tributary  # leave the full binary in place

# start NAME RUNNER... BINARY: starts a node on a fresh or given dir, waits for /health.
start_node() {
  local dir=$1; shift
  mkdir -p "$dir"
  local t0; t0=$(date +%s%N)
  TRIBUTARY_DATA_DIR="$dir" TRIBUTARY_HTTP__LISTEN=127.0.0.1:0 TRIBUTARY_LOG=warn "$@" edge >"$dir/out" 2>>"$dir/err" &
  pid=$!
  until grep -q 'http=' "$dir/out" 2>/dev/null; do sleep 0.002; done
  url="http://$(sed -n 's/.*http=//p' "$dir/out")"
  until curl -sf "$url/health" >/dev/null 2>&1; do sleep 0.002; done
  ready_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
}
rss() { awk '/^VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status"; }

echo "== start to healthy, idle RSS (x86_64 native; median of 5 starts on an empty data dir)"
times=()
for i in 1 2 3 4 5; do
  start_node "$scratch/start$i" target/release/tributary
  times+=("$ready_ms"); sleep 1; idle=$(rss "$pid")
  kill -TERM "$pid"; wait "$pid"
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
echo "x86_64: start to healthy ${median} ms (all: ${times[*]}), idle RSS $idle"

for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  case $t in aarch64*) runner=(qemu-aarch64-static -L /usr/aarch64-linux-gnu) ;; *) runner=(qemu-arm-static -L /usr/arm-linux-gnueabihf) ;; esac
  [ -x "target/$t/release/tributary" ] || continue
  start_node "$scratch/$t" "${runner[@]}" "target/$t/release/tributary"
  sleep 1
  echo "$t under qemu-user: start to healthy ${ready_ms} ms (emulated), idle RSS $(rss "$pid") (qemu included)"
  kill -TERM "$pid"; wait "$pid"
done

echo "== reopen of a ${events}-event log (x86_64 native)"
start_node "$scratch/big" target/release/tributary
written=0
while [ "$written" -lt "$events" ]; do
  target/release/tributary bench http --url "$url" --connections 8 --batch 500 --payload 100 --duration 10s >/dev/null
  written=$(curl -sf "$url/v1/topics/bench" | python3 -c 'import sys,json; print(sum(p["end_offset"] for p in json.load(sys.stdin)["partitions"]))')
done
kill -TERM "$pid"; wait "$pid"
echo "log: $written events, $(du -sh "$scratch/big/log" | cut -f1) on disk"
for i in 1 2 3; do
  start_node "$scratch/big" target/release/tributary
  echo "reopen #$i: start to healthy ${ready_ms} ms, RSS $(rss "$pid")"
  kill -TERM "$pid"; wait "$pid"
done
