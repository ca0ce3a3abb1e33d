#!/usr/bin/env bash
# Debian packages (cargo-deb) for amd64, arm64 and armhf: the binary, a
# hardened systemd unit (enabled, not started, on install) and a default
# /etc/tributary/tributary.toml conffile. Checks each package's metadata and
# contents after building it.
#
#   cross/package.sh                                 # all three
#   cross/package.sh aarch64-unknown-linux-gnu       # one
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
mkdir -p target/debian
for t in "${targets[@]}"; do
  if [ "$t" = x86_64-unknown-linux-gnu ]; then
    cargo build --release --locked -q -p tributary
    deb=$(cargo deb -p tributary --no-build -o target/debian/ | tail -1)
  else
    cross/build.sh "$t" >/dev/null
    deb=$(cargo deb -p tributary --target "$t" --no-build -o target/debian/ | tail -1)
  fi
  arch=$(dpkg-deb --field "$deb" Architecture)
  contents=$(dpkg-deb --contents "$deb")
  for want in ./usr/bin/tributary ./etc/tributary/tributary.toml tributary.service; do
    grep -q "$want" <<<"$contents" || { echo "$deb lacks $want" >&2; exit 1; }
  done
  # The packaged binary is the one for this architecture.
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/tributary > "target/debian/tributary-$arch"
  echo "$deb: Architecture $arch, $(file -b "target/debian/tributary-$arch" | cut -d, -f1-2)"
done
