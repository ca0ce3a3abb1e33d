#!/usr/bin/env bash
# Builds a release `tributary` for an ARM target (or any rustup target) and
# prints where it is and how big. Installs what it needs: the rustup target,
# and for the glibc targets Debian's cross gcc as the linker.
#
#   cross/build.sh aarch64-unknown-linux-gnu
#   cross/build.sh armv7-unknown-linux-gnueabihf
#   cross/build.sh aarch64-unknown-linux-musl            # static binary
#   FEATURES=minimal cross/build.sh aarch64-unknown-linux-gnu   # no client/bench commands
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: cross/build.sh TARGET}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

case "$target" in
  aarch64-unknown-linux-gnu) apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross ;;
  armv7-unknown-linux-gnueabihf) apt_install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross ;;
esac
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

features=()
if [ "${FEATURES:-default}" = minimal ]; then
  features=(--no-default-features)
fi
cargo build --release --locked -p tributary --target "$target" "${features[@]}"
bin="target/$target/release/tributary"
size=$(stat -c %s "$bin")
echo "built $bin ($(awk "BEGIN {printf \"%.2f\", $size/1048576}") MiB, $size bytes)"
