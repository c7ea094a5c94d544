// One full training step of the policy on the GPU (forward, token cross-entropy, backward, AdamW) for a
// model config at batch × seq random tokens: tokens/s, model FLOP utilisation, peak device memory, and
// the ratio to the PyTorch/transformers baseline measured in the same call (its JSON result, written by
// ../shared/bench/hf_baseline.py, passed as --baseline). Then a per-op table of one profiled step: time,
// share of the step, achieved TFLOP/s or GB/s and the percentage of the device's ceiling, so the next
// optimisation is obvious.
//
// Usage: train_step --config CONFIG.json [--batch 8] [--seq 1024] [--steps 10] [--warmup 3]
//                   [--gemm f32|tf32|bf16] [--baseline baseline2.json] [--json OUT.json]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/gpu_ceilings.h"
#include "core/cuda/cuda.h"
#include "model/model.h"
#include "nlohmann/json.hpp"
#include "trainer/cross_entropy.h"
#include "trainer/optimizer.h"

ABSL_FLAG(std::string, config, "", "a Hugging Face DeepseekV3 config.json");
ABSL_FLAG(int64_t, batch, 8, "sequences per step");
ABSL_FLAG(int64_t, seq, 1024, "tokens per sequence");
ABSL_FLAG(int, steps, 10, "timed steps");
ABSL_FLAG(int, warmup, 3, "untimed steps first");
ABSL_FLAG(std::string, gemm, "bf16", "matrix products: f32, tf32, bf16 or bf16_invariant");
ABSL_FLAG(std::string, baseline, "", "the PyTorch baseline's JSON ({impl: {train_tok_per_s, peak_gb}})");
ABSL_FLAG(bool, hopper_products, true,
          "grouped products on Hopper's warpgroup products where built (false: the mma.sync kernels)");
ABSL_FLAG(std::string, json, "", "also write the results here");
ABSL_FLAG(std::string, recompute, "none",
          "what the measured step keeps for backward: none (every activation), selective, experts or "
          "layers (a table of all four follows either way)");

namespace {

using r1lab::core::Tensor;
using Clock = std::chrono::steady_clock;

// Multiply-adds per token of the matrix products (the active parameters that touch each token) and of
// causal attention at mean context (seq + 1) / 2.
struct FlopCount {
  double matmul_params = 0;
  double attention_per_token = 0;
};

FlopCount count(const r1lab::model::ModelConfig& c, int64_t seq) {
  FlopCount f;
  const double h = c.hidden_size, heads = c.num_attention_heads, qk = c.qk_head_dim(), r = c.kv_lora_rank;
  double attn = c.q_lora_rank > 0 ? h * c.q_lora_rank + c.q_lora_rank * heads * qk : h * heads * qk;
  attn += h * (r + c.qk_rope_head_dim) + r * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * h;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    f.matmul_params += attn;
    if (c.is_moe_layer(l)) {
      f.matmul_params +=
          h * c.n_routed_experts + 3.0 * h * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts);
    } else {
      f.matmul_params += 3.0 * h * c.intermediate_size;
    }
  }
  f.matmul_params += h * c.vocab_size;  // lm_head
  f.attention_per_token = c.num_hidden_layers * heads * (qk + c.v_head_dim) * (seq + 1) / 2.0;
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::string why;
  if (!r1lab::core::cuda::available(&why)) {
    std::fprintf(stderr, "train_step: %s\n", why.c_str());
    return 77;
  }
  auto cfg = r1lab::model::ModelConfig::from_file(absl::GetFlag(FLAGS_config));
  if (!cfg.ok()) {
    std::fprintf(stderr, "train_step: %s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  r1lab::core::cuda::Options opt;
  const std::string g = absl::GetFlag(FLAGS_gemm);
  opt.gemm = g == "f32"    ? r1lab::core::cuda::Options::GemmPrecision::kF32
             : g == "tf32" ? r1lab::core::cuda::Options::GemmPrecision::kTF32
                           : r1lab::core::cuda::Options::GemmPrecision::kBF16;
  opt.batch_invariant = g == "bf16_invariant";
  opt.hopper_products = absl::GetFlag(FLAGS_hopper_products);
  const r1lab::bench::Ceilings ceil = r1lab::bench::ceilings();
  auto be = r1lab::core::cuda::make_backend(opt);
  if (!be.ok()) {
    std::fprintf(stderr, "train_step: %s\n", std::string(be.status().message()).c_str());
    return 1;
  }
  r1lab::core::Backend& backend = **be;
  const auto recompute = r1lab::model::recompute_from_name(absl::GetFlag(FLAGS_recompute));
  if (!recompute.ok()) {
    std::fprintf(stderr, "train_step: %s\n", std::string(recompute.status().message()).c_str());
    return 2;
  }

  // Attention alone at the benchmark's shape: the fp32 CUDA-core kernels against the tensor-core ones.
  {
    const int64_t ab = absl::GetFlag(FLAGS_batch), at = absl::GetFlag(FLAGS_seq), ah = cfg->num_attention_heads;
    const int64_t ad = cfg->qk_head_dim(), adv = cfg->v_head_dim;
    std::printf("attention alone, [%lld, %lld, %lld heads, %lld/%lld], forward + backward:\n", (long long)ab,
                (long long)at, (long long)ah, (long long)ad, (long long)adv);
    for (auto prec :
         {r1lab::core::cuda::Options::GemmPrecision::kF32, r1lab::core::cuda::Options::GemmPrecision::kBF16}) {
      r1lab::core::cuda::Options ao;
      ao.gemm = prec;
      auto abe = r1lab::core::cuda::make_backend(ao);
      r1lab::core::Backend& x = **abe;
      Tensor q = x.zeros({ab, at, ah, ad}), k = x.zeros({ab, at, ah, ad}), v = x.zeros({ab, at, ah, adv});
      Tensor o = x.zeros({ab, at, ah, adv}), l = x.zeros({ab, ah, at}), g = x.zeros({ab, at, ah, adv});
      Tensor dq = x.zeros(q.shape()), dk = x.zeros(k.shape()), dv = x.zeros(v.shape());
      x.fill(q, 0.01f);
      x.fill(k, 0.02f);
      x.fill(v, 1.0f);
      x.fill(g, 1.0f);
      auto run = [&] {
        x.attention_forward(q, k, v, 0.1f, o, l);
        x.attention_backward(g, q, k, v, o, l, 0.1f, dq, dk, dv);
      };
      run();
      x.synchronize();
      const auto a0 = Clock::now();
      for (int i = 0; i < 5; ++i) run();
      x.synchronize();
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - a0).count() / 5;
      std::printf("  %-5s %8.2f ms per layer\n",
                  prec == r1lab::core::cuda::Options::GemmPrecision::kF32 ? "fp32" : "bf16 TC", ms);
    }
  }
  // The routed experts' products alone at the benchmark's shape (tokens × top-k rows spread evenly over
  // the experts, bf16 weights): the grouped kernels beside one dense cuBLAS product of the same rows and
  // flops (the same f32 -> bf16 rounding of the activations in both). On a Hopper GPU both kinds of
  // grouped kernel: warpgroup products (wgmma) and mma.sync.
  const auto experts_alone = [&](r1lab::core::Backend& be) {
    const int64_t rows = absl::GetFlag(FLAGS_batch) * absl::GetFlag(FLAGS_seq) * cfg->num_experts_per_tok;
    const int64_t e = cfg->n_routed_experts, h = cfg->hidden_size, n2 = 2 * cfg->moe_intermediate_size;
    Tensor bounds = Tensor::zeros({e + 1}, r1lab::core::DType::kI64);
    for (int64_t g = 0; g <= e; ++g) bounds.data<int64_t>()[g] = rows * g / e;
    Tensor off = be.zeros({e + 1}, r1lab::core::DType::kI64);
    be.upload(bounds, off);
    Tensor x = be.zeros({rows, h}), y = be.zeros({rows, n2}), dw = be.zeros({e, n2, h});
    Tensor w = be.zeros({e, n2, h}, r1lab::core::DType::kBF16), wd = be.zeros({n2, h}, r1lab::core::DType::kBF16);
    Tensor x16 = be.zeros({rows, h}, r1lab::core::DType::kBF16), y16 = be.zeros({rows, n2}, r1lab::core::DType::kBF16);
    Tensor act = be.zeros({rows, n2 / 2}, r1lab::core::DType::kBF16);
    be.fill(x, 0.01f);
    be.fill(y, 0.01f);
    be.copy(x, x16);
    be.copy(y, y16);
    const auto time = [&](const auto& f) {
      f();
      be.synchronize();
      const auto a0 = Clock::now();
      for (int i = 0; i < 10; ++i) f();
      be.synchronize();
      return std::chrono::duration<double>(Clock::now() - a0).count() / 10;
    };
    const double flops = 2.0 * rows * h * n2;
    const double dense = time([&] { be.gemm(x, false, wd, true, y); });
    const double fwd = time([&] { be.grouped_gemm(x16, w, true, off, y); });
    const double gate_up = time([&] { be.grouped_gate_up(x16, w, off, act, &y16); });
    const double dgrad = time([&] { be.grouped_gemm(y16, w, false, off, x); });
    const double wgrad = time([&] { be.grouped_gemm_wgrad(y16, x16, off, dw); });
    std::printf("routed experts alone, %lld rows over %lld experts, %lld x %lld, %s (TFLOP/s):\n", (long long)rows,
                (long long)e, (long long)n2, (long long)h, be.name().c_str());
    std::printf(
        "  dense cuBLAS %.0f | grouped forward %.0f | gate_up %.0f | data gradient %.0f | weight gradient %.0f\n",
        flops / dense / 1e12, flops / fwd / 1e12, flops / gate_up / 1e12, flops / dgrad / 1e12, flops / wgrad / 1e12);
  };
  experts_alone(backend);
  if (opt.hopper_products && backend.name().find("wgmma") != std::string::npos) {
    r1lab::core::cuda::Options so = opt;
    so.hopper_products = false;
    auto sbe = r1lab::core::cuda::make_backend(so);
    if (sbe.ok()) experts_alone(**sbe);
  }
  r1lab::model::Model model(*cfg, backend);
  model.init_random(1, 0.02f);
  model.set_recompute(*recompute);
  r1lab::trainer::AdamWConfig ac;
  ac.lr = 1e-5;
  ac.weight_decay = 0.01;
  r1lab::trainer::AdamW adam(model.params(), ac);

  const int64_t b = absl::GetFlag(FLAGS_batch), t = absl::GetFlag(FLAGS_seq), m = b * t, v = cfg->vocab_size;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, v - 1);
  Tensor tokens = Tensor::zeros({b, t}, r1lab::core::DType::kI32);
  for (int64_t i = 0; i < m; ++i) tokens.data<int32_t>()[i] = tok(rng);
  // Next-token targets; the last position of each sequence is masked (as labels=input_ids does).
  Tensor targets_host = Tensor::zeros({m}, r1lab::core::DType::kI32), weights = Tensor::zeros({m});
  for (int64_t i = 0; i < m; ++i) {
    const bool last = i % t == t - 1;
    targets_host.data<int32_t>()[i] = last ? 0 : tokens.data<int32_t>()[i + 1];
    weights.f32()[i] = last ? 0.0f : 1.0f;
  }
  Tensor targets = backend.zeros({m}, r1lab::core::DType::kI32);
  backend.upload(targets_host, targets);

  double loss = 0;
  auto step = [&] {
    model.zero_grads();
    loss = r1lab::trainer::cross_entropy(model, tokens, targets, weights, /*backward=*/true);
    adam.step(model);
  };
  for (int i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) step();
  backend.synchronize();
  r1lab::core::cuda::reset_peak_memory(backend);
  const int steps = absl::GetFlag(FLAGS_steps);
  const auto t0 = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  backend.synchronize();
  const double sec = std::chrono::duration<double>(Clock::now() - t0).count() / steps;
  // Each step alone: its time to the last queued op on the host, and to the GPU's end. A host time near
  // the step time means the step waits on the host (launches, synchronisations), not on the GPU.
  std::vector<double> host_ms, step_ms_each;
  for (int i = 0; i < steps; ++i) {
    const auto s0 = Clock::now();
    step();
    host_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - s0).count());
    backend.synchronize();
    step_ms_each.push_back(std::chrono::duration<double, std::milli>(Clock::now() - s0).count());
  }
  std::sort(host_ms.begin(), host_ms.end());
  std::sort(step_ms_each.begin(), step_ms_each.end());
  std::printf("steps one at a time: %.1f ms min, %.1f ms median; host queues a step in %.1f ms (median)\n",
              step_ms_each.front(), step_ms_each[step_ms_each.size() / 2], host_ms[host_ms.size() / 2]);
  const double peak_gb = r1lab::core::cuda::peak_memory(backend) / double(1 << 30);
  const double tok_s = m / sec;
  const FlopCount fc = count(*cfg, t);
  const double flops_per_step = 6.0 * (fc.matmul_params + fc.attention_per_token) * m;
  const double mfu = ceil.bf16 > 0 ? flops_per_step / sec / ceil.bf16 : 0;

  double base_tok_s = 0, base_gb = 0;
  if (!absl::GetFlag(FLAGS_baseline).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_baseline));
    nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_object())
      for (auto& [impl, r] : j.items())
        if (r.is_object() && r.contains("train_tok_per_s")) {
          base_tok_s = r["train_tok_per_s"].get<double>();
          base_gb = r.value("peak_gb", 0.0);
        }
  }
  std::printf("train step: %s, batch %lld x %lld, %.0f M active matmul params/token, gemm %s, recompute %s\n",
              ceil.device.c_str(), static_cast<long long>(b), static_cast<long long>(t), fc.matmul_params / 1e6,
              g.c_str(), std::string(r1lab::model::recompute_name(*recompute)).c_str());
  std::printf("| | tokens/s | s/step | MFU (bf16 dense) | peak GiB | loss |\n|---|---|---|---|---|---|\n");
  std::printf("| r1lab (CUDA) | %.0f | %.4f | %.1f%% | %.2f | %.4f |\n", tok_s, sec, 100 * mfu, peak_gb, loss);
  if (base_tok_s > 0) {
    std::printf("| PyTorch + transformers (same call) | %.0f | %.4f | %.1f%% | %.2f | |\n", base_tok_s, m / base_tok_s,
                ceil.bf16 > 0 ? 100 * flops_per_step * base_tok_s / m / ceil.bf16 : 0.0, base_gb);
    std::printf("| **ratio** | **%.2fx** | | | %.2fx memory | |\n", tok_s / base_tok_s,
                base_gb > 0 ? peak_gb / base_gb : 0);
  }
  // Where the peak goes: the training state is fixed by the parameter count (f32 parameters, gradients
  // and both moments, and the products' copy of the weights); the rest is activations and workspace.
  // A bf16 model with a bf16 optimizer (the PyTorch baseline) keeps 2 + 2 + 2 · 2 bytes a parameter.
  const double params = static_cast<double>(model.params().numel()), gib = double(1 << 30);
  const bool copy = backend.weight_dtype() != r1lab::core::DType::kF32;  // Model keeps one only then
  const double state_gb =
      params * (16.0 + (copy ? static_cast<double>(r1lab::core::dtype_size(backend.weight_dtype())) : 0.0)) / gib;
  std::printf(
      "peak memory: %.2f GiB of training state (%.0f M parameters: f32 weights, gradients, AdamW m and v%s) "
      "+ %.2f GiB activations and workspace; an all-bf16 state would be %.2f GiB\n",
      state_gb, params / 1e6, copy ? ", the bf16 copy products read" : "", peak_gb - state_gb, params * 8.0 / gib);

  // What each recompute mode trades: the step's speed against its peak and the activations a forward keeps.
  {
    std::printf("\nrecompute (what a forward keeps for backward), %d steps each:\n", std::max(1, steps / 2));
    std::printf("| recompute | tokens/s | vs none | peak GiB | activations kept GiB |%s\n|---|---|---|---|---|%s\n",
                base_gb > 0 ? " vs PyTorch's peak |" : "", base_gb > 0 ? "---|" : "");
    double none_tok_s = 0;
    for (auto r : {r1lab::model::Recompute::kNone, r1lab::model::Recompute::kSelective,
                   r1lab::model::Recompute::kExperts, r1lab::model::Recompute::kLayers}) {
      model.set_recompute(r);
      double kept = 0;
      {
        r1lab::model::ForwardState st;
        model.forward_logprobs(tokens, targets, &st);
        kept = static_cast<double>(st.bytes()) / double(1 << 30);
      }
      step();
      backend.synchronize();
      r1lab::core::cuda::reset_peak_memory(backend);
      const int n = std::max(1, steps / 2);
      const auto r0 = Clock::now();
      for (int i = 0; i < n; ++i) step();
      backend.synchronize();
      const double rs = m / (std::chrono::duration<double>(Clock::now() - r0).count() / n);
      const double rpeak = r1lab::core::cuda::peak_memory(backend) / double(1 << 30);
      if (r == r1lab::model::Recompute::kNone) none_tok_s = rs;
      std::printf("| %s | %.0f | %.2fx | %.2f | %.2f |", std::string(r1lab::model::recompute_name(r)).c_str(), rs,
                  none_tok_s > 0 ? rs / none_tok_s : 0, rpeak, kept);
      if (base_gb > 0) std::printf(" %.2fx |", rpeak / base_gb);
      std::printf("\n");
    }
    model.set_recompute(*recompute);
  }

  // One profiled step: per-op time and achieved rates.
  r1lab::core::cuda::Options popt = opt;
  popt.profile = true;
  popt.profile_shapes = true;
  auto pbe = r1lab::core::cuda::make_backend(popt);
  std::vector<r1lab::core::cuda::OpTime> ops;
  r1lab::core::cuda::MemoryHigh high;  // where the profiled step held the most
  double step_ms = 0;
  {
    // The same model, weights and batch on a profiling backend.
    r1lab::model::Model pm(*cfg, **pbe);
    pm.set_recompute(*recompute);
    Tensor buf = pm.params().buffer();
    (*pbe)->upload(backend.download(model.params().buffer()), buf);
    r1lab::trainer::AdamW pa(pm.params(), ac);
    Tensor ptg = (*pbe)->zeros({m}, r1lab::core::DType::kI32);
    (*pbe)->upload(targets_host, ptg);
    auto pstep = [&] {
      pm.zero_grads();
      r1lab::trainer::cross_entropy(pm, tokens, ptg, weights, /*backward=*/true);
      pa.step(pm);
    };
    pstep();
    r1lab::core::cuda::reset_profile(**pbe);
    const auto p0 = Clock::now();
    pstep();
    (*pbe)->synchronize();
    step_ms = std::chrono::duration<double, std::milli>(Clock::now() - p0).count();
    ops = r1lab::core::cuda::profile(**pbe);
    high = r1lab::core::cuda::memory_high(**pbe);
  }
  // The dense products and the converting copies by shape, and each kind together as one row of the
  // per-op table ("gemm", "copy_convert").
  const auto by_shape = [&](const std::string& kind) {
    std::vector<r1lab::core::cuda::OpTime> shapes;
    r1lab::core::cuda::OpTime all;
    all.op = kind;
    for (auto it = ops.begin(); it != ops.end();) {
      if (it->op.rfind(kind + " ", 0) != 0) {
        ++it;
        continue;
      }
      all.calls += it->calls;
      all.ms += it->ms;
      all.flops += it->flops;
      all.bytes += it->bytes;
      shapes.push_back(*it);
      it = ops.erase(it);
    }
    if (all.calls > 0) ops.push_back(all);
    std::sort(shapes.begin(), shapes.end(), [](const auto& a, const auto& b) { return a.ms > b.ms; });
    return shapes;
  };
  const std::vector<r1lab::core::cuda::OpTime> shapes = by_shape("gemm"), converts = by_shape("copy_convert");
  std::sort(ops.begin(), ops.end(), [](const auto& a, const auto& b) { return a.ms > b.ms; });
  const double peak_f = g == "f32" ? ceil.f32 : g == "tf32" ? ceil.tf32 : ceil.bf16;
  double total = 0;
  for (const auto& o : ops) total += o.ms;
  std::printf(
      "\nper op, one profiled step (%.1f ms wall; %.1f ms in ops; memory %.0f GB/s measured, GEMM ceiling "
      "%.0f TFLOP/s):\n",
      step_ms, total, ceil.bytes_per_s / 1e9, peak_f / 1e12);
  std::printf("| op | calls | ms | %% of step | TFLOP/s | GB/s | %% of ceiling |\n|---|---|---|---|---|---|---|\n");
  nlohmann::json jops = nlohmann::json::array();
  for (const auto& o : ops) {
    const double s = o.ms / 1e3;
    const double tf = s > 0 ? o.flops / s : 0, bw = s > 0 ? o.bytes / s : 0;
    const bool compute = o.op.find("gemm") != std::string::npos;
    const bool attn = o.op.find("attention") != std::string::npos;
    const double pct = compute ? (peak_f > 0 ? tf / peak_f : 0)
                       : attn  ? ((g == "f32" ? ceil.f32 : peak_f) > 0 ? tf / (g == "f32" ? ceil.f32 : peak_f) : 0)
                               : (ceil.bytes_per_s > 0 ? bw / ceil.bytes_per_s : 0);
    std::printf("| %s | %lld | %.2f | %.1f%% | %.1f | %.0f | %.1f%% %s |\n", o.op.c_str(),
                static_cast<long long>(o.calls), o.ms, 100 * o.ms / step_ms, tf / 1e12, bw / 1e9, 100 * pct,
                compute ? "(gemm)"
                : attn  ? (g == "f32" ? "(fp32 CUDA cores)" : "(bf16 tensor cores)")
                        : "(bandwidth)");
    jops.push_back({{"op", o.op}, {"calls", o.calls}, {"ms", o.ms}, {"tflops", tf / 1e12}, {"gbps", bw / 1e9}});
  }
  if (!high.op.empty())
    std::printf(
        "memory: the profiled step held the most as %s (call %lld of the step's) began: %.2f GiB more than "
        "it started with (the state of this program's models, %.2f GiB)\n",
        high.op.c_str(), static_cast<long long>(high.call), (high.bytes - high.start) / double(1 << 30),
        high.start / double(1 << 30));
  // The dense products' 12 costliest shapes (M×N×K of C = op(A)·op(B), transposes, operand dtypes; "+="
  // adds into C). An f32 operand is rounded to bf16 inside the product's time.
  std::printf("\ndense products (cuBLAS) by shape, the costliest:\n| shape | calls | ms | TFLOP/s | %% of ceiling |\n"
              "|---|---|---|---|---|\n");
  for (size_t i = 0; i < shapes.size() && i < 12; ++i) {
    const auto& o = shapes[i];
    const double tf = o.ms > 0 ? o.flops / (o.ms / 1e3) : 0;
    std::printf("| %s | %lld | %.2f | %.1f | %.1f%% |\n", o.op.substr(5).c_str(), static_cast<long long>(o.calls), o.ms,
                tf / 1e12, peak_f > 0 ? 100 * tf / peak_f : 0);
  }
  std::printf("\ndtype conversions by shape, the costliest:\n| copy | calls | ms | GB/s | %% of bandwidth |\n"
              "|---|---|---|---|---|\n");
  for (size_t i = 0; i < converts.size() && i < 10; ++i) {
    const auto& o = converts[i];
    const double bw = o.ms > 0 ? o.bytes / (o.ms / 1e3) : 0;
    std::printf("| %s | %lld | %.2f | %.0f | %.1f%% |\n", o.op.substr(13).c_str(), static_cast<long long>(o.calls), o.ms,
                bw / 1e9, ceil.bytes_per_s > 0 ? 100 * bw / ceil.bytes_per_s : 0);
  }
  if (!absl::GetFlag(FLAGS_json).empty()) {
    nlohmann::json j = {{"device", ceil.device},
                        {"gemm", g},
                        {"batch", b},
                        {"seq", t},
                        {"tok_per_s", tok_s},
                        {"sec_per_step", sec},
                        {"mfu", mfu},
                        {"peak_gb", peak_gb},
                        {"recompute", std::string(r1lab::model::recompute_name(*recompute))},
                        {"baseline_tok_per_s", base_tok_s},
                        {"baseline_peak_gb", base_gb},
                        {"ratio", base_tok_s > 0 ? tok_s / base_tok_s : 0},
                        {"ops", jops}};
    std::ofstream(absl::GetFlag(FLAGS_json)) << j.dump(1) << "\n";
  }
  return 0;
}
