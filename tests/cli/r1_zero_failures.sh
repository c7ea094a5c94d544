#!/usr/bin/env bash
# `r1lab run` when things go wrong:
#  1. the rollout worker is killed mid-run: the run says which child died and how, exits 1, the store
#     says failed, and the reward service is not left running;
#  2. Ctrl-C (SIGINT) mid-run: the step finishes, children stop, exit 130, the store says interrupted;
#  3. a rollout device that an in-process run cannot honour: refused before anything starts.
# Usage: r1_zero_failures.sh R1LAB_BINARY SOURCE_DIR
set -uo pipefail
bin=$1
src=$2
work=$(mktemp -d)
trap 'pkill -f -- "$work" 2>/dev/null; rm -rf "$work"' EXIT
args=(pretrain.steps=30 rl.steps=100000 eval.every=0 eval.problems=8 eval.samples=1)

# Starts a run in the background; waits until its RL loop is running. Sets run_pid, worker_pid, reward_pid.
start_run() {
  local dir=$1
  "$bin" run "$src/recipes/r1_zero_tiny.yaml" --run-dir "$dir" "${args[@]}" >"$dir.log" 2>&1 &
  run_pid=$!
  for _ in $(seq 600); do
    if grep -q '^rl [0-9]' "$dir.log" 2>/dev/null; then
      worker_pid=$(sed -nE 's/.*rollout worker on [^ ]+ \(pid ([0-9]+)\).*/\1/p' "$dir.log")
      reward_pid=$(sed -nE 's/.*reward service on [^ ]+ \(pid ([0-9]+)\).*/\1/p' "$dir.log")
      return 0
    fi
    kill -0 $run_pid 2>/dev/null || { cat "$dir.log"; echo "run ended early"; exit 1; }
    sleep 0.1
  done
  cat "$dir.log"; echo "run did not reach RL"; exit 1
}

# 1. A dead worker.
start_run "$work/killed"
kill -9 "$worker_pid"
wait $run_pid
rc=$?
cat "$work/killed.log"
[[ $rc -eq 1 ]] || { echo "exit code $rc, expected 1"; exit 1; }
grep -q "the rollout worker (pid $worker_pid) was killed by signal 9" "$work/killed.log" ||
  { echo "no clear message about the dead worker"; exit 1; }
sleep 0.2
kill -0 "$reward_pid" 2>/dev/null && { echo "reward service $reward_pid left running"; exit 1; }
"$bin" report "$work/killed/run.db" | grep -q "^run r1_zero_tiny: failed" || { echo "store does not say failed"; exit 1; }

# 2. Ctrl-C.
start_run "$work/interrupted"
kill -INT $run_pid
wait $run_pid
rc=$?
cat "$work/interrupted.log"
[[ $rc -eq 130 ]] || { echo "exit code $rc, expected 130"; exit 1; }
sleep 0.2
for p in "$worker_pid" "$reward_pid"; do
  kill -0 "$p" 2>/dev/null && { echo "child $p left running"; exit 1; }
done
"$bin" report "$work/interrupted/run.db" | grep -q "^run r1_zero_tiny: interrupted" ||
  { echo "store does not say interrupted"; exit 1; }
[[ -s "$work/interrupted/policy/model.safetensors" ]] || { echo "policy not saved on interrupt"; exit 1; }

# 3. rollout_device with --in-process.
"$bin" run "$src/recipes/r1_zero_tiny.yaml" --in-process --run-dir "$work/in_process" rollout_device=cuda:1 \
  >"$work/in_process.log" 2>&1 && { echo "an in-process run took rollout_device"; exit 1; }
grep -q "rollout_device=cuda:1 needs the rollout worker as a process of its own" "$work/in_process.log" ||
  { cat "$work/in_process.log"; echo "no clear message about rollout_device"; exit 1; }
[[ -e "$work/in_process" ]] && { echo "a refused run left a run directory"; exit 1; }
echo "ok"
