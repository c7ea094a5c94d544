#!/usr/bin/env bash
# Installs every build and test dependency of r1lab on a fresh Debian 12 machine.
# Idempotent: quiet and quick when everything is already present.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git python3
  libabsl-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libre2-dev libsqlite3-dev
  libboost-dev libboost-filesystem-dev
  libgtest-dev libgmock-dev
  libyaml-cpp-dev nlohmann-json3-dev libseccomp-dev
  libgmp-dev libicu-dev python3-grpcio python3-protobuf
  libcairo2-dev fonts-dejavu-core
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "setup: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
