#!/usr/bin/env bash
# r1lab serve-rollout end to end: start a worker on a free loopback port, sample through it with
# `r1lab generate --server`, compare with sampling in process, stop it with SIGTERM.
# Usage: serve_rollout.sh R1LAB_BINARY MODEL_DIR
set -euo pipefail
bin=$1
model=$2
log=$(mktemp)
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
"$bin" serve-rollout --model "$model" --port 0 --cache-mb 8 >"$log" 2>&1 &
pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\),.*/\1/p' "$log")
  [[ -n $port ]] && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "worker exited early"; exit 1; }
  sleep 0.1
done
[[ -n $port ]] || { cat "$log"; echo "worker did not start"; exit 1; }
args=(--prompt-ids 5,6,7,8 --num-samples 3 --temperature 1 --seed 11 --max-new-tokens 6)
strip() { sed 's/,"tokens_per_second":[^}]*//'; }
remote=$("$bin" generate --server "127.0.0.1:$port" "${args[@]}" | strip)
local=$("$bin" generate --model "$model" "${args[@]}" | strip)
[[ $(wc -l <<<"$remote") -eq 3 ]] || { echo "expected 3 completions: $remote"; exit 1; }
[[ $remote == "$local" ]] || { printf 'worker:\n%s\nin process:\n%s\n' "$remote" "$local"; exit 1; }
# A malformed request is refused with a message; the worker keeps serving.
if "$bin" generate --server "127.0.0.1:$port" --prompt-ids 5,99999 2>/dev/null; then
  echo "out-of-range token id accepted"; exit 1
fi
"$bin" generate --server "127.0.0.1:$port" --prompt-ids 5 --max-new-tokens 2 >/dev/null
kill -TERM $pid
wait $pid
echo "ok: worker on port $port matched in-process sampling and shut down cleanly"
