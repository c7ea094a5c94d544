#!/usr/bin/env bash
# The main job. Until the R1-Zero loop lands this shows the policy network: it checks the model against
# the Hugging Face DeepseekV3 fixture (logits, hidden states, greedy decoding through the MLA latent
# cache, GRPO loss and every gradient), then samples a continuation on the CPU backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh > build.log 2>&1 || { tail -40 build.log; exit 1; }
fixtures=${R1LAB_FIXTURES:-../shared/fixtures/hf_deepseek_v3}
echo "== r1lab check-parity $fixtures/tiny_a"
build/bin/r1lab check-parity "$fixtures/tiny_a" | awk 'NR == 1 || NR <= 10 || /FAIL/ || /items,/'
echo
echo "== r1lab generate --model $fixtures/tiny_a --prompt-ids 1,2,3 --max-new-tokens 16 --temperature 0.8 --seed 2"
build/bin/r1lab generate --model "$fixtures/tiny_a" --prompt-ids 1,2,3 --max-new-tokens 16 --temperature 0.8 --seed 2
