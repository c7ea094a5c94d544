// Rollout engine throughput on the CPU backend against the naive loop that re-runs the full forward
// over every sequence for each new token (the baseline, measured in the same run), for several batch
// sizes of prompt groups, and the engine again with each completion's logprobs remade by the trainer's
// forward (EngineOptions::rescore_logprobs); then latent-cache bytes per token against a full per-head
// K/V cache.
// Prompts share a template (as R1 prompts do), then differ; sampling at temperature 1, eos ignored
// (it is an ordinary stop token id the prompts are kept away from), so every sequence makes --new tokens.
// Usage: rollout_cpu [MODEL_DIR] [--batches 1,16,64] [--group 8] [--prompt 32] [--new 16]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/backend.h"
#include "model/model.h"
#include "rollout/engine.h"

namespace {

using r1lab::core::Tensor;
using r1lab::model::LatentCache;
using r1lab::model::ModelConfig;

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void cache_row(const char* name, const ModelConfig& c) {
  const double lat = static_cast<double>(LatentCache::bytes_per_token(c, 2));
  const double full = static_cast<double>(LatentCache::full_kv_bytes_per_token(c, 2));
  std::printf("| %-28s | %10.1f KB | %10.1f KB | %6.2f%% |\n", name, lat / 1024, full / 1024, 100 * lat / full);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "../shared/fixtures/hf_deepseek_v3/tiny_a";
  std::vector<int> batches = {1, 16, 64};
  int group = 8, prompt_len = 32, n_new = 16;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--batches") && i + 1 < argc) {
      batches.clear();
      std::stringstream ss(argv[++i]);
      for (std::string b; std::getline(ss, b, ',');) batches.push_back(std::atoi(b.c_str()));
    } else if (!std::strcmp(argv[i], "--group") && i + 1 < argc) {
      group = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--prompt") && i + 1 < argc) {
      prompt_len = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--new") && i + 1 < argc) {
      n_new = std::atoi(argv[++i]);
    } else {
      dir = argv[i];
    }
  }
  auto be = r1lab::core::make_cpu_backend();
  auto loaded = r1lab::model::Model::load(dir, *be);
  if (!loaded.ok()) {
    std::fprintf(stderr, "rollout_cpu: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  r1lab::model::Model& m = **loaded;
  const ModelConfig& c = m.config();
  std::printf("model %s on %s; prompts of %d tokens (first %d shared), %d new tokens, group %d\n\n", dir.c_str(),
              be->name().c_str(), prompt_len, prompt_len / 2, n_new, group);
  std::printf(
      "| prompts x G | sequences | engine tok/s | naive tok/s | speedup | steps | prefix-hit tokens | engine tok/s, "
      "rescored logprobs |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (int batch : batches) {
    std::mt19937 rng(7);
    std::vector<r1lab::rollout::GroupRequest> groups(static_cast<size_t>(batch));
    for (int b = 0; b < batch; ++b) {
      auto& g = groups[static_cast<size_t>(b)];
      for (int t = 0; t < prompt_len; ++t)
        g.prompt.push_back(t < prompt_len / 2 ? 100 + t : static_cast<int32_t>(2 + rng() % (c.vocab_size - 2)));
      g.num_samples = group;
      g.params.temperature = 1.0f;
      g.params.max_new_tokens = n_new;
      g.params.seed = static_cast<uint64_t>(b);
    }
    // The engine: continuous batching, paged latent cache, shared prefill, prefix cache.
    r1lab::rollout::EngineOptions opt;
    opt.num_blocks = 1 + int64_t{batch} * group * ((prompt_len + n_new) / 16 + 2);
    r1lab::rollout::Engine engine(m, opt);
    auto t0 = std::chrono::steady_clock::now();
    auto out = engine.generate(groups);
    const double t_engine = seconds(t0);
    if (!out.ok()) {
      std::fprintf(stderr, "rollout_cpu: %s\n", std::string(out.status().message()).c_str());
      return 1;
    }
    int64_t tokens = 0;
    for (const auto& comp : *out) tokens += static_cast<int64_t>(comp.tokens.size());
    // The same with rescored logprobs (one more forward over every completion).
    r1lab::rollout::EngineOptions ropt = opt;
    ropt.rescore_logprobs = true;
    r1lab::rollout::Engine rescoring(m, ropt);
    t0 = std::chrono::steady_clock::now();
    if (auto again = rescoring.generate(groups); !again.ok()) {
      std::fprintf(stderr, "rollout_cpu: %s\n", std::string(again.status().message()).c_str());
      return 1;
    }
    const double t_rescore = seconds(t0);
    // The naive loop: all B*G sequences as one batch, the full forward over every position per token.
    const int64_t n_seq = int64_t{batch} * group;
    std::vector<std::vector<int32_t>> seqs;
    for (const auto& g : groups)
      for (int s = 0; s < group; ++s) seqs.push_back(g.prompt);
    std::vector<uint64_t> seeds;
    for (int64_t s = 0; s < n_seq; ++s)
      seeds.push_back(r1lab::rollout::sample_seed(groups[s / group].params.seed, s % group));
    t0 = std::chrono::steady_clock::now();
    for (int step = 0; step < n_new; ++step) {
      const int64_t len = static_cast<int64_t>(seqs[0].size());
      Tensor ids = Tensor::zeros({n_seq, len}, r1lab::core::DType::kI32);
      for (int64_t s = 0; s < n_seq; ++s) std::copy(seqs[s].begin(), seqs[s].end(), ids.data<int32_t>() + s * len);
      const Tensor logits = m.forward(ids);
      std::vector<r1lab::rollout::SampleRequest> picks;
      for (int64_t s = 0; s < n_seq; ++s)
        picks.push_back({(s + 1) * len - 1, &groups[s / group].params, r1lab::rollout::sample_uniform(seeds[s], step)});
      std::vector<int32_t> next;
      r1lab::rollout::sample_tokens(*be, logits, picks, &next, nullptr);
      for (int64_t s = 0; s < n_seq; ++s) seqs[s].push_back(next[s]);
    }
    const double t_naive = seconds(t0);
    const auto st = engine.stats();
    std::printf("| %d x %d | %lld | %.0f | %.0f | %.2f | %lld | %lld | %.0f |\n", batch, group,
                static_cast<long long>(n_seq), tokens / t_engine, n_seq * n_new / t_naive,
                (tokens / t_engine) / (n_seq * n_new / t_naive), static_cast<long long>(st.steps),
                static_cast<long long>(st.prefix_hit_tokens), tokens / t_rescore);
    std::fflush(stdout);
  }

  ModelConfig v3;
  v3.num_hidden_layers = 61;
  v3.num_attention_heads = 128;
  v3.kv_lora_rank = 512;
  v3.qk_rope_head_dim = 64;
  v3.qk_nope_head_dim = 128;
  v3.v_head_dim = 128;
  std::printf("\n| cache per token (bf16) | MLA latents | full K/V | latent/full |\n|---|---|---|---|\n");
  cache_row("this model", c);
  cache_row("DeepSeek-V3 (61 x 128 heads)", v3);
  return 0;
}
