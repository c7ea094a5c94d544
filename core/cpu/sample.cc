// Token sampling, the reference: the cuts by sorting the vocabulary, sums in double.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/check.h"
#include "core/cpu/cpu_backend.h"

namespace r1lab::core::cpu {

void CpuBackend::sample_tokens(const Tensor& logits, const Tensor& spec, Tensor& tokens, Tensor& logprobs) {
  const Rows lr = rows_of(logits);
  CHECK(spec.dtype() == DType::kF32 && spec.is_contiguous() && spec.dim() == 2);
  CHECK_EQ(spec.size(1), kSampleSpecColumns);
  const int64_t n = spec.size(0);
  CHECK(tokens.dtype() == DType::kI32 && tokens.numel() == n && tokens.is_contiguous());
  CHECK(logprobs.dtype() == DType::kF32 && logprobs.numel() == n && logprobs.is_contiguous());
  const int64_t v = lr.cols;
  const float* sp = spec.f32();
  int32_t* tok = tokens.data<int32_t>();
  float* lp = logprobs.f32();
#pragma omp parallel for
  for (int64_t s = 0; s < n; ++s) {
    const float* q = sp + s * kSampleSpecColumns;
    const int64_t r = static_cast<int64_t>(q[kSpecRow]);
    CHECK(r >= 0 && r < lr.rows) << "sample spec " << s << " names logits row " << r;
    const float* l = lr.row(r);
    const double temperature = q[kSpecTemperature], top_p = q[kSpecTopP], min_p = q[kSpecMinP];
    const int64_t top_k = static_cast<int64_t>(q[kSpecTopK]);
    const float mx = *std::max_element(l, l + v);
    double sum = 0;
    for (int64_t j = 0; j < v; ++j) sum += std::exp(static_cast<double>(l[j]) - mx);
    const double lse = mx + std::log(sum);
    int64_t pick = std::max_element(l, l + v) - l;  // the first maximum
    if (temperature > 0) {
      std::vector<double> p(static_cast<size_t>(v));  // unnormalised, p_max = 1
      for (int64_t j = 0; j < v; ++j) p[j] = std::exp((static_cast<double>(l[j]) - mx) / temperature);
      std::vector<char> kept(static_cast<size_t>(v), 1);
      if ((top_k > 0 && top_k < v) || top_p < 1) {
        // The cuts keep a prefix of the ranking by (-logit, id).
        std::vector<int32_t> order(static_cast<size_t>(v));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
        int64_t keep = top_k > 0 ? std::min(top_k, v) : v;
        int64_t n_min_p = 0;
        while (n_min_p < keep && p[order[n_min_p]] >= min_p) ++n_min_p;
        keep = std::max<int64_t>(n_min_p, 1);
        if (top_p < 1) {
          double mass = 0, acc = 0;
          for (int64_t i = 0; i < keep; ++i) mass += p[order[i]];
          int64_t i = 0;
          while (i < keep) {
            acc += p[order[i++]];
            if (acc >= top_p * mass) break;
          }
          keep = i;
        }
        std::fill(kept.begin(), kept.end(), 0);
        for (int64_t i = 0; i < keep; ++i) kept[order[i]] = 1;
      } else {
        for (int64_t j = 0; j < v; ++j) kept[j] = p[j] >= min_p;
      }
      double total = 0;
      for (int64_t j = 0; j < v; ++j) total += kept[j] ? p[j] : 0.0;
      const double target = q[kSpecUniform] * total;
      double acc = 0;
      pick = -1;
      for (int64_t j = 0; j < v; ++j) {
        if (!kept[j]) continue;
        acc += p[j];
        pick = j;  // the last kept token when rounding leaves acc <= target to the end
        if (acc > target) break;
      }
    }
    tok[s] = static_cast<int32_t>(pick);
    lp[s] = static_cast<float>(l[pick] - lse);
  }
}

}  // namespace r1lab::core::cpu
