// The layers of the network, forward and backward side by side (internal to model/).
#pragma once

#include "core/backend.h"
#include "model/config.h"
#include "model/latent_cache.h"
#include "model/model.h"
#include "model/weights.h"

namespace r1lab::model {

// Multi-head Latent Attention over x [M, H] (M = B*T, positions [M] I32). Writes y [M, H].
// x as the left operand of several matrix products: where products run in bf16 (Backend::weight_dtype),
// one bf16 copy that each takes as it is, rather than a conversion in every product (the same rounding,
// so the same results); x itself otherwise.
core::Tensor product_operand(core::Backend& be, const core::Tensor& x);
// The dtype of an activation that only matrix products read (a norm's output, the MLP's gated
// activation): bf16 where products run in bf16, rounded once where it is made; f32 otherwise.
inline core::DType product_dtype(const core::Backend& be) { return be.weight_dtype(); }

void mla_forward(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::RopeTable& rope,
                 const core::Tensor& x, const core::Tensor& positions, int64_t batch, AttentionActs& a,
                 core::Tensor& y);
// dx = ∂/∂x (written: its old values are not read), g.* = gbeta · g.* + ∂/∂weights for the matrix weights
// (gbeta 1 adds, 0 overwrites: the first backward after Model::zero_grads), g.* += ∂/∂weights for the
// norms. dyp: dy as the products take it where the caller has it already (Backend::rmsnorm_backward's
// dx_rounded); undefined: made here. The same holds for the backwards below.
void mla_backward(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const LayerWeights& g,
                  const core::RopeTable& rope, const core::Tensor& x, const core::Tensor& positions,
                  const AttentionActs& a, const core::Tensor& dy, const core::Tensor& dyp, core::Tensor& dx,
                  float gbeta);
// Attention's operands again (a.q, a.kv, a.k_pe, and the query latents with query compression), from the
// layer's normalised input x and the latents a keeps: the same bits as mla_forward made.
void mla_remake_operands(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::RopeTable& rope,
                         const core::Tensor& x, const core::Tensor& positions, AttentionActs& a);
// A StepBatch on the backend.
struct StepTensors {
  core::Tensor positions, slots, seq_starts, context_lens, block_tables;  // I32
};
// The same attention for the new tokens of a step over the paged cache (layer l): stores their latents
// in their slots, then attends in latent space: q·k = (W_UKᵀ q_nope)·c + q_pe·k_pe, out = W_UV (Σ p c).
void mla_forward_paged(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w,
                       const core::RopeTable& rope, const core::Tensor& x, const StepTensors& st,
                       const LatentCache& cache, int layer, core::Tensor& y);

// Two weight matrices [n1, k] and [n2, k] as one [n1 + n2, k] where the second starts in memory right
// where the first ends (contiguous, the same dtype), so that one product serves both; else undefined.
core::Tensor stacked_with(const core::Tensor& first, const core::Tensor& next);

// SiLU-gated MLP: y = (silu(x·gateᵀ) * (x·upᵀ)) · downᵀ.  x [N, H], y [N, H] (overwritten).
void mlp_forward(core::Backend& be, const MlpWeights& w, const core::Tensor& x, MlpActs& a, core::Tensor& y);
// dx = ∂/∂x; g.* = gbeta · g.* + ∂/∂weights (as mla_backward); a.act remade from a.gate_up where a has
// none (a forward for backward keeps none). With dgu_out ([N, 2I] in the products'
// dtype), the gradient of the gate and up products goes there instead, and the caller runs their two
// products (g.gate_up and dx are left to it).
void mlp_backward(core::Backend& be, const MlpWeights& w, const MlpWeights& g, const core::Tensor& x, const MlpActs& a,
                  const core::Tensor& dy, const core::Tensor& dyp, core::Tensor& dx, float gbeta,
                  core::Tensor* dgu_out = nullptr);

// a.act = silu(g) * u from a.gate_up = [g | u], in the products' dtype.
void gated_activation(core::Backend& be, MlpActs& a);

// DeepSeekMoE: routed experts (top-k by the router) plus shared experts. y overwritten. Without
// for_backward, a keeps no experts' gate_up products (the experts' gated product runs fused). Without
// combine, y holds the shared experts' output only and the caller adds the routed ones (a.ys by
// a.weights and a.row_of: Backend::moe_combine, or moe_combine_add_rmsnorm with the next norm).
void moe_forward(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::Tensor& x, MoeActs& a,
                 core::Tensor& y, bool for_backward, bool combine = true);
// dx = ∂/∂x; g.* = gbeta · g.* + ∂/∂weights for the router and the experts (as mla_backward).
void moe_backward(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const LayerWeights& g,
                  const core::Tensor& x, const MoeActs& a, const core::Tensor& dy, const core::Tensor& dyp,
                  core::Tensor& dx, float gbeta);
// The routed experts' gate and up products again (a.experts.gate_up), from x and the routing a keeps (a
// forward with for_backward). The same bits as moe_forward made.
void moe_remake(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const core::Tensor& x, MoeActs& a);
// The MLP's gate/up products again from x (a.gate_up).
void mlp_remake(core::Backend& be, const MlpWeights& w, const core::Tensor& x, MlpActs& a);

}  // namespace r1lab::model
