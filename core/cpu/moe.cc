// The MoE router and expert dispatch/combine of the CPU backend, forward and backward.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/policy_loss.h"

namespace r1lab::core::cpu {

// scores = sigmoid(logits) or softmax(logits); choice = scores + bias;
// groups: keep the topk_group groups by group score, other experts' choice := -inf (DeepSeek's reference
// inference code; transformers writes 0.0 instead, which agrees unless a kept expert's biased score is
// negative, where 0.0 would let an expert of a dropped group win and break group-limited routing);
// idx = top_k of choice; w = scores[idx] (/ (Σ + 1e-20) if norm_topk_prob) * routed_scaling_factor.
void CpuBackend::moe_route(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                           Tensor& weights, Tensor& scores) {
  Rows lr = rows_of(logits);
  const int64_t e = cfg.n_experts, kk = cfg.top_k;
  CHECK_EQ(lr.cols, e);
  CHECK(idx.dtype() == DType::kI32 && idx.is_contiguous() && weights.is_contiguous() && scores.is_contiguous());
  CHECK_EQ(e % cfg.n_group, 0);
  const int64_t per_group = e / cfg.n_group;
  const float* bp = bias.defined() ? bias.f32() : nullptr;
  int32_t* ip = idx.data<int32_t>();
  float* wp = weights.f32();
  float* sp = scores.f32();
  std::vector<float> choice(static_cast<size_t>(e)), gscore(static_cast<size_t>(cfg.n_group));
  std::vector<int> order(static_cast<size_t>(e)), gorder(static_cast<size_t>(cfg.n_group));
  for (int64_t m = 0; m < lr.rows; ++m) {
    const float* l = lr.row(m);
    float* s = sp + m * e;
    if (cfg.scoring == RouterConfig::Scoring::kSigmoid) {
      for (int64_t j = 0; j < e; ++j) s[j] = 1.0f / (1.0f + std::exp(-l[j]));
    } else {
      float mx = *std::max_element(l, l + e);
      double sum = 0;
      for (int64_t j = 0; j < e; ++j) sum += std::exp(static_cast<double>(l[j] - mx));
      for (int64_t j = 0; j < e; ++j) s[j] = static_cast<float>(std::exp(static_cast<double>(l[j] - mx)) / sum);
    }
    for (int64_t j = 0; j < e; ++j) choice[j] = s[j] + (bp ? bp[j] : 0.0f);
    if (cfg.method != RouterConfig::TopkMethod::kGreedy && cfg.n_group > 1) {
      for (int g = 0; g < cfg.n_group; ++g) {
        std::vector<float> in(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
        std::sort(in.begin(), in.end(), std::greater<float>());
        if (cfg.method == RouterConfig::TopkMethod::kNoauxTc) {
          gscore[g] = in[0] + (per_group > 1 ? in[1] : 0.0f);
        } else {
          gscore[g] = in[0];
        }
      }
      std::iota(gorder.begin(), gorder.end(), 0);
      std::stable_sort(gorder.begin(), gorder.end(), [&](int a, int b) { return gscore[a] > gscore[b]; });
      std::vector<bool> keep(static_cast<size_t>(cfg.n_group), false);
      for (int g = 0; g < cfg.topk_group; ++g) keep[gorder[g]] = true;
      for (int64_t j = 0; j < e; ++j)
        if (!keep[j / per_group]) choice[j] = -std::numeric_limits<float>::infinity();
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return choice[a] > choice[b]; });
    double denom = 0;
    for (int64_t k = 0; k < kk; ++k) {
      ip[m * kk + k] = order[k];
      denom += s[order[k]];
    }
    const float norm = cfg.norm_topk_prob ? static_cast<float>(denom + 1e-20) : 1.0f;
    for (int64_t k = 0; k < kk; ++k) wp[m * kk + k] = s[order[k]] / norm * cfg.routed_scaling_factor;
  }
}

// Through w_k = c·s_k / S (S = Σ_j s_j + 1e-20 when normalised, else 1):
//   ds_j = c·dw_j / S - [norm] c·Σ_k dw_k s_k / S²;  then through sigmoid or softmax.
void CpuBackend::moe_route_backward(const Tensor& dweights, const Tensor& scores, const Tensor& idx,
                                    const RouterConfig& cfg, Tensor& dlogits) {
  Rows dl = rows_of(dlogits);
  const int64_t e = cfg.n_experts, kk = cfg.top_k;
  const float* dw = dweights.f32();
  const float* sp = scores.f32();
  const int32_t* ip = idx.data<int32_t>();
  const float c = cfg.routed_scaling_factor;
  std::vector<double> ds(static_cast<size_t>(e));
  for (int64_t m = 0; m < dl.rows; ++m) {
    const float* s = sp + m * e;
    std::fill(ds.begin(), ds.end(), 0.0);
    double denom = 1.0, cross = 0.0;
    if (cfg.norm_topk_prob) {
      denom = 1e-20;
      for (int64_t k = 0; k < kk; ++k) denom += s[ip[m * kk + k]];
      for (int64_t k = 0; k < kk; ++k) cross += static_cast<double>(dw[m * kk + k]) * s[ip[m * kk + k]];
    }
    for (int64_t k = 0; k < kk; ++k) {
      const int j = ip[m * kk + k];
      ds[j] += c * dw[m * kk + k] / denom;
      if (cfg.norm_topk_prob) ds[j] -= c * cross / (denom * denom);
    }
    float* g = dl.row(m);
    if (cfg.scoring == RouterConfig::Scoring::kSigmoid) {
      for (int64_t j = 0; j < e; ++j) g[j] += static_cast<float>(ds[j] * s[j] * (1.0 - s[j]));
    } else {
      double dot = 0;
      for (int64_t j = 0; j < e; ++j) dot += ds[j] * s[j];
      for (int64_t j = 0; j < e; ++j) g[j] += static_cast<float>(s[j] * (ds[j] - dot));
    }
  }
}

// Counting sort of assignments by expert, stable in assignment order (deterministic).
void CpuBackend::moe_dispatch(const Tensor& idx, int n_experts, Tensor& row_of, Tensor& token_of,
                              Tensor& offset_tensor) {
  CHECK(idx.dtype() == DType::kI32 && idx.dim() == 2 && idx.is_contiguous()) << "moe_dispatch: idx";
  const int64_t kk = idx.size(1), n = idx.numel();
  CHECK(row_of.dtype() == DType::kI32 && row_of.is_contiguous() && row_of.numel() == n) << "moe_dispatch: row_of";
  CHECK(token_of.dtype() == DType::kI32 && token_of.is_contiguous() && token_of.numel() == n)
      << "moe_dispatch: token_of";
  const int32_t* ip = idx.data<int32_t>();
  int32_t* ro = row_of.data<int32_t>();
  int32_t* to = token_of.data<int32_t>();
  offset_tensor = Tensor::zeros({n_experts + 1}, DType::kI64);
  int64_t* offsets = offset_tensor.data<int64_t>();
  for (int64_t a = 0; a < n; ++a) {
    CHECK(ip[a] >= 0 && ip[a] < n_experts) << "expert " << ip[a] << " of " << n_experts;
    ++offsets[ip[a] + 1];
  }
  for (int e = 0; e < n_experts; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> next(offsets, offsets + n_experts);
  for (int64_t a = 0; a < n; ++a) {
    const int64_t r = next[ip[a]]++;
    ro[a] = static_cast<int32_t>(r);
    to[r] = static_cast<int32_t>(a / kk);
  }
}

void CpuBackend::gather_rows(const Tensor& x, const Tensor& index, Tensor& out) {
  CHECK(x.dtype() == out.dtype() && (x.dtype() == DType::kF32 || x.dtype() == DType::kBF16))
      << "gather_rows from " << dtype_name(x.dtype()) << " into " << dtype_name(out.dtype());
  CHECK(index.dtype() == DType::kI32 && index.is_contiguous()) << "gather_rows: index";
  CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1) << "gather_rows: rows";
  CHECK_EQ(index.numel(), out.size(0));
  CHECK_EQ(x.size(1), out.size(1));
  const int32_t* id = index.data<int32_t>();
  const size_t es = dtype_size(x.dtype()), bytes = static_cast<size_t>(x.size(1)) * es;
  for (int64_t r = 0; r < out.size(0); ++r) {
    CHECK(id[r] >= 0 && id[r] < x.size(0)) << "gather_rows: row " << id[r] << " of " << x.size(0);
    std::memcpy(static_cast<char*>(out.raw()) + r * out.stride(0) * es,
                static_cast<const char*>(x.raw()) + id[r] * x.stride(0) * es, bytes);
  }
}

void CpuBackend::moe_dispatch_backward(const Tensor& dxs, const Tensor& row_of, Tensor& dx, bool accumulate) {
  const Tensor dxs32 = f32_values(dxs);
  Rows dxsr = rows_of(dxs32), dxr = rows_of(dx);
  if (!accumulate)
    for (int64_t m = 0; m < dxr.rows; ++m) std::fill(dxr.row(m), dxr.row(m) + dxr.cols, 0.0f);
  const int32_t* ro = row_of.data<int32_t>();
  const int64_t kk = row_of.numel() / dxr.rows;
  for (int64_t a = 0; a < row_of.numel(); ++a) {
    const float* src = dxsr.row(ro[a]);
    float* dst = dxr.row(a / kk);
    for (int64_t i = 0; i < dxr.cols; ++i) dst[i] += src[i];
  }
}

void CpuBackend::moe_combine(const Tensor& ys, const Tensor& weights, const Tensor& row_of, Tensor& out) {
  const Tensor ys32 = f32_values(ys);
  Rows yr = rows_of(ys32), orr = rows_of(out);
  const int32_t* ro = row_of.data<int32_t>();
  const float* w = weights.f32();
  const int64_t kk = weights.size(1);
  for (int64_t m = 0; m < orr.rows; ++m) {
    float* o = orr.row(m);
    for (int64_t k = 0; k < kk; ++k) {
      const float* y = yr.row(ro[m * kk + k]);
      const float wk = w[m * kk + k];
      for (int64_t i = 0; i < orr.cols; ++i) o[i] += wk * y[i];
    }
  }
}

void CpuBackend::moe_combine_backward(const Tensor& dout, const Tensor& ys, const Tensor& weights,
                                      const Tensor& row_of, Tensor& dys, Tensor& dweights) {
  const Tensor ys32 = f32_values(ys);
  Rows dor = rows_of(dout), yr = rows_of(ys32), dyr = rows_of(dys);
  const int32_t* ro = row_of.data<int32_t>();
  const float* w = weights.f32();
  float* dw = dweights.f32();
  const int64_t kk = weights.size(1);
  for (int64_t m = 0; m < dor.rows; ++m) {
    const float* g = dor.row(m);
    for (int64_t k = 0; k < kk; ++k) {
      const int64_t r = ro[m * kk + k];
      const float* y = yr.row(r);
      float* dy = dyr.row(r);
      double dot = 0;
      for (int64_t i = 0; i < dor.cols; ++i) {
        dy[i] = w[m * kk + k] * g[i];
        dot += static_cast<double>(g[i]) * y[i];
      }
      dw[m * kk + k] = static_cast<float>(dot);
    }
  }
}

// lp = logit[target] - logsumexp(logits).
void CpuBackend::logprobs_forward(const Tensor& logits, const Tensor& targets, Tensor& lp, Tensor& lse) {
  Rows lr = rows_of(logits);
  const int32_t* tg = targets.data<int32_t>();
  float* out = lp.f32();
  float* ls = lse.f32();
#pragma omp parallel for
  for (int64_t m = 0; m < lr.rows; ++m) {
    const float* l = lr.row(m);
    const float mx = *std::max_element(l, l + lr.cols);
    double sum = 0;
    for (int64_t j = 0; j < lr.cols; ++j) sum += std::exp(static_cast<double>(l[j] - mx));
    ls[m] = mx + static_cast<float>(std::log(sum));
    CHECK(tg[m] >= 0 && tg[m] < lr.cols) << "target " << tg[m] << " outside vocabulary " << lr.cols;
    out[m] = l[tg[m]] - ls[m];
  }
}

void CpuBackend::logprobs_backward(const Tensor& dlp, const Tensor& logits, const Tensor& targets,
                                   const Tensor& lse, Tensor& dlogits) {
  Rows lr = rows_of(logits), dr = rows_of(dlogits);
  const int32_t* tg = targets.data<int32_t>();
  const float* g = dlp.f32();
  const float* ls = lse.f32();
#pragma omp parallel for
  for (int64_t m = 0; m < lr.rows; ++m) {
    const float* l = lr.row(m);
    float* d = dr.row(m);
    for (int64_t j = 0; j < lr.cols; ++j) d[j] = g[m] == 0.0f ? 0.0f : -(g[m] * std::exp(l[j] - ls[m]));
    if (g[m] != 0.0f) d[tg[m]] += g[m];
  }
}

void CpuBackend::clipped_ratio_grad(const Tensor& lp, const Tensor& rows, const ClippedRatioLoss& loss, Tensor& dlp) {
  const int64_t n = lp.numel();
  CHECK(lp.dtype() == DType::kF32 && lp.is_contiguous() && dlp.dtype() == DType::kF32 && dlp.is_contiguous() &&
        dlp.numel() == n)
      << "clipped_ratio_grad: lp and dlp [N] f32";
  CHECK(rows.dtype() == DType::kF32 && rows.is_contiguous() && rows.shape() == Shape({n, 4}))
      << "clipped_ratio_grad: rows " << shape_str(rows.shape()) << " for " << n << " tokens";
  const float* l = lp.f32();
  const float* r = rows.f32();
  float* d = dlp.f32();
  for (int64_t i = 0; i < n; ++i)
    d[i] = static_cast<float>(clipped_ratio_token_grad(l[i], r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3], loss));
}

void CpuBackend::logit_stats(const Tensor& logits, const Tensor& lse, Tensor& entropy, Tensor& argmax) {
  Rows lr = rows_of(logits);
  CHECK(lse.numel() == lr.rows && entropy.numel() == lr.rows && argmax.numel() == lr.rows);
  CHECK(argmax.dtype() == DType::kI32);
  const float* ls = lse.f32();
  float* h = entropy.f32();
  int32_t* am = argmax.data<int32_t>();
#pragma omp parallel for
  for (int64_t m = 0; m < lr.rows; ++m) {
    const float* l = lr.row(m);
    double mean = 0;  // Σ p_j · logits_j
    for (int64_t j = 0; j < lr.cols; ++j) mean += std::exp(static_cast<double>(l[j]) - ls[m]) * l[j];
    h[m] = static_cast<float>(ls[m] - mean);
    am[m] = static_cast<int32_t>(std::max_element(l, l + lr.cols) - l);
  }
}

}  // namespace r1lab::core::cpu
