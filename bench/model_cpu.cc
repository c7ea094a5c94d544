// CPU reference backend figures for a model directory (default: the tiny_a fixture):
//   - forward and forward+backward time of one batch,
//   - cache bytes per token, latents against full per-head K/V, for this model, the benchmark model
//     and DeepSeek-V3.
// Decoding speed is bench/rollout_cpu's. Usage: model_cpu [MODEL_DIR] [--batch B] [--seq T]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/backend.h"
#include "model/model.h"

namespace {

using r1lab::core::Tensor;
using r1lab::model::LatentCache;
using r1lab::model::ModelConfig;

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <typename F>
double best_of(int n, F f) {
  double best = 1e30;
  for (int i = 0; i < n; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, seconds(t0));
  }
  return best;
}

void cache_row(const char* name, const ModelConfig& c) {
  const double lat = static_cast<double>(LatentCache::bytes_per_token(c, 2));
  const double full = static_cast<double>(LatentCache::full_kv_bytes_per_token(c, 2));
  std::printf("| %-28s | %12.1f KB | %12.1f KB | %6.2f%% |\n", name, lat / 1024, full / 1024, 100 * lat / full);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "../shared/fixtures/hf_deepseek_v3/tiny_a";
  int64_t batch = 2, seq = 24;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--batch") && i + 1 < argc) batch = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--seq") && i + 1 < argc) seq = std::atoll(argv[++i]);
    else dir = argv[i];
  }
  auto be = r1lab::core::make_cpu_backend();
  auto loaded = r1lab::model::Model::load(dir, *be);
  if (!loaded.ok()) {
    std::fprintf(stderr, "model_cpu: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  r1lab::model::Model& m = **loaded;
  const ModelConfig& c = m.config();
  Tensor ids = Tensor::zeros({batch, seq}, r1lab::core::DType::kI32);
  for (int64_t i = 0; i < batch * seq; ++i) ids.data<int32_t>()[i] = static_cast<int32_t>((i * 7919) % c.vocab_size);

  const double fwd = best_of(5, [&] { m.forward(ids); });
  const double fwd_bwd = best_of(3, [&] {
    r1lab::model::ForwardState st;
    Tensor logits = m.forward(ids, &st);
    m.zero_grads();
    m.backward(st, logits);  // any upstream gradient: the cost is the same
  });
  std::printf("model %s on %s: batch %lld x %lld tokens\n\n", dir.c_str(), be->name().c_str(),
              static_cast<long long>(batch), static_cast<long long>(seq));
  std::printf("| step | ms | tokens/s |\n|---|---|---|\n");
  std::printf("| forward | %.2f | %.0f |\n", fwd * 1e3, batch * seq / fwd);
  std::printf("| forward + backward | %.2f | %.0f |\n\n", fwd_bwd * 1e3, batch * seq / fwd_bwd);

  ModelConfig v3;
  v3.num_hidden_layers = 61;
  v3.num_attention_heads = 128;
  v3.kv_lora_rank = 512;
  v3.qk_rope_head_dim = 64;
  v3.qk_nope_head_dim = 128;
  v3.v_head_dim = 128;
  ModelConfig b05;
  b05.num_hidden_layers = 8;
  b05.num_attention_heads = 16;
  b05.kv_lora_rank = 256;
  b05.qk_rope_head_dim = 32;
  b05.qk_nope_head_dim = 64;
  b05.v_head_dim = 64;
  std::printf("| cache per token (bf16) | MLA latents | full K/V | latent/full |\n|---|---|---|---|\n");
  cache_row("this model", c);
  cache_row("bench_moe_mla_0.5b", b05);
  cache_row("DeepSeek-V3 (61 x 128 heads)", v3);
  return 0;
}
