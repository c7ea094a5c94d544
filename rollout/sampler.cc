#include "rollout/sampler.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "core/status_macros.h"

namespace r1lab::rollout {

absl::Status validate(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    return absl::InvalidArgumentError(absl::StrCat("temperature must be >= 0, got ", p.temperature));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  if (p.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.min_p >= 0.0f && p.min_p < 1.0f))
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1), got ", p.min_p));
  if (p.max_new_tokens <= 0)
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be positive, got ", p.max_new_tokens));
  if (p.stop_token_ids.size() > 64 || p.stop_strings.size() > 64)
    return absl::InvalidArgumentError("at most 64 stop token ids and 64 stop strings");
  for (const std::string& s : p.stop_strings)
    if (s.empty() || s.size() > 256) return absl::InvalidArgumentError("a stop string must have 1 to 256 bytes");
  return absl::OkStatus();
}

uint64_t sample_seed(uint64_t seed, int64_t index) {
  // splitmix64 of (seed, index): neighbouring seeds and indices give unrelated streams.
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(index + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

float sample_uniform(uint64_t seed, int64_t step) {
  // 24 random bits: exactly representable in the spec's f32 column.
  return static_cast<float>(sample_seed(seed, step) >> 40) * 0x1p-24f;
}

void sample_tokens(core::Backend& be, const core::Tensor& logits, const std::vector<SampleRequest>& requests,
                   std::vector<int32_t>* tokens, std::vector<float>* logprobs) {
  PendingPicks::start(be, logits, requests).take(tokens, logprobs);
}

PendingPicks PendingPicks::start(core::Backend& be, const core::Tensor& logits,
                                 const std::vector<SampleRequest>& requests) {
  PendingPicks p;
  const int64_t n = static_cast<int64_t>(requests.size());
  p.n_ = n;
  if (n == 0) return p;
  CHECK_LT(logits.size(-1), int64_t{1} << 24) << "top_k and rows travel as f32";
  core::Tensor spec = core::Tensor::empty({n, core::kSampleSpecColumns});
  for (int64_t i = 0; i < n; ++i) {
    const SampleRequest& r = requests[static_cast<size_t>(i)];
    CHECK(r.row >= 0 && r.row < logits.size(0) && r.row < (int64_t{1} << 24));
    float* q = spec.f32() + i * core::kSampleSpecColumns;
    q[core::kSpecRow] = static_cast<float>(r.row);
    q[core::kSpecTemperature] = r.params->temperature;
    q[core::kSpecTopP] = r.params->top_p;
    q[core::kSpecTopK] = static_cast<float>(std::min<int64_t>(r.params->top_k, logits.size(-1)));
    q[core::kSpecMinP] = r.params->min_p;
    q[core::kSpecUniform] = r.uniform;
  }
  core::Tensor dspec = be.empty(spec.shape(), core::DType::kF32);
  be.upload(spec, dspec);
  // The picks and their logprobs side by side in one buffer: one transfer back, one wait.
  core::Tensor out = be.empty({2 * n}, core::DType::kI32);
  core::Tensor dtok = out.slice(0, 0, n);
  core::Tensor dlp(out.storage(), out.byte_offset() + static_cast<size_t>(n) * sizeof(int32_t), {n}, {1},
                   core::DType::kF32);
  be.sample_tokens(logits, dspec, dtok, dlp);
  p.device_tokens_ = dtok;
  p.wait_ = be.download_later(out);
  return p;
}

void PendingPicks::take(std::vector<int32_t>* tokens, std::vector<float>* logprobs) {
  tokens->clear();
  if (logprobs) logprobs->clear();
  if (n_ == 0) return;
  CHECK(wait_) << "picks taken twice";
  const core::Tensor both = wait_();
  wait_ = nullptr;
  tokens->assign(both.data<int32_t>(), both.data<int32_t>() + n_);
  if (logprobs) {
    const float* lp = reinterpret_cast<const float*>(both.data<int32_t>() + n_);
    logprobs->assign(lp, lp + n_);
  }
}

}  // namespace r1lab::rollout
