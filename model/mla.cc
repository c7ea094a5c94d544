// Multi-head Latent Attention, forward and backward, and its latent-cache decode.
//
//   q      = x · W_qᵀ (or rmsnorm(x · W_qaᵀ) · W_qbᵀ)          [M, heads, nope + rope]
//   ckv    = x · W_kvaᵀ = [c | k_pe]                            [M, r + rope]
//   kv     = rmsnorm(c) · W_kvbᵀ = [k_nope | v] per head       [M, heads, nope + v]
//   k      = [k_nope | rope(k_pe) shared by all heads],  q_pe = rope(q_pe)
//   y      = softmax(q·kᵀ · scale, causal) · v · W_oᵀ
#include "model/layers.h"

namespace r1lab::model {
namespace {

using core::Tensor;

// [M, heads, d] (contiguous) viewed as [B, T, heads, d].
// [M, H, D] with rows of any stride as [batch, M / batch, H, D].
Tensor split_batch(const Tensor& t, int64_t batch) {
  const int64_t t_len = t.size(0) / batch;
  return Tensor(t.storage(), t.byte_offset(), {batch, t_len, t.size(1), t.size(2)},
                {t.stride(0) * t_len, t.stride(0), t.stride(1), t.stride(2)}, t.dtype());
}

// Rows [M, heads * d] of any row stride (the last dimension contiguous) as [M, heads, d].
Tensor split_heads(const Tensor& t, int64_t heads) {
  return Tensor(t.storage(), t.byte_offset(), {t.size(0), heads, t.size(1) / heads},
                {t.stride(0), t.size(1) / heads, 1}, t.dtype());
}

// q = x · W_qᵀ, or rmsnorm(x · W_qaᵀ) · W_qbᵀ with query compression; then rope on each head's rope
// part (unless `rotate` is false: the caller rotates it where it moves it). Returns [M, heads, nope +
// rope]; `a` (optional) keeps what backward needs.
Tensor queries(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::RopeTable& rope,
               const Tensor& x, const Tensor& positions, AttentionActs* a, bool rotate = true) {
  const int64_t m = x.size(0), heads = cfg.num_attention_heads;
  Tensor q = be.empty({m, heads, cfg.qk_head_dim()});
  Tensor q2 = q.view({m, heads * cfg.qk_head_dim()});
  if (cfg.q_lora_rank > 0) {
    Tensor q_a = be.empty({m, cfg.q_lora_rank}), rstd = be.empty({m});
    Tensor q_a_norm = be.empty({m, cfg.q_lora_rank}, product_dtype(be));
    be.gemm(x, false, w.q_a_proj, true, q_a);
    be.rmsnorm_forward(q_a, w.q_a_norm, static_cast<float>(cfg.rms_norm_eps), q_a_norm, rstd);
    be.gemm(q_a_norm, false, w.q_b_proj, true, q2);
    if (a) {
      a->q_a = q_a;
      a->q_a_norm = q_a_norm;
      a->q_a_rstd = rstd;
    }
  } else {
    be.gemm(x, false, w.q_proj, true, q2);
  }
  if (rotate) {
    Tensor q_pe = q.slice(2, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim);
    be.rope(q_pe, positions, rope, cfg.rope_interleave, false);
  }
  return q;
}

// q = x · W_qᵀ ([M, heads, nope + rope], its rope parts not rotated) and ckv = x · W_kvaᵀ = [c | k_pe]
// ([M, r + rope]): one product where the two weights lie one after the other (without query
// compression the parameter layout puts kv_a_proj right after q_proj), both views of its output; else
// queries() and a product of its own.
std::pair<Tensor, Tensor> queries_and_latents(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w,
                                              const core::RopeTable& rope, const Tensor& xin, const Tensor& positions,
                                              AttentionActs* a) {
  const int64_t m = xin.size(0), heads = cfg.num_attention_heads, qn = heads * cfg.qk_head_dim();
  const int64_t lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
  const Tensor both = cfg.q_lora_rank == 0 ? stacked_with(w.q_proj, w.kv_a_proj) : Tensor();
  if (both.defined()) {
    Tensor out = be.empty({m, qn + lat});
    be.gemm(xin, false, both, true, out);
    return {split_heads(out.slice(1, 0, qn), heads), out.slice(1, qn, lat)};
  }
  Tensor ckv = be.empty({m, lat});
  be.gemm(xin, false, w.kv_a_proj, true, ckv);
  return {queries(be, cfg, w, rope, xin, positions, a, /*rotate=*/false), ckv};
}

// From a.ckv = [c | k_pe]: c_out [M, r] rows = rmsnorm(c);  pe_out [M, H, rope] = rope(k_pe) in each of
// its H heads (f32, or bf16 rounded once; H 1 where the heads read one row). Keeps the norm's rstd in
// `a`. (The paged path makes the same rows straight into its cache slots: Backend::store_latents.)
void latents(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::RopeTable& rope,
             const Tensor& positions, Tensor& c_out, Tensor& pe_out, AttentionActs& a) {
  const int64_t m = a.ckv.size(0), r = cfg.kv_lora_rank, rd = cfg.qk_rope_head_dim;
  a.c_rstd = be.empty({m});
  be.rmsnorm_forward(a.ckv.slice(1, 0, r), w.kv_a_norm, static_cast<float>(cfg.rms_norm_eps), c_out, a.c_rstd);
  be.rope_from(a.ckv.slice(1, r, rd).unsqueeze(1).expand({m, pe_out.size(1), rd}), pe_out, positions, rope,
               cfg.rope_interleave);
}

// q [M, heads, nope + rope] f32, its rope parts not yet rotated, as the products take it: rotated, in
// the products' dtype, rounded once (bf16: the nope parts rounded and the rope parts rotated into a
// tensor of their own in one pass each).
Tensor rotated_operand(core::Backend& be, const ModelConfig& cfg, const core::RopeTable& rope, const Tensor& q,
                       const Tensor& positions) {
  const int64_t nope = cfg.qk_nope_head_dim, rd = cfg.qk_rope_head_dim;
  Tensor pe = q.slice(2, nope, rd);
  if (product_dtype(be) == core::DType::kF32) {
    be.rope(pe, positions, rope, cfg.rope_interleave, /*inverse=*/false);
    return q;
  }
  Tensor out = be.empty(q.shape(), product_dtype(be));
  Tensor out_nope = out.slice(2, 0, nope), out_pe = out.slice(2, nope, rd);
  be.copy(q.slice(2, 0, nope), out_nope);
  be.rope_from(pe, out_pe, positions, rope, cfg.rope_interleave);
  return out;
}

}  // namespace

Tensor product_operand(core::Backend& be, const Tensor& x) {
  if (be.weight_dtype() != core::DType::kBF16 || x.dtype() != core::DType::kF32) return x;
  Tensor xb = be.empty(x.shape(), core::DType::kBF16);
  be.copy(x, xb);
  return xb;
}

namespace {

// Attention's operands from x (xin: x as products take it): a.q with rope, a.kv and a.k_pe, in the
// products' dtype. The latents (a.ckv, a.c_norm, a.c_rstd) are made first, unless `latents_kept`:
// backward remaking them from those the forward kept.
void attention_operands(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::RopeTable& rope,
                        const Tensor& xin, const Tensor& positions, AttentionActs& a, bool latents_kept) {
  const int64_t m = xin.size(0), heads = cfg.num_attention_heads;
  const int64_t nope = cfg.qk_nope_head_dim, rd = cfg.qk_rope_head_dim;
  const int64_t r = cfg.kv_lora_rank, vd = cfg.v_head_dim;
  // The shared rope key in the products' dtype, rotated once (attention reads it for every head), with
  // the compressed latent made first where it is not kept.
  a.k_pe = be.empty({m, 1, rd}, product_dtype(be));
  if (latents_kept) {
    a.q = rotated_operand(be, cfg, rope, queries(be, cfg, w, rope, xin, positions, &a, /*rotate=*/false), positions);
    be.rope_from(a.ckv.slice(1, r, rd).unsqueeze(1), a.k_pe, positions, rope, cfg.rope_interleave);
  } else {
    auto [q, ckv] = queries_and_latents(be, cfg, w, rope, xin, positions, &a);
    // ckv is kept for backward: compact where it is a view of a wider output (whose query columns go
    // once they are rotated into the operand).
    if (ckv.is_contiguous()) {
      a.ckv = ckv;
    } else {
      a.ckv = be.empty(ckv.shape());
      be.copy(ckv, a.ckv);
    }
    a.q = rotated_operand(be, cfg, rope, q, positions);
    a.c_norm = be.empty({m, r}, product_dtype(be));
    latents(be, cfg, w, rope, positions, a.c_norm, a.k_pe, a);
  }
  // kv in the products' dtype: the keys' nope parts and the values, read where the product puts them.
  a.kv = be.empty({m, heads, nope + vd}, product_dtype(be));
  Tensor kv2 = a.kv.view({m, heads * (nope + vd)});
  be.gemm(a.c_norm, false, w.kv_b_proj, true, kv2);
}

// Attention's keys in two parts (each head's nope part, then the shared rope key) and its values, as
// [B, T, heads, d] views of what attention_operands made.
struct KeysValues {
  Tensor k, k_tail, v;
};
KeysValues keys_values(const ModelConfig& cfg, const AttentionActs& a, int64_t batch) {
  const int64_t m = a.kv.size(0), heads = a.kv.size(1), nope = cfg.qk_nope_head_dim;
  return {split_batch(a.kv.slice(2, 0, nope), batch),
          split_batch(a.k_pe.expand({m, heads, cfg.qk_rope_head_dim}), batch),
          split_batch(a.kv.slice(2, nope, cfg.v_head_dim), batch)};
}

}  // namespace

void mla_remake_operands(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::RopeTable& rope,
                         const Tensor& x, const Tensor& positions, AttentionActs& a) {
  attention_operands(be, cfg, w, rope, product_operand(be, x), positions, a, /*latents_kept=*/true);
}

void mla_forward(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::RopeTable& rope,
                 const Tensor& x, const Tensor& positions, int64_t batch, AttentionActs& a, Tensor& y) {
  const int64_t m = x.size(0), heads = cfg.num_attention_heads, vd = cfg.v_head_dim;
  attention_operands(be, cfg, w, rope, product_operand(be, x), positions, a, /*latents_kept=*/false);
  // Attention; its output only products read (o_proj, its weight gradient) and attention backward's
  // row sums, so it is made in the products' dtype.
  a.out = be.empty({m, heads, vd}, product_dtype(be));
  a.lse = be.empty({batch, heads, m / batch});
  Tensor out4 = split_batch(a.out, batch);
  const KeysValues kv = keys_values(cfg, a, batch);
  be.attention_forward(split_batch(a.q, batch), kv.k, kv.v, cfg.attention_scale(), out4, a.lse, &kv.k_tail);
  be.gemm(a.out.view({m, heads * vd}), false, w.o_proj, true, y);
}

void mla_backward(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const LayerWeights& g,
                  const core::RopeTable& rope, const Tensor& x, const Tensor& positions, const AttentionActs& a,
                  const Tensor& dy, const Tensor& dy_rounded, Tensor& dx, float gbeta) {
  const int64_t m = x.size(0), heads = cfg.num_attention_heads;
  const int64_t nope = cfg.qk_nope_head_dim, rd = cfg.qk_rope_head_dim, qk = cfg.qk_head_dim();
  const int64_t r = cfg.kv_lora_rank, vd = cfg.v_head_dim;
  const int64_t batch = a.lse.size(0);
  // y = out · W_oᵀ
  Tensor dout = be.empty({m, heads, vd});
  Tensor dout2 = dout.view({m, heads * vd});
  // Each gradient that two products read is rounded once for both (bf16 products).
  const Tensor dyp = dy_rounded.defined() ? dy_rounded : product_operand(be, dy);
  be.gemm(dyp, false, w.o_proj, false, dout2);
  Tensor go = g.o_proj;
  be.gemm(dyp, true, a.out.view({m, heads * vd}), false, go, 1.0f, gbeta);
  // Without query compression, where W_q and W_kva lie one after the other (as the forward's product
  // reads them) and so do their gradients, dq's operand and d(ckv)'s share one buffer [dq | d(ckv)], and
  // one product (and one weight-gradient product) takes both.
  const Tensor w_both = cfg.q_lora_rank == 0 ? stacked_with(w.q_proj, w.kv_a_proj) : Tensor();
  Tensor g_both = w_both.defined() ? stacked_with(g.q_proj, g.kv_a_proj) : Tensor();
  const int64_t qn = heads * qk;
  Tensor dqkv = be.empty({m, qn + (g_both.defined() ? r + rd : 0)}, product_dtype(be));
  // Attention, its gradients written (not added), each part where it goes next. d(kv) = [dk_nope | dv] a
  // head, in the products' dtype (only the product below reads it): dk's nope part and dv go straight
  // into their places (rounded once there), dk's rope part into a tensor of its own (summed over the
  // heads below). dq's nope part straight into the queries' product operand, its rope part f32 (rotated
  // back into that operand below).
  Tensor dkv = be.empty({m, heads, nope + vd}, product_dtype(be));
  Tensor dkv_nope = dkv.slice(2, 0, nope), dv = dkv.slice(2, nope, vd);
  Tensor dqp = split_heads(dqkv.slice(1, 0, qn), heads), dq_pe = be.empty({m, heads, rd});
  Tensor dk_pe = be.empty({m, heads, rd});
  Tensor dq4 = split_batch(dqp.slice(2, 0, nope), batch), dk4 = split_batch(dkv_nope, batch);
  Tensor dv4 = split_batch(dv, batch), dq_pe4 = split_batch(dq_pe, batch), dk_pe4 = split_batch(dk_pe, batch);
  const KeysValues kv = keys_values(cfg, a, batch);
  be.attention_backward(split_batch(dout, batch), split_batch(a.q, batch), kv.k, kv.v, split_batch(a.out, batch), a.lse,
                        cfg.attention_scale(), dq4, dk4, dv4, /*accumulate=*/false, &dq_pe4, &dk_pe4, &kv.k_tail);
  // Σ over heads of their rope-key gradients (the forward shares one rope key among the heads), into
  // its place in d(ckv), then back through the rope.
  Tensor dckv = be.zeros({m, r + rd});
  Tensor dckv_pe = dckv.slice(1, r, rd).unsqueeze(1);
  be.sum_heads(dk_pe, dckv_pe);
  be.rope(dckv_pe, positions, rope, cfg.rope_interleave, /*inverse=*/true);
  // kv = c_norm · W_kvbᵀ
  Tensor dc_norm = be.empty({m, r});
  const Tensor dkv2 = dkv.view({m, heads * (nope + vd)});
  be.gemm(dkv2, false, w.kv_b_proj, false, dc_norm);
  Tensor gkvb = g.kv_b_proj;
  be.gemm(dkv2, true, a.c_norm, false, gkvb, 1.0f, gbeta);
  Tensor dc = dckv.slice(1, 0, r);
  Tensor gkvan = g.kv_a_norm;
  be.rmsnorm_backward(dc_norm, a.ckv.slice(1, 0, r), w.kv_a_norm, a.c_rstd, dc, gkvan);
  // Queries: dq's rope part rotated back into its operand.
  Tensor dq_pe_dst = dqp.slice(2, nope, rd);
  be.rope_from(dq_pe, dq_pe_dst, positions, rope, cfg.rope_interleave, /*inverse=*/true);
  const Tensor dq2 = dqkv.slice(1, 0, qn);
  // ckv = x · W_kvaᵀ (and q = x · W_qᵀ with it, one product, where they share a buffer)
  if (g_both.defined()) {
    Tensor dckvp = dqkv.slice(1, qn, r + rd);
    be.copy(dckv, dckvp);
    be.gemm(dqkv, false, w_both, false, dx);
    be.gemm(dqkv, true, x, false, g_both, 1.0f, gbeta);
    return;
  }
  const Tensor dckvp = product_operand(be, dckv);
  be.gemm(dckvp, false, w.kv_a_proj, false, dx);  // written; the queries' part adds below
  Tensor gkva = g.kv_a_proj;
  be.gemm(dckvp, true, x, false, gkva, 1.0f, gbeta);
  if (cfg.q_lora_rank > 0) {
    Tensor dq_a_norm = be.zeros({m, cfg.q_lora_rank}), dq_a = be.zeros({m, cfg.q_lora_rank});
    be.gemm(dq2, false, w.q_b_proj, false, dq_a_norm);
    Tensor gqb = g.q_b_proj;
    be.gemm(dq2, true, a.q_a_norm, false, gqb, 1.0f, gbeta);
    Tensor gqan = g.q_a_norm;
    be.rmsnorm_backward(dq_a_norm, a.q_a, w.q_a_norm, a.q_a_rstd, dq_a, gqan);
    const Tensor dq_ap = product_operand(be, dq_a);
    be.gemm(dq_ap, false, w.q_a_proj, false, dx, 1.0f, 1.0f);
    Tensor gqa = g.q_a_proj;
    be.gemm(dq_ap, true, x, false, gqa, 1.0f, gbeta);
  } else {
    be.gemm(dq2, false, w.q_proj, false, dx, 1.0f, 1.0f);
    Tensor gq = g.q_proj;
    be.gemm(dq2, true, x, false, gq, 1.0f, gbeta);
  }
}

void mla_forward_paged(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w,
                       const core::RopeTable& rope, const Tensor& x, const StepTensors& st, const LatentCache& cache,
                       int layer, Tensor& y) {
  const int64_t m = x.size(0), heads = cfg.num_attention_heads;
  const int64_t nope = cfg.qk_nope_head_dim, rd = cfg.qk_rope_head_dim;
  const int64_t r = cfg.kv_lora_rank, vd = cfg.v_head_dim;
  const Tensor xin = product_operand(be, x);
  const auto [q, ckv] = queries_and_latents(be, cfg, w, rope, xin, st.positions, nullptr);
  // In one pass: the new rows [rmsnorm(c) | rope(k_pe)] of ckv, straight into their cache slots; the
  // queries' rope parts rotated into place; their nope parts in the product's dtype.
  Tensor pool = cache.layer(layer);
  Tensor qa = be.empty({m, heads, r + rd});  // the absorbed product, then the rope part
  Tensor qa_pe = qa.slice(2, r, rd);
  Tensor q_nope = be.empty({m, heads, nope}, product_dtype(be));
  be.mla_step_inputs(ckv, w.kv_a_norm, static_cast<float>(cfg.rms_norm_eps), st.positions, rope, cfg.rope_interleave,
                     st.slots, pool, q, qa_pe, q_nope);
  // Absorb W_UK into the queries: q_lat[h] = q_nope[h] · W_UK[h], W_UK[h] = kv_b_proj rows [nope, r].
  Tensor kvb = w.kv_b_proj.view({heads, nope + vd, r});
  Tensor qa_lat = qa.slice(2, 0, r).transpose(0, 1);  // [heads, m, r]
  be.gemm_batched(q_nope.transpose(0, 1), false, kvb.slice(1, 0, nope), false, qa_lat);
  // One latent "head" shared by all query heads: k = [c | k_pe], v = c.
  // Its output f32 with an f32 cache; bf16 with a bf16 or fp8 one, where the product after it rounds it
  // anyway.
  Tensor o_lat = be.empty({m, heads, r}, pool.dtype() == core::DType::kF32 ? core::DType::kF32 : core::DType::kBF16);
  be.paged_latent_attention(qa, pool, cache.block_size(), st.block_tables, st.seq_starts, st.context_lens,
                            cfg.attention_scale(), o_lat);
  // Un-absorb W_UV: out[h] = o_lat[h] · W_UV[h]ᵀ, W_UV[h] = kv_b_proj rows [v, r].
  Tensor out = be.empty({m, heads, vd}, product_dtype(be));
  Tensor out_h = out.transpose(0, 1);  // [heads, m, v]
  be.gemm_batched(o_lat.transpose(0, 1), false, kvb.slice(1, nope, vd), true, out_h);
  be.gemm(out.view({m, heads * vd}), false, w.o_proj, true, y);
}

}  // namespace r1lab::model
