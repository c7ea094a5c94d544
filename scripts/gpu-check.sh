#!/usr/bin/env bash
# Every GPU test and benchmark in one go, on a machine with an NVIDIA GPU; logs and tables go to OUTDIR.
#   scripts/gpu-check.sh OUTDIR
# Environment (all optional):
#   R1LAB_BIN       the built programs (default build/bin)
#   R1LAB_FIXTURES  the Hugging Face fixtures (default ../shared/fixtures/hf_deepseek_v3; where they are
#                   missing and R1LAB_FIXTURE_GENERATOR names generate.py, they are made first, which needs
#                   torch + transformers)
#   R1LAB_BENCH     the benchmark folder with bench_moe_mla_0.5b.json and hf_baseline.py
#                   (default ../shared/bench); without torch the PyTorch baseline is skipped
#   R1LAB_GEMM      matrix-product precision for the benchmark (default bf16)
# Exit status: 0 when every test and parity check passed.
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${R1LAB_BIN:-$root/build/bin}
fixtures=${R1LAB_FIXTURES:-$root/../shared/fixtures/hf_deepseek_v3}
bench=${R1LAB_BENCH:-$root/../shared/bench}
mkdir -p "$out"
status=0
log() { echo "== $*" | tee -a "$out/summary.txt"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
log "GPU: $(tail -1 "$out/gpu.txt")"

if [[ ! -f $fixtures/tiny_a/model.safetensors && -n ${R1LAB_FIXTURE_GENERATOR:-} ]]; then
  log "making the fixtures in $fixtures"
  mkdir -p "$fixtures"
  OUT=$fixtures python3 "$R1LAB_FIXTURE_GENERATOR" > "$out/fixtures.log" 2>&1 || { log "fixture generation FAILED"; status=1; }
fi
export R1LAB_FIXTURES=$fixtures

# 1. Every op against the CPU reference, the model against the CPU and the fixtures, determinism.
"$bin/cuda_tests" > "$out/cuda_tests.log" 2>&1
rc=$?
log "cuda_tests: exit $rc, $(grep -E '^\[  (PASSED|FAILED)' "$out/cuda_tests.log" | tr '\n' ' ')"
grep -q "CUDA tests skipped" "$out/cuda_tests.log" && { log "cuda_tests SKIPPED: no usable GPU"; rc=1; }
[[ $rc == 0 ]] || status=1

# 2. The command users run.
for f in tiny_a tiny_a_hub_layout; do
  [[ -f $fixtures/$f/config.json ]] || { log "check-parity $f: no fixture at $fixtures/$f (generate.py makes tiny_a only)"; continue; }
  "$bin/r1lab" check-parity "$fixtures/$f" --device cuda > "$out/check_parity_$f.txt" 2>&1
  rc=$?
  log "r1lab check-parity $f --device cuda: exit $rc, $(tail -1 "$out/check_parity_$f.txt")"
  [[ $rc == 0 ]] || status=1
done

# 3. The training-step benchmark beside the PyTorch baseline, run now on the same GPU.
if [[ -f $bench/hf_baseline.py ]] && python3 -c "import torch, transformers" 2>/dev/null; then
  OUT=$out python3 "$bench/hf_baseline.py" > "$out/hf_baseline.log" 2>&1 || log "PyTorch baseline FAILED (see hf_baseline.log)"
fi
base=()
[[ -f $out/baseline2.json ]] && base=(--baseline "$out/baseline2.json")
"$bin/train_step" --config "$bench/bench_moe_mla_0.5b.json" --gemm "${R1LAB_GEMM:-bf16}" "${base[@]}" \
  --json "$out/train_step.json" > "$out/train_step.md" 2> "$out/train_step.log"
rc=$?
log "train_step: exit $rc"
cat "$out/train_step.md" | tee -a "$out/summary.txt"
# 4. The demo recipe end to end on the GPU (pretraining, trainer, reference and rollout worker there): it
#    must finish and raise held-out accuracy.
if "$bin/r1lab" run "$root/recipes/r1_zero_tiny.yaml" --device cuda --run-dir "$out/r1_zero_tiny_cuda" \
    > "$out/r1_zero_tiny_cuda.log" 2>&1; then
  acc=$(grep -E '^held-out accuracy:' "$out/r1_zero_tiny_cuda.log" | tail -1)
  log "r1lab run r1_zero_tiny --device cuda: $acc; $(grep -E '^time:' "$out/r1_zero_tiny_cuda.log" | tail -1)"
  if ! awk '{gsub("%", ""); exit !($NF > $(NF - 2))}' <<<"$acc"; then
    log "r1_zero_tiny on cuda: held-out accuracy did not rise"
    status=1
  fi
else
  log "r1lab run r1_zero_tiny --device cuda FAILED (see r1_zero_tiny_cuda.log)"
  status=1
fi

# 5. Publishing a new policy version to a rollout worker, the benchmark model's weights.
if [[ -x $bin/weight_sync ]]; then
  "$bin/weight_sync" --config "$bench/bench_moe_mla_0.5b.json" --device cuda --repeat 2 > "$out/weight_sync.md" 2>&1 ||
    log "weight_sync FAILED"
  cat "$out/weight_sync.md" | tee -a "$out/summary.txt"
fi
# 6. Sampling with the rollout engine on the benchmark model, beside HF generate from step 3.
if [[ -x $bin/rollout ]]; then
  "$bin/rollout" --config "$bench/bench_moe_mla_0.5b.json" "${base[@]}" > "$out/rollout.md" 2> "$out/rollout.log" ||
    { log "rollout benchmark FAILED (see rollout.log)"; status=1; }
  cat "$out/rollout.md" | tee -a "$out/summary.txt"
fi
exit $status
