#!/usr/bin/env bash
# The test command: installs dependencies, configures, builds and runs every test with ctest.
# GPU tests skip with a message where there is no GPU. Under CI (CI=true) warnings are errors.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
werror=OFF
[ -n "${CI:-}" ] && werror=ON
R1LAB_CMAKE_ARGS="-DR1LAB_WERROR=$werror ${R1LAB_CMAKE_ARGS:-}" bash scripts/build.sh
cd build
ctest --output-on-failure --parallel "${JOBS:-$(nproc)}" --timeout 600
