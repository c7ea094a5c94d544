#!/usr/bin/env bash
# The main job: R1-Zero on two CPU cores. Builds r1lab, then `r1lab run recipes/r1_zero_tiny.yaml`:
# trains a tiny DeepSeek-V3-family model (MLA + routed and shared experts) from scratch on worked
# additions in the R1 format, some with slips, so it is right only part of the time; then improves it by
# pure RL (GRPO) with the reward service and a rollout worker as child processes over gRPC on loopback.
# Ends with `held-out accuracy: B% -> A%`; the run store (SQLite) and plots are in runs/.
# Extra arguments go to `r1lab run` (key=value overrides, e.g. rl.steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh --target r1lab > build.log 2>&1 || { tail -40 build.log; exit 1; }
exec build/bin/r1lab run recipes/r1_zero_tiny.yaml "$@"
