#!/usr/bin/env bash
# The main job. Until the R1-Zero loop lands this shows the policy network and the rollout worker: it
# checks the model against the Hugging Face DeepseekV3 fixture (logits, hidden states, greedy decoding
# through the rollout engine, GRPO loss and every gradient), then starts a rollout worker on loopback and
# samples a group of completions through it over gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh > build.log 2>&1 || { tail -40 build.log; exit 1; }
fixtures=${R1LAB_FIXTURES:-../shared/fixtures/hf_deepseek_v3}
echo "== r1lab check-parity $fixtures/tiny_a"
build/bin/r1lab check-parity "$fixtures/tiny_a" | awk 'NR == 1 || NR <= 10 || /FAIL/ || /items,/'
echo
echo "== r1lab serve-rollout --model $fixtures/tiny_a --port 0   (a gRPC rollout worker on loopback)"
log=$(mktemp)
build/bin/r1lab serve-rollout --model "$fixtures/tiny_a" --port 0 >"$log" 2>&1 &
worker=$!
trap 'kill $worker 2>/dev/null || true; rm -f "$log"' EXIT
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\),.*/\1/p' "$log")
  [[ -n $port ]] && break
  sleep 0.1
done
[[ -n $port ]] || { cat "$log"; exit 1; }
cat "$log"
echo
echo "== r1lab generate --server 127.0.0.1:$port --prompt-ids 1,2,3 --num-samples 4 --max-new-tokens 16 --temperature 0.8 --seed 2"
build/bin/r1lab generate --server "127.0.0.1:$port" --prompt-ids 1,2,3 --num-samples 4 --max-new-tokens 16 \
  --temperature 0.8 --seed 2
kill -TERM $worker
wait $worker
