#!/usr/bin/env bash
# Configures and builds r1lab into build/ (Release; the program is build/bin/r1lab).
#   R1LAB_CMAKE_ARGS: extra cmake arguments (e.g. -DR1LAB_CUDA=OFF);  BUILD_DIR: another build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
# shellcheck disable=SC2086
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release ${R1LAB_CMAKE_ARGS:-} > "$build_dir.configure.log" 2>&1 ||
  { cat "$build_dir.configure.log"; exit 1; }
grep -E "r1lab:" "$build_dir.configure.log" || true
cmake --build "$build_dir" --parallel "${JOBS:-$(nproc)}" "$@"
