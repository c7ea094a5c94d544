// The SiLU-gated MLP and DeepSeekMoE, forward and backward.
//
//   mlp(x)  = (silu(x·W_gᵀ) * (x·W_uᵀ)) · W_dᵀ
//   moe(x)  = Σ_{e ∈ topk(x)} w_e(x) · expert_e(x) + shared(x)
// Routed experts run as one grouped GEMM over the tokens sorted by expert.
#include "model/layers.h"

namespace r1lab::model {

using core::Tensor;

void gated_activation(core::Backend& be, MlpActs& a) {
  a.act = be.empty({a.gate_up.size(0), a.gate_up.size(1) / 2}, product_dtype(be));
  be.silu_mul_forward(a.gate_up, a.act);
}

namespace {

// The routed experts' gated activations over the token rows of x (x[a.token_of[r]] for the expert rows
// r, grouped by a.offsets): a.experts.act, and for_backward a.experts.gate_up.
void routed_gate_up(core::Backend& be, const LayerWeights& w, int64_t inter, const Tensor& x, MoeActs& a,
                    bool for_backward) {
  const int64_t rows = a.token_of.numel();
  a.experts.act = be.empty({rows, inter}, product_dtype(be));  // the groups cover every row
  if (a.experts.act.dtype() == core::DType::kBF16) {
    // bf16 products: the gated product in one pass; for backward its [rows, 2I] products come along,
    // rounded to bf16 (what silu_mul_backward reads), never in f32.
    if (for_backward) a.experts.gate_up = be.empty({rows, 2 * inter}, core::DType::kBF16);
    be.grouped_gate_up(x, w.experts_gate_up, a.offsets, a.experts.act, for_backward ? &a.experts.gate_up : nullptr,
                       &a.token_of);
  } else {
    a.experts.gate_up = be.empty({rows, 2 * inter});
    be.grouped_gemm(x, w.experts_gate_up, true, a.offsets, a.experts.gate_up, 0.0f, &a.token_of);
    be.silu_mul_forward(a.experts.gate_up, a.experts.act);
  }
}

// The rest of the MLP once a.gate_up holds x·[W_g | W_u]ᵀ.
void mlp_from_gate_up(core::Backend& be, const MlpWeights& w, MlpActs& a, Tensor& y) {
  gated_activation(be, a);
  be.gemm(a.act, false, w.down, true, y);
}

}  // namespace

Tensor stacked_with(const Tensor& first, const Tensor& next) {
  if (!first.defined() || !next.defined() || first.dtype() != next.dtype() || !first.is_contiguous() ||
      !next.is_contiguous() || first.dim() != 2 || next.dim() != 2 || first.size(1) != next.size(1) ||
      static_cast<const char*>(next.raw()) !=
          static_cast<const char*>(first.raw()) + first.numel() * core::dtype_size(first.dtype()))
    return Tensor();
  return Tensor(first.storage(), first.byte_offset(), {first.size(0) + next.size(0), first.size(1)},
                {first.size(1), 1}, first.dtype());
}

namespace {

// a.gate_up = x·[W_g | W_u]ᵀ, in the products' dtype (rounded once: the gated activation and its
// backward read it).
void gate_up_products(core::Backend& be, const MlpWeights& w, const Tensor& x, MlpActs& a) {
  a.gate_up = be.empty({x.size(0), w.gate_up.size(0)}, product_dtype(be));
  be.gemm(x, false, w.gate_up, true, a.gate_up);
}

}  // namespace

void mlp_forward(core::Backend& be, const MlpWeights& w, const Tensor& x, MlpActs& a, Tensor& y) {
  gate_up_products(be, w, x, a);
  mlp_from_gate_up(be, w, a, y);
}

void mlp_backward(core::Backend& be, const MlpWeights& w, const MlpWeights& g, const Tensor& x, const MlpActs& a,
                  const Tensor& dy, const Tensor& dy_rounded, Tensor& dx, float gbeta, Tensor* dgu_out) {
  const int64_t n = x.size(0), inter = w.down.size(1);
  // Gradients that only products read are rounded once (bf16 products), not in each product.
  const Tensor dyp = dy_rounded.defined() ? dy_rounded : product_operand(be, dy);
  // d(act) in the gate/up products' dtype: bf16 where they are (rounded once by the product that makes
  // it, as the routed experts' grouped_silu_backward rounds theirs), which halves its bytes both ways.
  Tensor dact = be.empty({n, inter}, a.gate_up.dtype());
  Tensor dgu = dgu_out != nullptr ? *dgu_out : be.empty({n, 2 * inter}, product_dtype(be));
  be.gemm(dyp, false, w.down, false, dact);
  Tensor gd = g.down, ggu = g.gate_up;
  // The gated activation, where the forward kept none, remade from the kept gate/up products by the
  // gate's backward in the same pass (as gated_activation makes it).
  Tensor act = a.act.defined() ? a.act : be.empty({n, inter}, a.gate_up.dtype());
  be.silu_mul_backward(dact, a.gate_up, dgu, a.act.defined() ? nullptr : &act);
  be.gemm(dyp, true, act, false, gd, 1.0f, gbeta);
  act = Tensor();
  if (dgu_out != nullptr) return;
  be.gemm(dgu, false, w.gate_up, false, dx);
  be.gemm(dgu, true, x, false, ggu, 1.0f, gbeta);
}

void moe_forward(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const Tensor& x, MoeActs& a,
                 Tensor& y, bool for_backward, bool combine) {
  const int64_t m = x.size(0), e = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
  const int64_t inter = cfg.moe_intermediate_size;
  const core::RouterConfig rc = cfg.router();
  // Router.
  a.scores = be.empty({m, e});
  a.idx = be.empty({m, k}, core::DType::kI32);
  a.weights = be.empty({m, k});
  const Tensor xin = product_operand(be, x);  // the router's and the shared experts' products
  // Without backward (decode, prefill), the router's logits and the shared experts' gate and up in one
  // product where their weights lie one after the other (the parameter layout puts them so), and the
  // shared experts' gated activation made in the router's pass. A training forward keeps the gate and up
  // products for backward in the products' dtype (rounded once: what the gate and its backward read),
  // so they come from their own product; the router's logits (f32) from theirs.
  const Tensor both = w.shared.down.defined() ? stacked_with(w.router, w.shared.gate_up) : Tensor();
  const bool gate_with_route = both.defined() && !for_backward;
  if (gate_with_route) {
    Tensor out = be.empty({m, both.size(0)});
    be.gemm(xin, false, both, true, out);
    a.logits = out.slice(1, 0, e);
    a.shared.gate_up = out.slice(1, e, both.size(0) - e);
  } else {
    a.logits = be.empty({m, e});
    be.gemm(xin, false, w.router, true, a.logits);
    if (both.defined()) {
      a.shared.gate_up = be.empty({m, w.shared.gate_up.size(0)}, product_dtype(be));
      be.gemm(xin, false, w.shared.gate_up, true, a.shared.gate_up);
    }
  }
  if (gate_with_route) {
    a.shared.act = be.empty({m, a.shared.gate_up.size(1) / 2}, product_dtype(be));
    be.moe_route_and_gate(a.logits, w.router_bias, rc, a.idx, a.weights, a.scores, a.shared.gate_up, a.shared.act);
  } else {
    be.moe_route(a.logits, w.router_bias, rc, a.idx, a.weights, a.scores);
  }
  // Routed experts over the token rows grouped by expert (read where they lie, through token_of).
  a.row_of = be.empty({m * k}, core::DType::kI32);
  a.token_of = be.empty({m * k}, core::DType::kI32);
  be.moe_dispatch(a.idx, static_cast<int>(e), a.row_of, a.token_of, a.offsets);
  routed_gate_up(be, w, inter, xin, a, for_backward);
  a.ys = be.empty({m * k, x.size(1)}, product_dtype(be));  // bf16 products: the experts' outputs rounded once
  be.grouped_gemm(a.experts.act, w.experts_down, true, a.offsets, a.ys);
  if (gate_with_route) {
    be.gemm(a.shared.act, false, w.shared.down, true, y);
  } else if (both.defined()) {
    mlp_from_gate_up(be, w.shared, a.shared, y);
  } else if (w.shared.down.defined()) {
    mlp_forward(be, w.shared, xin, a.shared, y);
  } else {
    be.fill(y, 0.0f);
  }
  if (combine) be.moe_combine(a.ys, a.weights, a.row_of, y);
  // Backward needs neither the routed experts' outputs (past the combine) nor their activations
  // (grouped_silu_backward remakes them from the gate and up products).
  if (for_backward) a.experts.act = Tensor();
  if (for_backward && combine) a.ys = Tensor();
}

void moe_remake(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const Tensor& x, MoeActs& a) {
  // The grouping (token_of, offsets) is kept: the experts read x's rows through it again.
  routed_gate_up(be, w, cfg.moe_intermediate_size, product_operand(be, x), a, /*for_backward=*/true);
  a.experts.act = Tensor();
}

void mlp_remake(core::Backend& be, const MlpWeights& w, const Tensor& x, MlpActs& a) { gate_up_products(be, w, x, a); }

void moe_backward(core::Backend& be, const ModelConfig& cfg, const LayerWeights& w, const LayerWeights& g,
                  const Tensor& x, const MoeActs& a, const Tensor& dy, const Tensor& dyp, Tensor& dx, float gbeta) {
  const int64_t m = x.size(0), h = x.size(1), e = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
  const int64_t inter = cfg.moe_intermediate_size;
  // Where the router's weights and the shared experts' gate and up lie one after the other (as the
  // forward's product reads them) and so do their gradients, the router's logit gradients and the shared
  // experts' dgu share one buffer [dlogits | dgu], and one product (and one weight-gradient product)
  // takes both, after the experts.
  const Tensor w_both = w.shared.down.defined() ? stacked_with(w.router, w.shared.gate_up) : Tensor();
  Tensor g_both = w_both.defined() ? stacked_with(g.router, g.shared.gate_up) : Tensor();
  Tensor dl_dgu;
  if (g_both.defined()) {
    dl_dgu = be.empty({m, g_both.size(0)}, product_dtype(be));
    Tensor dgu_shared = dl_dgu.slice(1, e, g_both.size(0) - e);
    mlp_backward(be, w.shared, g.shared, x, a.shared, dy, dyp, dx, gbeta, &dgu_shared);
  } else if (w.shared.down.defined()) {
    mlp_backward(be, w.shared, g.shared, x, a.shared, dy, dyp, dx, gbeta);
  }
  // Combine and experts. Expert row r's output went into its token's sum scaled by the routing weight
  // s[r], so its gradient is s[r] · dy[token]: the down product reads dy's rows where they lie (through
  // token_of), grouped_silu_backward applies s[r] after it and takes s's gradient dh · act there (equal
  // to dy[token] · ys[r], without the outputs ys kept), and the down weights' gradient reads dy's rows
  // against the activations scaled by s.
  const int64_t rows = m * k;
  const Tensor dyr = dyp.defined() ? dyp : product_operand(be, dy);
  Tensor scale = be.empty({rows}), dscale = be.empty({rows});
  Tensor scale_rows = scale.view({rows, 1});
  be.scatter_rows(a.weights.view({rows, 1}), a.row_of, scale_rows);
  // d(act) in the products' dtype, as the gate_up products it meets in the gate's backward are kept (one
  // pass from the down product to dgu). The rows' input gradients too, as the experts' outputs are: each
  // token's sum over its experts is f32.
  Tensor dgu = be.empty({rows, 2 * inter}, product_dtype(be)), dxs = be.empty({rows, h}, product_dtype(be));
  Tensor scaled_act = be.empty({rows, inter}, product_dtype(be));
  Tensor gdown = g.experts_down, ggu = g.experts_gate_up;
  be.grouped_silu_backward(dyr, w.experts_down, a.offsets, a.experts.gate_up, dgu, &a.token_of, &scale, &dscale,
                           &scaled_act);
  be.grouped_gemm_wgrad(dyr, scaled_act, a.offsets, gdown, gbeta, nullptr, &a.token_of);
  scaled_act = Tensor();  // each buffer given back after its last use (the layers' backward is near the high point)
  Tensor dweights = be.empty({m, k});
  Tensor dweight_rows = dweights.view({rows, 1});
  be.gather_rows(dscale.view({rows, 1}), a.row_of, dweight_rows);
  be.grouped_gemm(dgu, w.experts_gate_up, false, a.offsets, dxs);
  be.grouped_gemm_wgrad(dgu, product_operand(be, x), a.offsets, ggu, gbeta, &a.token_of);
  dgu = Tensor();
  // dx is written by the first of its sums: the shared experts' product where they ran it, else here.
  be.moe_dispatch_backward(dxs, a.row_of, dx, /*accumulate=*/w.shared.down.defined() && !g_both.defined());
  dxs = Tensor();
  // Router: the weights are differentiable, the selection is not.
  Tensor dlogits = be.zeros({m, e});
  be.moe_route_backward(dweights, a.scores, a.idx, cfg.router(), dlogits);
  if (g_both.defined()) {
    Tensor dl = dl_dgu.slice(1, 0, e);
    be.copy(dlogits, dl);
    be.gemm(dl_dgu, false, w_both, false, dx, 1.0f, 1.0f);
    be.gemm(dl_dgu, true, x, false, g_both, 1.0f, gbeta);
    return;
  }
  const Tensor dl = product_operand(be, dlogits);
  be.gemm(dl, false, w.router, false, dx, 1.0f, 1.0f);
  Tensor grouter = g.router;
  be.gemm(dl, true, x, false, grouter, 1.0f, gbeta);
}

}  // namespace r1lab::model
