// Sampling on the GPU with the rollout engine (continuous batching over the paged latent cache) for the
// benchmark model: tokens/s beside Hugging Face generate measured in the same call (its JSON result,
// written by ../shared/bench/hf_baseline.py, passed as --baseline), the time of one decode step, and
// the share it reaches of the memory-bandwidth floor: the bytes a decode step must read (every weight
// once in bf16, the latents of every running sequence) over the device bandwidth measured in this run.
// Then a per-op table of profiled decode steps. All sequences run to full length (random weights;
// prompts stay off the stop token; a sampled eos ends a sequence early and is counted as it is).
// Usage: rollout --config CONFIG.json [--batches 64,256] [--prompt 128] [--new 256] [--gemm bf16] [--step_graphs]
//                [--baseline baseline2.json] [--profile-new 16]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "bench/gpu_ceilings.h"
#include "core/cuda/cuda.h"
#include "core/latent_rows.h"
#include "model/latent_cache.h"
#include "model/model.h"
#include "nlohmann/json.hpp"
#include "rollout/engine.h"

ABSL_FLAG(std::string, config, "", "a Hugging Face DeepseekV3 config.json");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"64", "256"}), "sequences sampled together");
ABSL_FLAG(int, prompt, 128, "prompt tokens per sequence");
ABSL_FLAG(int, new_tokens, 256, "tokens sampled per sequence");
ABSL_FLAG(std::string, gemm, "bf16", "matrix products: f32, tf32, bf16 or bf16_invariant");
ABSL_FLAG(std::string, baseline, "", "the PyTorch baseline's JSON ({impl: {gen_bB_tok_per_s}})");
ABSL_FLAG(int, profile_new, 16, "tokens per sequence in the profiled run (first batch size)");
ABSL_FLAG(int, long_tail, 8192,
          "the long-tail case: 256 sequences of which 16 run to this many new tokens, the rest to --new_tokens "
          "(0: skip)");
ABSL_FLAG(std::string, latents, "auto", "the latent cache's rows: auto (bf16), f32, bf16 or fp8");
ABSL_FLAG(bool, rescore_logprobs, false,
          "logprobs from the trainer's forward over each completion once it ends (EngineOptions::rescore_logprobs)");
ABSL_FLAG(bool, step_graphs, true, "decode steps replay captured CUDA graphs (false: every step launched as it comes)");

namespace {

using Clock = std::chrono::steady_clock;
using r1lab::core::Tensor;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<r1lab::rollout::GroupRequest> requests(int batch, int prompt, int n_new, int32_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<r1lab::rollout::GroupRequest> groups(static_cast<size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    auto& g = groups[static_cast<size_t>(b)];
    for (int t = 0; t < prompt; ++t) g.prompt.push_back(static_cast<int32_t>(2 + rng() % (vocab - 2)));
    g.num_samples = 1;
    g.params.temperature = 1.0f;
    g.params.max_new_tokens = n_new;
    g.params.seed = static_cast<uint64_t>(b);
  }
  return groups;
}

r1lab::rollout::EngineOptions engine_options(int batch, int prompt, int n_new) {
  r1lab::rollout::EngineOptions o;
  o.num_blocks = 1 + int64_t{batch} * ((prompt + n_new) / o.block_size + 2);
  o.max_running = batch;
  o.max_tokens_per_step = 8192;
  o.prefix_cache = false;  // every run prefills its prompts (as Hugging Face generate does)
  o.step_graphs = absl::GetFlag(FLAGS_step_graphs);
  o.rescore_logprobs = absl::GetFlag(FLAGS_rescore_logprobs);
  o.latents = *r1lab::model::latent_format_from_name(absl::GetFlag(FLAGS_latents));  // checked in main
  return o;
}

// Sampled tokens and seconds of one engine.generate (its completions into *kept when given).
std::pair<int64_t, double> sample(r1lab::rollout::Engine& engine, const std::vector<r1lab::rollout::GroupRequest>& g,
                                  std::vector<r1lab::rollout::Completion>* kept = nullptr) {
  const auto t0 = Clock::now();
  auto out = engine.generate(g);
  const double s = since(t0);
  if (!out.ok()) {
    std::fprintf(stderr, "rollout: %s\n", std::string(out.status().message()).c_str());
    std::exit(1);
  }
  int64_t tokens = 0;
  for (const auto& c : *out) tokens += static_cast<int64_t>(c.tokens.size());
  if (kept) *kept = std::move(*out);
  return {tokens, s};
}

// The trainer's view of sampled tokens: the log-probabilities Model::forward_logprobs recomputes over
// prompt + completion (the full-sequence path GRPO's ratio uses), against those the engine returned
// while sampling: the absolute differences over the first `n` completions' tokens, sorted.
std::vector<double> logprob_gaps(r1lab::model::Model& model, const std::vector<r1lab::rollout::GroupRequest>& groups,
                                 const std::vector<r1lab::rollout::Completion>& done, int n) {
  r1lab::core::Backend& be = model.backend();
  std::vector<double> gaps;
  for (int i = 0; i < n && i < static_cast<int>(done.size()); ++i) {
    const auto& c = done[static_cast<size_t>(i)];
    const auto& prompt = groups[static_cast<size_t>(c.group)].prompt;
    std::vector<int32_t> seq(prompt.begin(), prompt.end());
    seq.insert(seq.end(), c.tokens.begin(), c.tokens.end());
    const int64_t t = static_cast<int64_t>(seq.size());
    Tensor tokens = Tensor::zeros({1, t}, r1lab::core::DType::kI32),
           next = Tensor::zeros({t}, r1lab::core::DType::kI32);
    for (int64_t j = 0; j < t; ++j) {
      tokens.data<int32_t>()[j] = seq[static_cast<size_t>(j)];
      next.data<int32_t>()[j] = j + 1 < t ? seq[static_cast<size_t>(j + 1)] : 0;
    }
    Tensor targets = be.zeros({t}, r1lab::core::DType::kI32);
    be.upload(next, targets);
    const Tensor lp = be.download(model.forward_logprobs(tokens, targets, nullptr));
    for (size_t j = 0; j < c.logprobs.size(); ++j) {
      const int64_t row = static_cast<int64_t>(prompt.size() + j) - 1;  // predicts completion token j
      gaps.push_back(std::fabs(static_cast<double>(lp.f32()[row]) - c.logprobs[j]));
    }
  }
  std::sort(gaps.begin(), gaps.end());
  return gaps;
}

// The decode step's heaviest kernels alone at the benchmark's shapes, beside the bytes they must move:
// the routed experts' two grouped products (tokens spread over the experts at random) and the paged
// latent attention (every sequence at `ctx` positions).
void decode_kernels(r1lab::core::Backend& be, const r1lab::model::ModelConfig& cfg, double bw, int ctx) {
  using r1lab::core::DType;
  using r1lab::core::Tensor;
  std::printf("\ndecode kernels alone (mean of 50 calls%s), %d positions a sequence:\n",
              be.can_capture() ? " replayed from a CUDA graph, as decode steps run them" : "", ctx);
  std::printf("| kernel | batch | us a call | GB/s | %% of bandwidth |\n|---|---|---|---|---|\n");
  const auto time = [&](const std::function<void()>& f) {
    f();  // warm: attributes set, memory pooled
    std::function<void()> run = [&] {
      for (int i = 0; i < 50; ++i) f();
    };
    if (std::function<void()> replay = be.capture(run)) run = replay;
    run();
    be.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    run();
    be.synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 50;
  };
  const auto row = [&](const char* name, int b, double s, double bytes) {
    std::printf("| %s | %d | %.1f | %.0f | %.1f%% |\n", name, b, 1e6 * s, bytes / s / 1e9,
                bw > 0 ? 100 * bytes / s / bw : 0.0);
  };
  const int64_t h = cfg.hidden_size, e = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
  const int64_t inter = cfg.moe_intermediate_size, heads = cfg.num_attention_heads;
  const int64_t r = cfg.kv_lora_rank, d = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
  std::mt19937 rng(5);
  const auto filled = [&](const r1lab::core::Shape& shape, DType dt) {
    Tensor host = Tensor::zeros(shape);
    std::normal_distribution<float> nd(0.0f, 0.5f);
    for (int64_t i = 0; i < host.numel(); ++i) host.f32()[i] = nd(rng);
    Tensor dev = be.empty(shape, DType::kF32), out = be.empty(shape, dt);
    be.upload(host, dev);
    be.copy(dev, out);
    return out;
  };
  for (int b : {64, 256}) {
    if (e > 0) {
      // Group sizes of b tokens choosing k distinct experts each, at random.
      std::vector<int64_t> counts(static_cast<size_t>(e), 0);
      for (int t = 0; t < b; ++t) {
        std::vector<int64_t> pick(static_cast<size_t>(e));
        std::iota(pick.begin(), pick.end(), 0);
        std::shuffle(pick.begin(), pick.end(), rng);
        for (int64_t j = 0; j < k; ++j) ++counts[static_cast<size_t>(pick[static_cast<size_t>(j)])];
      }
      Tensor off = Tensor::zeros({e + 1}, DType::kI64);
      for (int64_t g = 0; g < e; ++g)
        off.data<int64_t>()[g + 1] = off.data<int64_t>()[g] + counts[static_cast<size_t>(g)];
      Tensor doff = be.empty({e + 1}, DType::kI64);
      be.upload(off, doff);
      const int64_t rows = b * k;
      Tensor x = filled({rows, h}, DType::kBF16), wgu = filled({e, 2 * inter, h}, DType::kBF16);
      Tensor gu = be.empty({rows, 2 * inter}), act = filled({rows, inter}, DType::kBF16);
      Tensor wd = filled({e, h, inter}, DType::kBF16), y = be.empty({rows, h});
      row("experts gate_up", b, time([&] { be.grouped_gemm(x, wgu, true, doff, gu); }), 2.0 * e * 2 * inter * h);
      row("experts gate_up, gated (fused)", b, time([&] { be.grouped_gate_up(x, wgu, doff, act); }),
          2.0 * e * 2 * inter * h);
      row("experts down", b, time([&] { be.grouped_gemm(act, wd, true, doff, y); }), 2.0 * e * h * inter);
    }
    // Paged latent attention: b sequences of ctx positions, blocks of 16 in order.
    const int block = 16;
    const int64_t per = (ctx + block - 1) / block;
    Tensor pool = filled({b * per * block, d}, DType::kBF16);
    Tensor tables = Tensor::zeros({b, per}, DType::kI32), starts = Tensor::zeros({b + 1}, DType::kI32),
           lens = Tensor::zeros({b}, DType::kI32);
    for (int s = 0; s < b; ++s) {
      for (int64_t j = 0; j < per; ++j) tables.data<int32_t>()[s * per + j] = static_cast<int32_t>(s * per + j);
      starts.data<int32_t>()[s + 1] = s + 1;
      lens.data<int32_t>()[s] = ctx;
    }
    const auto up = [&](const Tensor& t) {
      Tensor dv = be.empty(t.shape(), t.dtype());
      be.upload(t, dv);
      return dv;
    };
    Tensor dt = up(tables), ds = up(starts), dl = up(lens);
    Tensor q = filled({b, heads, d}, DType::kF32), o = be.empty({b, heads, r}, DType::kBF16);
    row("paged latent attention", b, time([&] { be.paged_latent_attention(q, pool, block, dt, ds, dl, 0.1f, o); }),
        2.0 * b * ctx * d);
    // The same over fp8 rows (the cache's fp8 format), made from the bf16 rows' values.
    const r1lab::core::Fp8LatentRow f8{r, d - r};
    if (r1lab::model::LatentCache::resolve_dtype(cfg, be, r1lab::model::LatentFormat::kFp8).ok()) {
      Tensor rows = be.empty(pool.shape(), DType::kF32), slots = Tensor::zeros({pool.size(0)}, DType::kI32);
      be.copy(pool, rows);
      std::iota(slots.data<int32_t>(), slots.data<int32_t>() + slots.numel(), 0);
      Tensor pool8 = be.empty({pool.size(0), f8.bytes()}, DType::kU8), dslots = up(slots);
      be.scatter_fp8_latents(rows, r, dslots, pool8);
      row("paged latent attention, fp8 rows", b,
          time([&] { be.paged_latent_attention(q, pool8, block, dt, ds, dl, 0.1f, o); }), 1.0 * b * ctx * f8.bytes());
    }
    // Sampling at temperature 1 from [b, vocab] f32 logits.
    Tensor logits = filled({b, cfg.vocab_size}, DType::kF32);
    Tensor spec = Tensor::zeros({b, r1lab::core::kSampleSpecColumns});
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    for (int s = 0; s < b; ++s) {
      float* sq = spec.f32() + int64_t{s} * r1lab::core::kSampleSpecColumns;
      sq[r1lab::core::kSpecRow] = static_cast<float>(s);
      sq[r1lab::core::kSpecTemperature] = 1.0f;
      sq[r1lab::core::kSpecTopP] = 1.0f;
      sq[r1lab::core::kSpecUniform] = unit(rng);
    }
    Tensor dspec = up(spec), tok = be.empty({b}, DType::kI32), lp = be.empty({b}, DType::kF32);
    row("sample tokens", b, time([&] { be.sample_tokens(logits, dspec, tok, lp); }), 4.0 * b * cfg.vocab_size);
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto cfg = r1lab::model::ModelConfig::from_file(absl::GetFlag(FLAGS_config));
  if (!cfg.ok()) {
    std::fprintf(stderr, "rollout: %s\n", std::string(cfg.status().message()).c_str());
    return 1;
  }
  r1lab::core::cuda::Options opt;
  const std::string g = absl::GetFlag(FLAGS_gemm);
  opt.gemm = g == "f32"    ? r1lab::core::cuda::Options::GemmPrecision::kF32
             : g == "tf32" ? r1lab::core::cuda::Options::GemmPrecision::kTF32
                           : r1lab::core::cuda::Options::GemmPrecision::kBF16;
  opt.batch_invariant = g == "bf16_invariant";
  auto be = r1lab::core::cuda::make_backend(opt);
  if (!be.ok()) {
    std::fprintf(stderr, "rollout: %s\n", std::string(be.status().message()).c_str());
    return 1;
  }
  // The long-tail case runs past the benchmark config's positions: the randomly initialised model just
  // gets a longer rope table.
  cfg->max_position_embeddings = std::max<int64_t>(
      cfg->max_position_embeddings, absl::GetFlag(FLAGS_prompt) + std::max(absl::GetFlag(FLAGS_long_tail), 0) + 1);
  r1lab::model::Model model(*cfg, **be);
  model.init_random(1, 0.02f);
  const int prompt = absl::GetFlag(FLAGS_prompt), n_new = absl::GetFlag(FLAGS_new_tokens);
  const double bw = r1lab::bench::ceilings().bytes_per_s;
  const double params = static_cast<double>(model.params().buffer().numel());
  const double embed = static_cast<double>(cfg->vocab_size) * cfg->hidden_size;  // rows read, not the table
  const auto latents = r1lab::model::latent_format_from_name(absl::GetFlag(FLAGS_latents));
  const auto latent_dtype =
      latents.ok() ? r1lab::model::LatentCache::resolve_dtype(*cfg, **be, *latents) : latents.status();
  if (!latent_dtype.ok()) {
    std::fprintf(stderr, "rollout: %s\n", std::string(latent_dtype.status().message()).c_str());
    return 1;
  }
  // A token's latents over all layers, as the cache keeps them.
  const double latent_bytes =
      static_cast<double>(r1lab::model::LatentCache::row_bytes(*cfg, *latent_dtype) * cfg->num_hidden_layers);

  nlohmann::json base;
  if (!absl::GetFlag(FLAGS_baseline).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_baseline));
    nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_object())
      for (auto& [impl, r] : j.items())
        if (r.is_object()) base = r;
  }
  std::printf(
      "rollout: %s, %.0f M parameters, prompt %d, %d new tokens, gemm %s, latents %s (%.0f bytes a token a "
      "layer), decode graphs %s, memory %.0f GB/s measured\n\n",
      absl::GetFlag(FLAGS_config).c_str(), params / 1e6, prompt, n_new, g.c_str(),
      *latent_dtype == r1lab::core::DType::kU8 ? "fp8" : r1lab::core::dtype_name(*latent_dtype),
      latent_bytes / cfg->num_hidden_layers, absl::GetFlag(FLAGS_step_graphs) ? "on" : "off", bw / 1e9);
  std::printf(
      "| batch | tokens/s | HF generate tokens/s | ratio | decode step ms | host ms a step | floor ms | %% of floor "
      "| floor tokens/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  std::vector<double> lp_gaps;
  int lp_batch = 0;
  std::vector<std::string> host_lines;
  for (const std::string& bs : absl::GetFlag(FLAGS_batches)) {
    const int batch = std::atoi(bs.c_str());
    if (batch <= 0) continue;
    r1lab::rollout::Engine engine(model, engine_options(batch, prompt, n_new));
    sample(engine, requests(batch, prompt, 4, cfg->vocab_size, 99));  // warm-up
    // Prefill + one token, then the whole run: their difference is n_new - 1 decode steps.
    const auto one = sample(engine, requests(batch, prompt, 1, cfg->vocab_size, 7));
    const r1lab::rollout::EngineStats s0 = engine.stats();
    const auto groups = requests(batch, prompt, n_new, cfg->vocab_size, 7);
    std::vector<r1lab::rollout::Completion> done;
    const auto all = sample(engine, groups, &done);
    const r1lab::rollout::EngineStats s1 = engine.stats();
    if (lp_batch == 0) lp_gaps = logprob_gaps(model, groups, done, 8), lp_batch = batch;
    // The engine thread's scheduling and launching, a step of the whole run (its prefill step included).
    const double host_ms = 1e3 * (s1.host_seconds - s0.host_seconds) / std::max<int64_t>(1, s1.steps - s0.steps);
    const double tok_s = all.first / all.second;
    const double step_s = (all.second - one.second) / std::max(1, n_new - 1);
    // The floor of one decode step: every weight but the embedding table once in bf16, the batch's
    // embedding rows, and the latents of the batch at its mean context.
    const double bytes =
        2 * (params - embed) + 2.0 * batch * cfg->hidden_size + latent_bytes * batch * (prompt + n_new / 2.0);
    const double floor_s = bw > 0 ? bytes / bw : 0;
    const std::string key = "gen_b" + bs + "_tok_per_s";
    const double hf = base.is_object() && base.contains(key) ? base[key].get<double>() : 0;
    std::printf("| %d | %.0f | %s | %s | %.2f | %.2f | %.3f | %.1f%% | %.0f |\n", batch, tok_s,
                hf > 0 ? std::to_string(static_cast<int64_t>(hf)).c_str() : "-",
                hf > 0 ? (std::to_string(tok_s / hf).substr(0, 5) + "x").c_str() : "-", 1e3 * step_s, host_ms,
                1e3 * floor_s, step_s > 0 ? 100 * floor_s / step_s : 0.0, floor_s > 0 ? batch / floor_s : 0.0);
    const double per = 1e3 / std::max<int64_t>(1, s1.steps - s0.steps);
    host_lines.push_back(absl::StrFormat(
        "batch %d, ms a step: schedule %.3f, forward's host side %.3f, sample (waits for the device) %.3f, "
        "accept %.3f; %d of %d steps queued before the host took the step before's picks; rescoring %.1f ms in "
        "all over %lld tokens",
        batch, per * (s1.schedule_seconds - s0.schedule_seconds), per * (s1.launch_seconds - s0.launch_seconds),
        per * (s1.sample_seconds - s0.sample_seconds), per * (s1.accept_seconds - s0.accept_seconds),
        static_cast<int>(s1.overlapped_steps - s0.overlapped_steps), static_cast<int>(s1.steps - s0.steps),
        1e3 * (s1.rescore_seconds - s0.rescore_seconds),
        static_cast<long long>(s1.rescored_tokens - s0.rescored_tokens)));
    std::fflush(stdout);
  }
  std::printf("\n");
  for (const std::string& l : host_lines) std::printf("%s\n", l.c_str());
  decode_kernels(**be, *cfg, bw, prompt + n_new);

  // The long tail: 240 sequences of --new_tokens and 16 of --long_tail tokens in one batch. Every
  // running sequence decodes a token a step, so when the short ones end the long ones hold about
  // --new_tokens each: the tail phase makes the rest of theirs.
  if (const int tail = absl::GetFlag(FLAGS_long_tail); tail > n_new) {
    constexpr int kAll = 256, kLong = 16;
    auto groups = requests(kAll, prompt, n_new, cfg->vocab_size, 11);
    for (int i = 0; i < kLong; ++i) groups[static_cast<size_t>(i * (kAll / kLong))].params.max_new_tokens = tail;
    r1lab::rollout::EngineOptions o = engine_options(kAll, prompt, n_new);
    o.num_blocks =
        1 + int64_t{kAll} * ((prompt + n_new) / o.block_size + 2) + int64_t{kLong} * (tail / o.block_size + 2);
    r1lab::rollout::Engine engine(model, o);
    sample(engine, requests(kAll, prompt, 4, cfg->vocab_size, 99));  // warm-up
    int short_done = 0;
    int64_t tokens = 0, tail_tokens = 0;  // the long ones' tokens past n_new (a sampled eos may end one early)
    const auto t0 = Clock::now();
    double t_short = 0;
    const absl::Status st = engine.stream(groups, [&](r1lab::rollout::Completion&& c) {
      const int64_t len = static_cast<int64_t>(c.tokens.size());
      tokens += len;
      if (c.group % (kAll / kLong) == 0) {
        tail_tokens += std::max<int64_t>(0, len - n_new);
      } else if (++short_done == kAll - kLong) {
        t_short = since(t0);
      }
      return true;
    });
    const double total = since(t0);
    if (!st.ok()) {
      std::fprintf(stderr, "rollout: %s\n", std::string(st.message()).c_str());
      return 1;
    }
    const double tail_s = total - t_short;
    std::printf(
        "\nlong tail: %d sequences, %d of them to %d new tokens, the rest to %d: %.0f tokens/s overall (%.1f s); "
        "after the short ones end, %.0f tokens/s (%.1f s, %.2f ms a decode step of %d sequences)\n",
        kAll, kLong, tail, n_new, tokens / total, total, tail_s > 0 ? tail_tokens / tail_s : 0.0, tail_s,
        tail_s > 0 ? 1e3 * tail_s / (tail - n_new) : 0.0, kLong);
  }

  if (!lp_gaps.empty()) {
    const auto at = [&](double q) { return lp_gaps[static_cast<size_t>(q * (lp_gaps.size() - 1))]; };
    const auto over = std::count_if(lp_gaps.begin(), lp_gaps.end(), [](double d) { return d > 0.01; });
    std::printf(
        "\nlogprobs: sampled (batch %d) vs recomputed by the trainer's forward_logprobs over prompt + "
        "completion, %zu tokens of 8 sequences: |difference| median %.3g, p99 %.3g, max %.3g; %lld over 0.01\n",
        lp_batch, lp_gaps.size(), at(0.5), at(0.99), lp_gaps.back(), static_cast<long long>(over));
  }

  // Profiled decode steps at the first batch size: per-op time.
  const int pbatch = std::atoi(absl::GetFlag(FLAGS_batches).front().c_str());
  const int pnew = std::max(2, absl::GetFlag(FLAGS_profile_new));
  r1lab::core::cuda::Options popt = opt;
  popt.profile = true;
  auto pbe = r1lab::core::cuda::make_backend(popt);
  if (!pbe.ok() || pbatch <= 0) return 0;
  r1lab::model::Model pm(*cfg, **pbe);
  Tensor buf = pm.params().buffer();
  (*pbe)->upload((*be)->download(model.params().buffer()), buf);
  r1lab::rollout::Engine pengine(pm, engine_options(pbatch, prompt, pnew));
  sample(pengine, requests(pbatch, prompt, 4, cfg->vocab_size, 99));  // warm-up
  r1lab::core::cuda::reset_profile(**pbe);
  sample(pengine, requests(pbatch, prompt, 1, cfg->vocab_size, 7));
  const auto before = r1lab::core::cuda::profile(**pbe);
  r1lab::core::cuda::reset_profile(**pbe);
  const auto prof = sample(pengine, requests(pbatch, prompt, pnew, cfg->vocab_size, 7));
  auto ops = r1lab::core::cuda::profile(**pbe);
  // The prefill + 1 run subtracted op by op leaves pnew - 1 decode steps.
  for (auto& o : ops)
    for (const auto& b : before)
      if (b.op == o.op) o.ms -= b.ms, o.calls -= b.calls;
  std::sort(ops.begin(), ops.end(), [](const auto& a, const auto& b) { return a.ms > b.ms; });
  double total = 0;
  for (const auto& o : ops) total += o.ms;
  const double steps = pnew - 1;
  std::printf(
      "\nper op, batch %d, mean of %d decode steps (prefill subtracted; %.2f ms a step in ops, %.2f ms wall "
      "a step with the prefill run):\n",
      pbatch, pnew - 1, total / steps, 1e3 * prof.second / pnew);
  std::printf("| op | calls a step | ms a step | %% of op time | GB/s |\n|---|---|---|---|---|\n");
  for (const auto& o : ops) {
    if (o.ms <= 0) continue;
    std::printf("| %s | %.1f | %.3f | %.1f%% | %.0f |\n", o.op.c_str(), o.calls / steps, o.ms / steps,
                100 * o.ms / total, o.ms > 0 ? o.bytes / (o.ms / 1e3) / 1e9 : 0.0);
  }
  return 0;
}
