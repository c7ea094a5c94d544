#!/usr/bin/env bash
# `r1lab run` end to end at CI size: pretrain_base, then GRPO with the reward service and the rollout
# worker as child processes over gRPC. The reward must rise: held-out accuracy by 5 points or more and
# the mean training reward of the last 10 steps above the first 10's. Then `r1lab report` reads the
# store and draws the plots, and no child is left behind.
# Usage: r1_zero_run.sh R1LAB_BINARY SOURCE_DIR
set -euo pipefail
bin=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run="$work/run"
if ! out=$("$bin" run "$src/recipes/r1_zero_tiny.yaml" --run-dir "$run" pretrain.steps=1000 rl.steps=40 \
    eval.every=0 eval.problems=100 2>&1); then
  echo "$out"; echo "r1lab run failed"; exit 1
fi
echo "$out"
line=$(grep '^held-out accuracy:' <<<"$out")
read -r before after < <(sed -E 's/held-out accuracy: ([0-9.]+)% -> ([0-9.]+)%/\1 \2/' <<<"$line")
awk -v b="$before" -v a="$after" 'BEGIN { exit !(a >= b + 5) }' ||
  { echo "held-out accuracy rose too little: $before% -> $after%"; exit 1; }
report=$("$bin" report "$run/run.db")
echo "$report"
grep -q "^run r1_zero_tiny: finished" <<<"$report" || { echo "store does not say finished"; exit 1; }
read -r first last < <(sed -nE 's/^mean reward: first [0-9]+ steps ([0-9.-]+), last [0-9]+ steps ([0-9.-]+)/\1 \2/p' <<<"$report")
awk -v f="$first" -v l="$last" 'BEGIN { exit !(l > f) }' || { echo "training reward did not rise: $first -> $last"; exit 1; }
for png in reward accuracy response_length; do
  [[ -s "$run/$png.png" ]] || { echo "no $png.png"; exit 1; }
done
[[ -s "$run/policy/model.safetensors" && -s "$run/base/tokenizer.json" ]] || { echo "models missing"; exit 1; }
if pgrep -f -- "$run" >/dev/null; then
  pgrep -af -- "$run"; echo "children left running"; exit 1
fi
