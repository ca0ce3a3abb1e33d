#!/usr/bin/env bash
# sled 0.34 on 32-bit at size (an upstream report has an assertion panic on a
# 6.5 GB database on 32-bit): an armv7 node under qemu-user takes ≥ GIB GiB of
# 8 KB events from the native load generator, is stopped and reopened, and the
# whole log is read back (counts, offsets, sampled contents) through its API.
#
#   cross/armv7-large.sh          # 1 GiB
#   GIB=2 cross/armv7-large.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${GIB:-1}
target=armv7-unknown-linux-gnueabihf
[ -n "${SKIP_BUILD:-}" ] || cross/build.sh "$target" >/dev/null
cargo build --release -q --locked -p tributary   # the native load generator
bin="target/$target/release/tributary"
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT

start() {
  TRIBUTARY_DATA_DIR="$dir" TRIBUTARY_HTTP__LISTEN=127.0.0.1:0 TRIBUTARY_LOG=warn \
    qemu-arm-static -L /usr/arm-linux-gnueabihf "$bin" edge >"$dir/out" 2>>"$dir/err" &
  pid=$!
  for _ in $(seq 600); do grep -q 'http=' "$dir/out" 2>/dev/null && break; sleep 0.1; done
  url="http://$(sed -n 's/.*http=//p' "$dir/out")"
  until curl -sf "$url/health" >/dev/null; do sleep 0.1; done
}

start
want=$((gib * 1024 * 1024 * 1024))
t0=$(date +%s)
while :; do
  size=$(du -sb "$dir/log" | cut -f1)
  [ "$size" -ge "$want" ] && break
  target/release/tributary bench http --url "$url" --topic big --partitions 2 --connections 4 \
    --batch 16 --payload 8000 --duration 20s | grep -E '^http:' || true
done
echo "wrote $(du -sh "$dir/log" | cut -f1) in $(( $(date +%s) - t0 )) s under qemu armv7"
kill -TERM "$pid"; wait "$pid"; rm -f "$dir/out"
t1=$(date +%s%N); start
echo "reopen at size under qemu armv7: $(( ($(date +%s%N) - t1) / 1000000 )) ms to healthy"
python3 - "$url" <<'PY'
import base64, json, sys, urllib.request
url = sys.argv[1]
def get(path):
    with urllib.request.urlopen(url + path, timeout=120) as r:
        return json.loads(r.read())
topic = get("/v1/topics/big")
total = 0
for p in topic["partitions"]:
    n = p["end_offset"]
    total += n
    # Every record, page by page: offsets dense, every value the generator's 8000 bytes.
    offset, seen = 0, 0
    while offset < n:
        page = get(f"/v1/topics/big/partitions/{p['partition']}/records?offset={offset}&limit=1000&format=binary")
        for r in page["records"]:
            assert r["offset"] == seen, (r["offset"], seen)
            assert len(base64.b64decode(r["value"])) == 8000, "value size"
            seen += 1
        offset = page["next_offset"]
    assert seen == n, (seen, n)
print(f"read back {total} events of 8000 B from both partitions after reopen: offsets dense, sizes intact")
PY
kill -TERM "$pid"; wait "$pid"
echo "armv7 at size: OK"
