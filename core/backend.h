// The op set every backend implements. The CPU backend (core/cpu) is the reference: plain fp32 loops;
// the CUDA backend (core/cuda) must match it. Shapes are in the comments; "[M, D] rows" means a 2-D view
// whose last dimension is contiguous and whose row stride may be larger than D (a slice of columns).
//
// Conventions:
//  - Forward ops overwrite their outputs. Backward ops ACCUMULATE into gradient outputs (dx += ...),
//    so residual branches and tied weights need no extra adds; callers zero gradients once.
//  - Index tensors (token ids, positions, expert ids) are I32.
//  - Shape mismatches are programmer errors (CHECK); user input is validated before it gets here.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "core/tensor.h"

namespace r1lab::core {

// The DeepSeek MoE router: which experts each token uses and with what weight.
struct RouterConfig {
  enum class Scoring { kSigmoid, kSoftmax };
  // noaux_tc (V3): group score = sum of the top-2 biased scores in the group;
  // group_limited_greedy (V2): group score = max score in the group; greedy: no groups.
  enum class TopkMethod { kNoauxTc, kGroupLimitedGreedy, kGreedy };
  Scoring scoring = Scoring::kSigmoid;
  TopkMethod method = TopkMethod::kNoauxTc;
  int n_experts = 0;
  int top_k = 0;
  int n_group = 1;
  int topk_group = 1;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};

// A run of one parameter buffer that the optimizer updates (state such as the router's correction bias
// is left out), and whether decoupled weight decay applies to it.
struct ParamSpan {
  int64_t offset = 0;
  int64_t numel = 0;
  bool decay = false;
};

// One AdamW update: with g = grad_scale · grad,  m = b1·m + (1-b1)·g,  v = b2·v + (1-b2)·g²,
//   w -= lr·wd·w (decay spans),  w -= lr · (m / c1) / (sqrt(v / c2) + eps).
struct AdamWUpdate {
  double lr = 0, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0;
  double bias_correction1 = 1, bias_correction2 = 1;  // c1 = 1 - b1^t, c2 = 1 - b2^t
  double grad_scale = 1;
};

// The clipped-ratio policy loss of Backend::clipped_ratio_grad.
struct ClippedRatioLoss {
  double eps_low = 0.2, eps_high = 0.2, kl_beta = 0;
  bool ratio_one = false;
};

// cos/sin of every position: [max_positions, rope_dim/2], any YaRN attention factor folded in.
struct RopeTable {
  Tensor cos;
  Tensor sin;
};

// The columns of a sample_tokens spec row.
enum SampleSpecColumn : int { kSpecRow, kSpecTemperature, kSpecTopP, kSpecTopK, kSpecMinP, kSpecUniform, kSampleSpecColumns };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // The dtype this backend's matrix products round their operands to. A model may keep a copy of its
  // matrix weights in it; gemm and grouped_gemm then take those as they are (the same products, without
  // a conversion of the weights in every call).
  virtual DType weight_dtype() const { return DType::kF32; }

  // ---- memory
  // A zero-filled contiguous tensor on this backend's device.
  virtual Tensor zeros(const Shape& shape, DType dtype = DType::kF32) = 0;
  // A contiguous tensor whose contents are unspecified, for an output the next op writes whole (forward
  // ops write every element; a product with beta 0): no clearing pass. The CPU reference clears anyway;
  // CUDA with Options::poison_empty fills it with NaN bytes, so that a read before the write shows.
  virtual Tensor empty(const Shape& shape, DType dtype = DType::kF32) { return zeros(shape, dtype); }
  // Copies between a host tensor and a tensor of this backend (same shape and dtype, contiguous).
  virtual void upload(const Tensor& host, Tensor& dst) = 0;
  virtual Tensor download(const Tensor& src) = 0;
  // A copy to the host in order with the work queued so far; the returned function waits for it (not
  // for work queued after it) and gives the host tensor, so the caller may queue more first. This
  // default copies at once.
  virtual std::function<Tensor()> download_later(const Tensor& src) {
    Tensor host = download(src);
    return [host] { return host; };
  }
  // dst = src, any strides, same shape (up to 4 dimensions); f32 to bf16 rounds to nearest even, bf16 to
  // f32 is exact.
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  // y += alpha * x, any strides, same shape (up to 4 dimensions).
  virtual void add(const Tensor& x, Tensor& y, float alpha = 1.0f) = 0;
  // t = value (contiguous).
  virtual void fill(Tensor& t, float value) = 0;
  // y[m, 0, :] += Σ_h x[m, h, :], heads in order (x [M, H, D] and y [M, 1, D] f32, last dims contiguous):
  // a gradient that several heads share.
  virtual void sum_heads(const Tensor& x, Tensor& y) = 0;

  // ---- matrix products
  // c = alpha * op(a) · op(b) + beta * c, op(x) = x or xᵀ. a: [m, k] rows ([k, m] if trans_a),
  // b: [k, n] rows ([n, k] if trans_b), c: [m, n] rows, f32, or bf16 with beta 0 (the f32 result rounded
  // once: a result only bf16 products or bf16-reading ops take next).
  virtual void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c,
                    float alpha = 1.0f, float beta = 0.0f) = 0;
  // c[i] = alpha · op(a[i]) · op(b[i]) + beta · c[i] for every i of the leading dimension of 3-D views
  // whose last dimension is contiguous (any strides on the first two): a [B, m, k] ([B, k, m] if trans_a),
  // b [B, k, n] ([B, n, k] if trans_b), c [B, m, n] f32, or bf16 (rounded once: a result only bf16
  // products read).
  virtual void gemm_batched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c,
                            float alpha = 1.0f, float beta = 0.0f) = 0;
  // One launch over all groups (experts). For group g, rows r in [offsets[g], offsets[g+1]):
  //   c[r] = a[r] · op(w[g]) + beta * c[r];   a: [R, k], w: [G, n, k] (trans_w) or [G, k, n], c: [R, n];
  // a and w f32 or bf16; c f32, or bf16 with beta 0 (the f32 sums rounded once: rows only bf16 products
  // or bf16-reading ops take next).
  // offsets: [G + 1] I64 on this backend's device (as moe_dispatch makes them), ascending within [0, R];
  // rows outside every group are left as they are.
  // a_rows (here and in grouped_gate_up and grouped_gemm_wgrad; null: a's rows in order): I32 [R] on the
  // device, row r of the product's a is a[a_rows[r]] (a of any number of rows): the experts read their
  // tokens' rows where they lie (moe_dispatch's token_of) instead of from a sorted copy.
  virtual void grouped_gemm(const Tensor& a, const Tensor& w, bool trans_w, const Tensor& offsets, Tensor& c,
                            float beta = 0.0f, const Tensor* a_rows = nullptr) = 0;
  // Weight gradient of grouped_gemm with trans_w: dw[g] = beta · dw[g] + dc[rows_g]ᵀ · a[rows_g];
  //   dc: [R, n] and a: [R, k] (or their rows by dc_rows and a_rows) f32 or bf16, dw: [G, n, k] f32; beta
  //   1 (add) or 0 (overwrite: the old values are not read, and a group without rows gets zeros).
  virtual void grouped_gemm_wgrad(const Tensor& dc, const Tensor& a, const Tensor& offsets, Tensor& dw,
                                  float beta = 1.0f, const Tensor* a_rows = nullptr,
                                  const Tensor* dc_rows = nullptr) = 0;
  // out[r] = x[index[r]]: x and out f32 or bf16 (the same), index I32 [R] on the device, every entry a row
  // of x. What a grouped product's a_rows mean, made into a matrix (for kernels that read rows in order).
  virtual void gather_rows(const Tensor& x, const Tensor& index, Tensor& out) = 0;
  // a's rows by a_rows (null: a itself), as a matrix of a_rows' length.
  Tensor rows_in_order(const Tensor& a, const Tensor* a_rows) {
    if (a_rows == nullptr) return a;
    Tensor out = empty({a_rows->numel(), a.size(1)}, a.dtype());
    gather_rows(a, *a_rows, out);
    return out;
  }
  // h[r] = silu(a[r] · w_gate[g]ᵀ) * (a[r] · w_up[g]ᵀ) for the rows r of group g, where w [G, 2n, k]
  // stacks each group's n gate rows over its n up rows and h [R, n] is bf16: grouped_gemm (trans_w)
  // then silu_mul_forward, without the [R, 2n] f32 products. With gate_up ([R, 2n] bf16) those products
  // are also written there, rounded (what silu_mul_backward reads when a backward follows), and h is made
  // from them as rounded (what silu_mul_forward of gate_up gives a backward that remakes h). Rows outside
  // every group are unspecified. This default is the reference; a backend may fuse it.
  virtual void grouped_gate_up(const Tensor& a, const Tensor& w, const Tensor& offsets, Tensor& h,
                               Tensor* gate_up = nullptr, const Tensor* a_rows = nullptr) {
    Tensor gu = empty({h.size(0), w.size(1)});
    grouped_gemm(a, w, true, offsets, gu, 0.0f, a_rows);
    if (gate_up == nullptr) {
      silu_mul_forward(gu, h);
    } else {  // h from the products as gate_up holds them (what backward reads)
      copy(gu, *gate_up);
      silu_mul_forward(*gate_up, h);
    }
  }
  // The routed experts' backward from their down product to their gate and up products: dh = dc · w[g]
  // for the rows of group g (grouped_gemm without trans_w: dc [R, k] or its rows by dc_rows, w [G, k, n]),
  // rounded to dgu's dtype, then dgu = silu_mul_backward(dh, gate_up) ([R, 2n], gate_up [R, 2n] in dgu's
  // dtype), without dh in memory. Rows outside every group are unspecified.
  // With scale (the combine's weight of each row's output, [R] f32; dscale and scaled_act given too), dc
  // is the gradient of the combine's output, so the rows' own gradient is scale[r] · dh[r]:
  //   dgu       = silu_mul_backward(scale[r] · dh[r] rounded to dgu's dtype, gate_up)
  //   dscale[r] = dh[r] · act[r]           ([R] f32: the weights' gradient, dh in f32)
  //   scaled_act[r] = scale[r] · act[r]    ([R, n] in dgu's dtype: what the down product's weight gradient
  //                                         reads, dc's rows being unscaled)
  // where act = silu_mul_forward(gate_up) (the rows' gated activation, remade). So backward needs neither
  // the experts' outputs nor their activations. This default is the reference; a backend may fuse it.
  virtual void grouped_silu_backward(const Tensor& dc, const Tensor& w, const Tensor& offsets, const Tensor& gate_up,
                                     Tensor& dgu, const Tensor* dc_rows = nullptr, const Tensor* scale = nullptr,
                                     Tensor* dscale = nullptr, Tensor* scaled_act = nullptr) {
    const Tensor d = rows_in_order(dc, dc_rows);
    const int64_t rows = d.size(0), n = w.size(2);
    if (scale == nullptr) {
      Tensor dh = empty({rows, n}, dgu.dtype());
      grouped_gemm(d, w, false, offsets, dh);
      silu_mul_backward(dh, gate_up, dgu);
      return;
    }
    Tensor dh = empty({rows, n}), act = empty({rows, n}, dgu.dtype()), act32 = empty({rows, n});
    Tensor dact = empty({rows, n}, dgu.dtype()), unused = empty({rows, 1});
    grouped_gemm(d, w, false, offsets, dh);
    silu_mul_forward(gate_up, act);
    copy(act, act32);
    // Each row its own combine of one pick: the combine's backward scales it and takes the dot.
    Tensor ident_host = Tensor::zeros({rows}, DType::kI32), ident = empty({rows}, DType::kI32);
    for (int64_t r = 0; r < rows; ++r) ident_host.data<int32_t>()[r] = static_cast<int32_t>(r);
    upload(ident_host, ident);
    const Tensor s = scale->view({rows, 1});
    Tensor ds = dscale->view({rows, 1});
    moe_combine_backward(dh, act, s, ident, dact, ds);
    moe_combine_backward(act32, act, s, ident, *scaled_act, unused);
    silu_mul_backward(dact, gate_up, dgu);
  }
  // Checks group bounds read on the host, o[0 .. groups]: ascending within [0, rows].
  static void check_group_bounds(const int64_t* o, int64_t groups, int64_t rows) {
    CHECK(o[0] >= 0 && o[groups] <= rows) << "group offsets outside [0, " << rows << "]";
    for (int64_t g = 0; g < groups; ++g) CHECK_LE(o[g], o[g + 1]) << "group offsets must ascend";
  }

  // ---- normalisation, activations, embeddings
  // y = x / sqrt(mean(x²) + eps) * w;  x, y: [M, D] rows, w: [D], rstd: [M] saved for backward.
  // y in x's dtype, or bf16 (rounded once: an input only bf16 products read). x_rounded (optional, bf16
  // [M, D], x f32): x rounded there too, in the same pass (what a backward that reads x in bf16 keeps).
  virtual void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                               Tensor* x_rounded = nullptr) = 0;
  // h += x, then y = rmsnorm(h) as above (h f32): a layer's residual add and the next norm in one pass;
  // h_rounded (optional) as rmsnorm_forward's x_rounded, of the new h. This default is the reference; a
  // backend may fuse it.
  virtual void add_rmsnorm_forward(const Tensor& x, Tensor& h, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                                   Tensor* h_rounded = nullptr) {
    add(x, h);
    rmsnorm_forward(h, w, eps, y, rstd, h_rounded);
  }
  // dx += ∂/∂x, dw += ∂/∂w; x in dy's and dx's dtype, or bf16 (the forward's input rounded, as
  // rmsnorm_forward's x_rounded keeps it). dx_rounded (optional, bf16 [rows, d] with dx f32): the new dx
  // also rounded into it, in the same pass (a gradient that bf16 products read next).
  virtual void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,
                                Tensor& dw, Tensor* dx_rounded = nullptr) = 0;
  // h = silu(g) * u where gu = [g | u]: gu [M, 2I] rows, h [M, I] rows, in gu's dtype or bf16.
  virtual void silu_mul_forward(const Tensor& gu, Tensor& h) = 0;
  // dgu = [dg | du] = [dh·u·silu'(g) | dh·silu(g)], written (not accumulated): f32, or bf16 (rounded
  // once: a gradient that only bf16 products read). dh in gu's dtype, or f32 with a bf16 gu
  // (products kept rounded for backward: grouped_gate_up's gate_up).
  // h (optional, [M, I] in gu's dtype): silu_mul_forward(gu, h) too, in the same pass (a backward that
  // remakes the gated activation where it needs it).
  virtual void silu_mul_backward(const Tensor& dh, const Tensor& gu, Tensor& dgu, Tensor* h = nullptr) = 0;
  // out[m] = table[ids[m]];  table [V, D], ids [M] I32, out [M, D].
  virtual void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out) = 0;
  virtual void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable) = 0;

  // ---- rotary embedding, in place on x [M, H, D] (last dim contiguous), positions [M] I32.
  // interleaved: rotates pairs (2i, 2i+1) by angle i; else pairs (i, i + D/2) (rotate_half).
  // inverse rotates by the negative angle with the same table: the transpose of the forward rotation
  // (not its inverse when a YaRN attention factor scales cos/sin), which is what backward needs.
  virtual void rope(Tensor& x, const Tensor& positions, const RopeTable& table, bool interleaved,
                    bool inverse) = 0;
  // x = src rotated (inverse: by the negative angle, as rope): a copy and rope in one pass; src f32, x
  // f32 or bf16 (the f32 result rounded once: an operand only bf16 products read). This default is the
  // reference.
  virtual void rope_from(const Tensor& src, Tensor& x, const Tensor& positions, const RopeTable& table,
                         bool interleaved, bool inverse = false) {
    Tensor f = x.dtype() == DType::kF32 ? x : empty(x.shape());
    copy(src, f);
    rope(f, positions, table, interleaved, inverse);
    if (x.dtype() != DType::kF32) copy(f, x);
  }

  // ---- causal softmax attention (multi-query when Hk < Hq: head h reads kv head h / (Hq/Hk)).
  // q [B, T, Hq, D], k [B, S, Hk, D], v [B, S, Hk, Dv], out [B, T, Hq, Dv], lse [B, Hq, T].
  // Query t sits at position S - T + t and sees keys 0 .. S - T + t. q, k, v f32 or bf16 (values as
  // bf16 products would round them: with those, attention reads them rounded anyway); out f32, or bf16
  // (the f32 result rounded once: an output only bf16 products read), and backward reads it as it is;
  // the rest f32; backward accumulates into dq, dk, dv, or (accumulate false) overwrites them without
  // reading them; an overwritten dv may be bf16 (the f32 result rounded once: a gradient only bf16
  // products read). An overwritten dq may also go in two parts, where its columns go two ways (MLA: the
  // nope part into a bf16 product operand, the rope part on through the inverse rope): with dq_tail,
  // dq [B, T, Hq, Dh] takes each head's first Dh columns (0 < Dh < D), f32 or bf16 (rounded once), and
  // dq_tail [B, T, Hq, D - Dh] (f32) the rest; dk and dk_tail likewise. The keys may come in two parts too
  // (MLA: each head's nope part lies in the kv product, and all heads share one rope key): with k_tail,
  // k [B, S, Hk, Dk] holds each head's first Dk columns and k_tail
  // [B, S, Hk, D - Dk] (k's dtype; any strides: an expanded view gives every head the same row) the rest.
  virtual void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Tensor& out,
                                 Tensor& lse, const Tensor* k_tail = nullptr) = 0;
  virtual void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, float scale, Tensor& dq, Tensor& dk, Tensor& dv,
                                  bool accumulate = true, Tensor* dq_tail = nullptr, Tensor* dk_tail = nullptr,
                                  const Tensor* k_tail = nullptr) = 0;

  // ---- MLA attention in latent space over a paged cache (the rollout engine's decode and prefill).
  // The cache is a pool of fixed-size blocks; row p of sequence s lives at pool row
  // block_tables[s, p / block_size] * block_size + p % block_size. Every query head attends to one
  // shared latent "head": key = the whole row [c | k_pe], value = its first dv values (c).
  //   q [N, H, D] (the new tokens of all sequences, sequence by sequence), pool [R, D] rows,
  //   seq_starts [S + 1] I32 (sequence s owns q rows seq_starts[s] .. seq_starts[s+1] - 1),
  //   context_lens [S] I32 (tokens of s in the cache, new ones included: its new token i of n sits at
  //   position context_len - n + i and sees positions 0 .. that), block_tables [S, max_blocks] I32,
  //   out [N, H, dv]. The pool is f32, or bf16 (a cache at half the bytes; on CUDA then D % 16 == 0 and
  //   dv is 64, 128, 256 or 512, and the scores and weighted sums run on tensor cores with q and the softmax weights
  //   rounded to bf16), or U8: fp8 rows (core/latent_rows.h) of Fp8LatentRow{dv, D - dv}, attended as their
  //   dequantised values, as a bf16 pool is. out is f32, or with a bf16 or fp8 pool bf16 (rounded once, for
  //   the bf16 product after it).
  virtual void paged_latent_attention(const Tensor& q, const Tensor& pool, int block_size,
                                      const Tensor& block_tables, const Tensor& seq_starts,
                                      const Tensor& context_lens, float scale, Tensor& out) = 0;
  // dst[rows[i]] = src[i];  src [N, D] rows, rows [N] I32 (distinct), dst [R, D] rows (f32, or bf16:
  // rounded to nearest even).
  virtual void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) = 0;
  // pool[rows[i]] = src[i] as an fp8 latent row (core/latent_rows.h): src [N, r + rd] f32 rows (the
  // latent c, then the rope key), rows [N] I32 (distinct), pool [R, Fp8LatentRow{r, rd}.bytes()] U8.
  virtual void scatter_fp8_latents(const Tensor& src, int64_t r, const Tensor& rows, Tensor& pool) = 0;
  // The new rows of a latent cache in one pass: pool[slots[i]] = [rmsnorm(ckv[i, :r]) · w | rope(ckv[i, r:])]
  // for ckv [N, r + rope] (the latent and the shared rope key), w [r], positions and slots [N] I32; the
  // pool f32, bf16, or U8 (fp8 rows). This default, rmsnorm_forward, rope_from and scatter_rows (or
  // scatter_fp8_latents) one after another, is the reference.
  virtual void store_latents(const Tensor& ckv, const Tensor& w, float eps, const Tensor& positions,
                             const RopeTable& table, bool interleaved, const Tensor& slots, Tensor& pool) {
    const int64_t n = ckv.size(0), r = w.numel(), rd = ckv.size(1) - r;
    Tensor rows = empty({n, r + rd}), rstd = empty({n});
    Tensor c = rows.slice(1, 0, r), pe = rows.slice(1, r, rd).unsqueeze(1);
    rmsnorm_forward(ckv.slice(1, 0, r), w, eps, c, rstd);
    rope_from(ckv.slice(1, r, rd).unsqueeze(1), pe, positions, table, interleaved);
    if (pool.dtype() == DType::kU8)
      scatter_fp8_latents(rows, r, slots, pool);
    else
      scatter_rows(rows, slots, pool);
  }
  // A decode step's attention inputs in one pass: store_latents as above, then from the queries q
  // [N, heads, nope + rope] f32 (last dimension contiguous), rope_from of their rope parts into q_rot
  // [N, heads, rope] f32 and a copy of their nope parts into q_nope [N, heads, nope] (f32, or bf16:
  // rounded once, as the product that reads them would round them). This default, those ops one after
  // another, is the reference.
  virtual void mla_step_inputs(const Tensor& ckv, const Tensor& w, float eps, const Tensor& positions,
                               const RopeTable& table, bool interleaved, const Tensor& slots, Tensor& pool,
                               const Tensor& q, Tensor& q_rot, Tensor& q_nope) {
    store_latents(ckv, w, eps, positions, table, interleaved, slots, pool);
    const int64_t nope = q_nope.size(2), rd = q_rot.size(2);
    rope_from(q.slice(2, nope, rd), q_rot, positions, table, interleaved);
    copy(q.slice(2, 0, nope), q_nope);
  }

  // ---- mixture of experts
  // logits [M, E] -> idx [M, K] I32, weights [M, K], scores [M, E] (sigmoid or softmax, kept for
  // backward). bias [E] (e_score_correction_bias) steers selection only; may be undefined.
  virtual void moe_route(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                         Tensor& weights, Tensor& scores) = 0;
  // moe_route, and in the same pass the shared experts' gated activation act = silu(g) · u over gate_up =
  // [g | u] [M, 2I] (as silu_mul_forward makes it): the router's logits and the shared experts' gate and
  // up come from one product, and a decode step then takes one kernel for both. gate_up f32; a bf16 act
  // is made from the products rounded to bf16 first, as a training forward keeps them (so that both give
  // the same bits).
  virtual void moe_route_and_gate(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                                  Tensor& weights, Tensor& scores, const Tensor& gate_up, Tensor& act) {
    moe_route(logits, bias, cfg, idx, weights, scores);
    if (act.dtype() == DType::kBF16 && gate_up.dtype() == DType::kF32) {
      Tensor rounded = empty(gate_up.shape(), DType::kBF16);
      copy(gate_up, rounded);
      silu_mul_forward(rounded, act);
      return;
    }
    silu_mul_forward(gate_up, act);
  }
  // dlogits += ∂weights/∂logits · dweights (selection is piecewise constant).
  virtual void moe_route_backward(const Tensor& dweights, const Tensor& scores, const Tensor& idx,
                                  const RouterConfig& cfg, Tensor& dlogits) = 0;
  // Sorts the M*K (token, slot) assignments by expert, stable in assignment order: the experts' rows
  // are the assignments grouped by expert; row_of [M*K] I32 the row of assignment m*K+k, token_of [M*K]
  // I32 the token (m) of each row, offsets [E+1] I64 (made here, on this backend's device) the group
  // bounds. No token rows move: the grouped products read them through token_of (their a_rows). The host
  // need not wait for any of it: grouped_gemm reads the bounds where they are.
  virtual void moe_dispatch(const Tensor& idx, int n_experts, Tensor& row_of, Tensor& token_of, Tensor& offsets) = 0;
  // dx[m] += Σ_k dxs[row_of[m*K+k]] (k in order);  dxs f32 or bf16, dx f32 (each sum f32). Without
  // accumulate, dx is written: the sums from 0 (dx's old values not read).
  virtual void moe_dispatch_backward(const Tensor& dxs, const Tensor& row_of, Tensor& dx, bool accumulate = true) = 0;
  // out[m] += Σ_k weights[m, k] · ys[row_of[m*K+k]];  ys f32 or bf16 (here and in backward), out f32.
  virtual void moe_combine(const Tensor& ys, const Tensor& weights, const Tensor& row_of, Tensor& out) = 0;
  // A MoE layer's end and the next layer's norm: moe_combine(ys, weights, row_of, h), then
  // add_rmsnorm_forward(x, h, w, eps, y, rstd) (h += x, y = rmsnorm(h)); a backend may do it in one pass
  // (decode runs it once a layer). This default is the reference.
  // h_rounded as add_rmsnorm_forward's.
  virtual void moe_combine_add_rmsnorm(const Tensor& ys, const Tensor& weights, const Tensor& row_of, const Tensor& x,
                                       Tensor& h, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                                       Tensor* h_rounded = nullptr) {
    moe_combine(ys, weights, row_of, h);
    add_rmsnorm_forward(x, h, w, eps, y, rstd, h_rounded);
  }
  // dys[row] = w · dout[m];  dweights[m, k] = dout[m] · ys[row] (row = row_of[m*K+k]), written (not
  // accumulated); rows of dys that no assignment names are left as they are. dys f32, or bf16 (rounded
  // once: a gradient that only bf16 products read).
  virtual void moe_combine_backward(const Tensor& dout, const Tensor& ys, const Tensor& weights,
                                    const Tensor& row_of, Tensor& dys, Tensor& dweights) = 0;

  // ---- token log-probabilities
  // lp[m] = logits[m, targets[m]] - logsumexp(logits[m]);  logits [M, V] rows, lse [M] saved.
  virtual void logprobs_forward(const Tensor& logits, const Tensor& targets, Tensor& lp, Tensor& lse) = 0;
  // dlogits[m] = dlp[m] · (onehot(targets[m]) - softmax(logits[m])), written (not accumulated): f32, or
  // bf16 (rounded once: a gradient that only bf16 products read).
  virtual void logprobs_backward(const Tensor& dlp, const Tensor& logits, const Tensor& targets,
                                 const Tensor& lse, Tensor& dlogits) = 0;
  // The gradient of a clipped-ratio policy loss with a k3 KL term (GRPO's; trainer/grpo.h) with respect
  // to each token's logprob lp[i], from lp [N] and rows [N, 4] f32 = (old, ref, adv, coef) a token:
  //   ratio = exp(lp - old) (exactly 1 with loss.ratio_one: `old` is the policy's own lp),
  //   dpg = -adv·ratio where ratio·adv <= clip(ratio, 1 - eps_low, 1 + eps_high)·adv or the ratio lies
  //         inside that range, else 0;
  //   dlp[i] = coef · (dpg + kl_beta · (1 - exp(ref - lp)))   (the KL term left out at kl_beta 0),
  // in double precision, rounded to f32 once. dlp [N] f32.
  virtual void clipped_ratio_grad(const Tensor& lp, const Tensor& rows, const ClippedRatioLoss& loss, Tensor& dlp) = 0;
  // Per row of logits [M, V] with its lse [M]: the softmax's entropy, entropy[m] = lse[m] - Σ_j p_j·logits[m, j]
  // (f32), and the first index of the row's maximum, argmax[m] (I32).
  virtual void logit_stats(const Tensor& logits, const Tensor& lse, Tensor& entropy, Tensor& argmax) = 0;

  // ---- token sampling (the rollout engine's next tokens, without the logits leaving the device)
  // One token per row s of spec [S, kSampleSpecColumns] f32 (integers stored exactly):
  //   (logits row r, temperature T, top_p, top_k, min_p, u in [0, 1)), r a row of logits [M, V] rows
  //   (several specs may share a row: a group's samples after its prompt).
  // T = 0 picks the first maximum. Otherwise p_j ∝ exp((logits[r, j] - max) / T) and tokens rank by
  // (-logit, id): top_k > 0 keeps the first k, min_p keeps those with p >= min_p · p_max, then top_p < 1
  // keeps the shortest prefix of what is left whose mass reaches top_p of its mass. The pick is the first
  // kept token, in vocabulary order, at which the running sum of kept p exceeds u · (their sum).
  // tokens [S] I32; logprobs [S] f32: logits[r, pick] - logsumexp(logits[r]) (T and the cuts left out).
  virtual void sample_tokens(const Tensor& logits, const Tensor& spec, Tensor& tokens, Tensor& logprobs) = 0;

  // ---- the optimizer, over one flat f32 parameter buffer and its gradient/moment buffers
  // Σ x² over the spans of x [N] (a NaN or Inf propagates to the result).
  virtual double sum_squares(const Tensor& x, const std::vector<ParamSpan>& spans) = 0;
  // The AdamW update above on the spans; w, g, m, v: [N] f32, contiguous. With `rounded` ([N] bf16,
  // contiguous: a model's copy of its weights for bf16 products) the updated weights of the spans are
  // also written there, rounded to nearest even, in the same pass.
  virtual void adamw_update(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const std::vector<ParamSpan>& spans,
                            const AdamWUpdate& u, Tensor* rounded = nullptr) = 0;

  // Waits for the work queued so far (a device backend runs asynchronously; timing needs this).
  virtual void synchronize() {}

  // ---- captured work (CUDA graphs)
  // Records the device work `work` queues (without running it) and returns what queues the same work
  // again with one call: the same kernels on the same memory, so the inputs it reads must be written in
  // place between replays. `work` must not wait for the device, copy from the host, or keep a tensor it
  // allocates past its end. Empty where the backend cannot capture (can_capture(): the CUDA backend with
  // bf16 products and no profiler).
  virtual bool can_capture() const { return false; }
  virtual std::function<void()> capture(const std::function<void()>& work) { return {}; }

 protected:
  // attention_backward with dq or dk in two parts (dq_tail or dk_tail given), for a backend whose kernels
  // write them whole: the whole f32 gradients into scratch, then each split between its two places.
  void attention_backward_in_parts(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& out, const Tensor& lse, float scale, Tensor& dq, Tensor& dk,
                                   Tensor& dv, Tensor* dq_tail, Tensor* dk_tail) {
    CHECK(dq_tail != nullptr || dk_tail != nullptr);
    Tensor dq_all = dq_tail != nullptr ? empty(q.shape()) : dq, dk_all = dk_tail != nullptr ? empty(k.shape()) : dk;
    attention_backward(dout, q, k, v, out, lse, scale, dq_all, dk_all, dv, /*accumulate=*/false);
    for (auto [all, head, tail] :
         {std::tuple<Tensor*, Tensor*, Tensor*>{&dq_all, &dq, dq_tail}, {&dk_all, &dk, dk_tail}}) {
      if (tail == nullptr) continue;
      const int64_t dh = head->size(3);
      copy(all->slice(3, 0, dh), *head);
      copy(all->slice(3, dh, all->size(3) - dh), *tail);
    }
  }
  // Keys in two parts (attention_forward's k_tail) joined into one tensor [B, S, Hk, D] of k's dtype, for a
  // backend whose kernels read them whole.
  Tensor joined_keys(const Tensor& k, const Tensor& tail) {
    CHECK(k.dim() == 4 && tail.dim() == 4 && k.dtype() == tail.dtype())
        << "attention: keys in parts take 4-D rows of one dtype";
    for (int d = 0; d < 3; ++d) CHECK_EQ(k.size(d), tail.size(d)) << "attention: the keys' parts";
    Tensor all = empty({k.size(0), k.size(1), k.size(2), k.size(3) + tail.size(3)}, k.dtype());
    Tensor head_dst = all.slice(3, 0, k.size(3)), tail_dst = all.slice(3, k.size(3), tail.size(3));
    copy(k, head_dst);
    copy(tail, tail_dst);
    return all;
  }
  // Checks an overwritten gradient in two parts (attention_backward) against its operand x's rows of
  // `width` columns (the head dim: with keys in parts, more than k's).
  static void check_parts(const Tensor& head, const Tensor& tail, const Tensor& x, int64_t width, const char* what) {
    CHECK(head.dim() == 4 && tail.dim() == 4 && head.stride(3) == 1 && tail.stride(3) == 1 &&
          tail.dtype() == DType::kF32 && (head.dtype() == DType::kF32 || head.dtype() == DType::kBF16))
        << "attention_backward: " << what << " in parts takes 4-D rows, f32 or bf16 then f32";
    for (int d = 0; d < 3; ++d)
      CHECK(head.size(d) == x.size(d) && tail.size(d) == x.size(d)) << "attention_backward: " << what << " parts";
    CHECK(head.size(3) > 0 && tail.size(3) > 0 && head.size(3) + tail.size(3) == width)
        << "attention_backward: " << what << " parts of " << head.size(3) << " + " << tail.size(3) << " columns for "
        << width;
  }
};

// The CPU reference backend.
std::unique_ptr<Backend> make_cpu_backend();

}  // namespace r1lab::core
