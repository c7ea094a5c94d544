// The CPU reference backend: plain, correct fp32 loops (OpenMP over rows where it is free to do so).
// Every GPU kernel is tested against these.
#pragma once

#include "core/backend.h"

namespace r1lab::core::cpu {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::kCpu; }
  std::string name() const override { return "cpu"; }

  Tensor zeros(const Shape& shape, DType dtype) override;
  void upload(const Tensor& host, Tensor& dst) override;
  Tensor download(const Tensor& src) override;
  void copy(const Tensor& src, Tensor& dst) override;
  void add(const Tensor& x, Tensor& y, float alpha) override;
  void fill(Tensor& t, float value) override;
  void sum_heads(const Tensor& x, Tensor& y) override;

  void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
            float beta) override;
  void gemm_batched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
                    float beta) override;
  void grouped_gemm(const Tensor& a, const Tensor& w, bool trans_w, const Tensor& offsets, Tensor& c, float beta,
                    const Tensor* a_rows) override;
  void grouped_gemm_wgrad(const Tensor& dc, const Tensor& a, const Tensor& offsets, Tensor& dw, float beta,
                          const Tensor* a_rows, const Tensor* dc_rows) override;
  void gather_rows(const Tensor& x, const Tensor& index, Tensor& out) override;

  void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                       Tensor* x_rounded) override;
  void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                        Tensor* dx_rounded = nullptr) override;
  void silu_mul_forward(const Tensor& gu, Tensor& h) override;
  void silu_mul_backward(const Tensor& dh, const Tensor& gu, Tensor& dgu, Tensor* h) override;
  void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out) override;
  void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable) override;

  void rope(Tensor& x, const Tensor& positions, const RopeTable& table, bool interleaved,
            bool inverse) override;

  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Tensor& out, Tensor& lse,
                         const Tensor* k_tail = nullptr) override;
  void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse, float scale, Tensor& dq, Tensor& dk, Tensor& dv, bool accumulate = true,
                          Tensor* dq_tail = nullptr, Tensor* dk_tail = nullptr,
                          const Tensor* k_tail = nullptr) override;
  void paged_latent_attention(const Tensor& q, const Tensor& pool, int block_size, const Tensor& block_tables,
                              const Tensor& seq_starts, const Tensor& context_lens, float scale,
                              Tensor& out) override;
  void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) override;
  void scatter_fp8_latents(const Tensor& src, int64_t r, const Tensor& rows, Tensor& pool) override;

  void moe_route(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                 Tensor& weights, Tensor& scores) override;
  void moe_route_backward(const Tensor& dweights, const Tensor& scores, const Tensor& idx,
                          const RouterConfig& cfg, Tensor& dlogits) override;
  void moe_dispatch(const Tensor& idx, int n_experts, Tensor& row_of, Tensor& token_of, Tensor& offsets) override;
  void moe_dispatch_backward(const Tensor& dxs, const Tensor& row_of, Tensor& dx, bool accumulate) override;
  void moe_combine(const Tensor& ys, const Tensor& weights, const Tensor& row_of, Tensor& out) override;
  void moe_combine_backward(const Tensor& dout, const Tensor& ys, const Tensor& weights, const Tensor& row_of,
                            Tensor& dys, Tensor& dweights) override;

  void logprobs_forward(const Tensor& logits, const Tensor& targets, Tensor& lp, Tensor& lse) override;
  void logprobs_backward(const Tensor& dlp, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                         Tensor& dlogits) override;
  void clipped_ratio_grad(const Tensor& lp, const Tensor& rows, const ClippedRatioLoss& loss, Tensor& dlp) override;
  void logit_stats(const Tensor& logits, const Tensor& lse, Tensor& entropy, Tensor& argmax) override;
  void sample_tokens(const Tensor& logits, const Tensor& spec, Tensor& tokens, Tensor& logprobs) override;

  double sum_squares(const Tensor& x, const std::vector<ParamSpan>& spans) override;
  void adamw_update(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const std::vector<ParamSpan>& spans,
                    const AdamWUpdate& u, Tensor* rounded = nullptr) override;
};

// t's values in f32: t itself, or for a bf16 operand a contiguous f32 copy (exact).
Tensor f32_values(const Tensor& t);

// A 2-D f32 view's geometry: rows, cols, row stride (the last dimension must be contiguous).
struct Rows {
  float* p;
  int64_t rows;
  int64_t cols;
  int64_t ld;
  float* row(int64_t r) const { return p + r * ld; }
};
Rows rows_of(const Tensor& t);

}  // namespace r1lab::core::cpu
