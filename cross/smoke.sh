#!/usr/bin/env bash
# Smoke-tests a cross-built `tributary` under qemu-user: start `edge` on a temp
# data dir, create a topic, produce over HTTP (curl) and with the binary's own
# `produce`, read everything back, stop with SIGTERM (exit 0 expected), restart,
# read again, stop again. Prints start-to-ready time and RSS (of the qemu
# process, which includes the emulator's own memory).
#
#   cross/smoke.sh aarch64-unknown-linux-gnu      # builds first (cross/build.sh)
#   SKIP_BUILD=1 cross/smoke.sh armv7-unknown-linux-gnueabihf
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: cross/smoke.sh TARGET}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
for p in qemu-user-static curl python3; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -n "${SKIP_BUILD:-}" ] || cross/build.sh "$target"

case "$target" in
  aarch64-*-gnu) runner=(qemu-aarch64-static -L /usr/aarch64-linux-gnu) ;;
  aarch64-*-musl) runner=(qemu-aarch64-static) ;;
  armv7-*-gnueabihf) runner=(qemu-arm-static -L /usr/arm-linux-gnueabihf) ;;
  armv7-*-musleabihf) runner=(qemu-arm-static) ;;
  x86_64-*) runner=() ;;
  *) echo "no qemu runner known for $target" >&2; exit 2 ;;
esac
exec python3 cross/smoke.py "${runner[@]}" "target/$target/release/tributary"
