// The whole network: embedding -> layers (MLA + MLP or MoE, pre-norm residual) -> norm -> lm_head.
#include "model/model.h"

#include <algorithm>
#include <functional>
#include <optional>
#include <random>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "model/layers.h"

namespace r1lab::model {

using core::Tensor;

namespace {

// What Recompute::kSelective (and with `products`, kExperts) keeps no longer (Model::remake_dropped makes
// it again).
void drop_remakeable(LayerActs& a, bool products) {
  a.ln1 = a.ln2 = Tensor();
  a.attn.q = a.attn.kv = a.attn.k_pe = Tensor();
  a.attn.q_a = a.attn.q_a_norm = a.attn.q_a_rstd = Tensor();
  if (products) a.mlp.gate_up = a.moe.experts.gate_up = Tensor();
}

template <typename F>
void for_each_tensor(const MlpActs& a, F&& f) {
  for (const Tensor* t : {&a.gate_up, &a.act}) f(*t);
}

template <typename F>
void for_each_tensor(const LayerActs& a, F&& f) {
  for (const Tensor* t : {&a.x, &a.ln1, &a.ln1_rstd, &a.h1, &a.ln2, &a.ln2_rstd, &a.x_rounded, &a.h1_rounded}) f(*t);
  const AttentionActs& n = a.attn;
  for (const Tensor* t :
       {&n.q_a, &n.q_a_norm, &n.q_a_rstd, &n.ckv, &n.c_norm, &n.c_rstd, &n.q, &n.kv, &n.k_pe, &n.out, &n.lse})
    f(*t);
  const MoeActs& e = a.moe;
  for (const Tensor* t : {&e.logits, &e.scores, &e.idx, &e.weights, &e.token_of, &e.row_of, &e.offsets, &e.ys}) f(*t);
  for_each_tensor(a.mlp, f);
  for_each_tensor(e.experts, f);
  for_each_tensor(e.shared, f);
}

}  // namespace

absl::StatusOr<Recompute> recompute_from_name(std::string_view name) {
  for (Recompute r : {Recompute::kNone, Recompute::kSelective, Recompute::kExperts, Recompute::kLayers})
    if (name == recompute_name(r)) return r;
  return absl::InvalidArgumentError(absl::StrCat(
      "no recompute mode \"", std::string(name), "\": none, selective (remake cheap activations in backward), ",
      "experts (and the experts' products) and layers (run each layer's forward again in backward)"));
}

std::string_view recompute_name(Recompute r) {
  switch (r) {
    case Recompute::kNone:
      return "none";
    case Recompute::kSelective:
      return "selective";
    case Recompute::kExperts:
      return "experts";
    case Recompute::kLayers:
      return "layers";
  }
  return "?";
}

int64_t ForwardState::bytes() const {
  std::set<const core::Storage*> seen;
  int64_t total = 0;
  const auto count = [&](const Tensor& t) {
    if (t.defined() && seen.insert(t.storage().get()).second) total += static_cast<int64_t>(t.storage()->bytes());
  };
  for (const Tensor* t : {&tokens, &positions, &x_final, &normed, &final_rstd, &lse, &dnormed}) count(*t);
  for (const LayerActs& a : layers) for_each_tensor(a, count);
  return total;
}

Model::Model(ModelConfig cfg, core::Backend& backend)
    : cfg_(std::move(cfg)), backend_(backend), params_(cfg_, backend), grads_(cfg_, backend) {
  w_ = bind_weights(cfg_, params_);
  g_ = bind_weights(cfg_, grads_);
  if (backend_.weight_dtype() != core::DType::kF32) {
    mm_buffer_ = backend_.zeros({params_.numel()}, backend_.weight_dtype());
    w_ = matmul_views(w_, params_.buffer(), mm_buffer_);
  }
  core::RopeTable host = make_rope_table(cfg_, cfg_.max_position_embeddings);
  rope_.cos = backend_.zeros(host.cos.shape());
  rope_.sin = backend_.zeros(host.sin.shape());
  backend_.upload(host.cos, rope_.cos);
  backend_.upload(host.sin, rope_.sin);
}

absl::StatusOr<std::unique_ptr<Model>> Model::load(const std::string& dir, core::Backend& backend) {
  R1LAB_ASSIGN_OR_RETURN(ModelConfig cfg, ModelConfig::from_file(dir + "/config.json"));
  auto m = std::make_unique<Model>(std::move(cfg), backend);
  R1LAB_RETURN_IF_ERROR(load_weights(dir, m->cfg_, backend, m->params_));
  m->weights_changed();
  return m;
}

void Model::init_random(uint64_t seed, float std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, std);
  Tensor host = Tensor::zeros({params_.numel()});
  float* p = host.f32();
  for (const ParamInfo& info : params_.infos()) {
    const int64_t n = core::shape_numel(info.shape);
    const bool is_norm = absl::EndsWith(info.name, "norm.weight") || absl::EndsWith(info.name, "layernorm.weight");
    const bool is_bias = absl::EndsWith(info.name, "e_score_correction_bias");
    for (int64_t i = 0; i < n; ++i) p[info.offset + i] = is_norm ? 1.0f : is_bias ? 0.0f : normal(rng);
  }
  Tensor buf = params_.buffer();
  backend_.upload(host, buf);
  weights_changed();
}

void Model::refresh_matmul_weights(bool always) {
  const bool written = rounded_written_;
  rounded_written_ = false;  // once: later forwards convert as before
  if (!mm_buffer_.defined() || written || (!always && mm_epoch_ == weights_epoch_)) return;
  backend_.copy(params_.buffer(), mm_buffer_);
  mm_epoch_ = weights_epoch_;
}

absl::Status Model::save(const std::string& dir, ExpertLayout layout) const {
  return save_checkpoint(dir, cfg_, backend_, params_, layout);
}

void Model::zero_grads() {
  // Everything but the matrix weights: the norms, the embedding table (embedding_backward adds its rows
  // in), the router bias.
  const auto clear = [&](const Tensor& t) {
    if (!t.defined()) return;
    Tensor v = t;
    backend_.fill(v, 0.0f);
  };
  clear(g_.embed);
  clear(g_.final_norm);
  for (const LayerWeights& l : g_.layers) {
    clear(l.input_norm);
    clear(l.post_norm);
    clear(l.q_a_norm);
    clear(l.kv_a_norm);
    clear(l.router_bias);
  }
  matrix_grads_stale_ = true;
}

ParameterSet& Model::grads() {
  if (matrix_grads_stale_) {  // asked for before a backward wrote them
    Tensor b = grads_.buffer();
    backend_.fill(b, 0.0f);
    matrix_grads_stale_ = false;
  }
  return grads_;
}

float Model::take_grad_beta() {
  const float beta = matrix_grads_stale_ ? 0.0f : 1.0f;
  matrix_grads_stale_ = false;
  return beta;
}

Tensor Model::embed(const Tensor& tokens_host, Tensor* ids_out) {
  CHECK(tokens_host.dtype() == core::DType::kI32 && tokens_host.dim() == 2);
  const int64_t m = tokens_host.numel();
  *ids_out = backend_.empty({m}, core::DType::kI32);
  backend_.upload(tokens_host.clone().view({m}), *ids_out);
  Tensor x = backend_.empty({m, cfg_.hidden_size});
  backend_.embedding_forward(w_.embed, *ids_out, x);
  return x;
}

Tensor Model::positions(int64_t batch, int64_t t, int64_t start) {
  Tensor host = Tensor::zeros({batch * t}, core::DType::kI32);
  for (int64_t i = 0; i < batch * t; ++i) host.data<int32_t>()[i] = static_cast<int32_t>(start + i % t);
  Tensor dev = backend_.empty({batch * t}, core::DType::kI32);
  backend_.upload(host, dev);
  return dev;
}

Tensor Model::forward(const Tensor& tokens, ForwardState* state, std::vector<Tensor>* hidden) {
  ForwardState local;
  ForwardState& st = state ? *state : local;
  forward_hidden(tokens, st, state != nullptr, hidden);
  Tensor logits = backend_.empty({st.batch * st.seq, cfg_.vocab_size});
  backend_.gemm(st.normed, false, w_.lm_head, true, logits);
  return logits;
}

int64_t Model::head_chunk_rows() const {
  if (head_chunk_rows_ > 0) return head_chunk_rows_;
  constexpr int64_t kChunkElements = int64_t{1} << 25;  // 128 MiB of f32 logits a chunk
  return std::max<int64_t>(1, kChunkElements / cfg_.vocab_size);
}

namespace {

// The LM head's backward a chunk of rows at a time: d(logits) of a chunk, d(normed) = d(logits) · W, and
// the weight's gradient += d(logits)ᵀ · normed once every kDwChunks chunks (one product over that many
// rows adds into the f32 gradient a few times rather than once a chunk). forward_logprobs and
// backward_logprobs run the same products on the same rows: the same bits.
class HeadBackward {
 public:
  static constexpr int64_t kDwChunks = 2;

  HeadBackward(core::Backend& be, const Tensor& lm_head, Tensor grad, const Tensor& normed, int64_t chunk, float beta)
      : be_(be), w_(lm_head), g_(std::move(grad)), normed_(normed), beta_(beta) {
    const int64_t m = normed.size(0);
    dnormed_ = be.empty({m, normed.size(1)});  // a product a chunk of rows, with beta 0
    dlogits_ = be.empty({std::min(m, kDwChunks * chunk), lm_head.size(0)}, product_dtype(be));
  }

  // Rows r0 .. r0 + n - 1 (chunks in order) from their logits, lse and dlp = d(loss)/d(logprob).
  void chunk(int64_t r0, const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& dlp) {
    const int64_t n = logits.size(0), m = normed_.size(0);
    Tensor dlogits = dlogits_.slice(0, r0 - dw0_, n), dn = dnormed_.slice(0, r0, n);
    be_.logprobs_backward(dlp, logits, targets, lse, dlogits);
    be_.gemm(dlogits, false, w_, false, dn);
    const int64_t rows = r0 + n - dw0_;
    if (rows == dlogits_.size(0) || r0 + n == m) {
      be_.gemm(dlogits_.slice(0, 0, rows), true, normed_.slice(0, dw0_, rows), false, g_, 1.0f,
               dw0_ == 0 ? beta_ : 1.0f);
      dw0_ = r0 + n;
    }
  }

  // d(loss)/d(normed) [M, H], once every chunk is in.
  Tensor dnormed() const {
    CHECK_EQ(dw0_, normed_.size(0)) << "LM head backward: rows left out";
    return dnormed_;
  }

 private:
  core::Backend& be_;
  Tensor w_, g_, normed_, dnormed_, dlogits_;
  float beta_;
  int64_t dw0_ = 0;  // the first row whose d(logits) waits in dlogits_
};

}  // namespace

Tensor Model::forward_logprobs(const Tensor& tokens, const Tensor& targets, ForwardState* state, HeadStats* stats,
                              const LogprobGradient* gradient) {
  CHECK(gradient == nullptr || state != nullptr) << "forward_logprobs: the head's backward needs a state";
  ForwardState local;
  ForwardState& st = state ? *state : local;
  forward_hidden(tokens, st, state != nullptr, nullptr);
  const int64_t m = st.batch * st.seq, v = cfg_.vocab_size, chunk = std::min(m, head_chunk_rows());
  CHECK(targets.dtype() == core::DType::kI32 && targets.numel() == m) << "targets: [B*T] I32";
  Tensor lp = backend_.empty({m});
  st.lse = backend_.empty({m});
  if (stats) {
    stats->entropy = backend_.empty({m});
    stats->argmax = backend_.empty({m}, core::DType::kI32);
  }
  Tensor buf = backend_.empty({chunk, v});
  std::optional<HeadBackward> head;
  if (gradient) {
    st.grad_beta = take_grad_beta();
    head.emplace(backend_, w_.lm_head, g_.lm_head, st.normed, chunk, st.grad_beta);
  }
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    const int64_t n = std::min(chunk, m - r0);
    Tensor logits = buf.slice(0, 0, n), lp_c = lp.slice(0, r0, n), lse_c = st.lse.slice(0, r0, n);
    const Tensor targets_c = targets.slice(0, r0, n);
    backend_.gemm(st.normed.slice(0, r0, n), false, w_.lm_head, true, logits);
    backend_.logprobs_forward(logits, targets_c, lp_c, lse_c);
    if (stats) {
      Tensor h = stats->entropy.slice(0, r0, n), am = stats->argmax.slice(0, r0, n);
      backend_.logit_stats(logits, lse_c, h, am);
    }
    if (head) {
      // As backward_logprobs does, on the logits already here.
      const Tensor dlp = (*gradient)(lp_c, r0);
      CHECK_EQ(dlp.numel(), n) << "LogprobGradient: one value a row";
      head->chunk(r0, logits, targets_c, lse_c, dlp);
    }
  }
  if (head) st.dnormed = head->dnormed();
  return lp;
}

void Model::backward_logprobs(ForwardState& st, const Tensor& targets, const Tensor& dlp) {
  CHECK(st.lse.defined()) << "backward_logprobs needs the state of forward_logprobs";
  CHECK(!st.dnormed.defined()) << "backward_logprobs: forward_logprobs ran the head's backward already";
  const int64_t m = st.batch * st.seq, v = cfg_.vocab_size;
  const int64_t chunk = std::min(m, head_chunk_rows());
  CHECK_EQ(dlp.numel(), m);
  const float gbeta = take_grad_beta();
  Tensor dnormed;
  {  // the head's buffers given back before the layers' backward
    HeadBackward head(backend_, w_.lm_head, g_.lm_head, st.normed, chunk, gbeta);
    Tensor buf = backend_.empty({chunk, v});
    // Each chunk's logits again (one more product than keeping them, for no [M, V] tensor).
    for (int64_t r0 = 0; r0 < m; r0 += chunk) {
      const int64_t n = std::min(chunk, m - r0);
      Tensor logits = buf.slice(0, 0, n);
      backend_.gemm(st.normed.slice(0, r0, n), false, w_.lm_head, true, logits);
      head.chunk(r0, logits, targets.slice(0, r0, n), st.lse.slice(0, r0, n), dlp.slice(0, r0, n));
    }
    dnormed = head.dnormed();
  }
  backward_hidden(st, std::move(dnormed), gbeta);
}

void Model::backward_from_head(ForwardState& st) {
  CHECK(st.dnormed.defined()) << "backward_from_head: forward_logprobs ran no head backward";
  Tensor dnormed = std::move(st.dnormed);
  st.dnormed = Tensor();
  backward_hidden(st, std::move(dnormed), st.grad_beta);
}

Tensor Model::layer_forward(int l, const Tensor& x, const Tensor& positions, int64_t batch, LayerActs& a,
                            bool for_backward, FusedNorm* next, bool round_inputs) {
  const int64_t m = x.size(0);
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const LayerWeights& lw = w_.layers[l];
  a.x = x;
  // The norms' inputs rounded for their backward, by the norms (bf16 products).
  const bool round = round_inputs && for_backward && product_dtype(backend_) == core::DType::kBF16;
  if (round) a.h1_rounded = backend_.empty({m, cfg_.hidden_size}, core::DType::kBF16);
  if (!a.ln1.defined()) {  // not made by the previous layer's last pass
    if (round) a.x_rounded = backend_.empty({m, cfg_.hidden_size}, core::DType::kBF16);
    a.ln1 = backend_.empty({m, cfg_.hidden_size}, product_dtype(backend_));
    a.ln1_rstd = backend_.empty({m});
    backend_.rmsnorm_forward(x, lw.input_norm, eps, a.ln1, a.ln1_rstd, round ? &a.x_rounded : nullptr);
  }
  a.h1 = backend_.empty({m, cfg_.hidden_size});
  mla_forward(backend_, cfg_, lw, rope_, a.ln1, positions, batch, a.attn, a.h1);
  a.ln2 = backend_.empty({m, cfg_.hidden_size}, product_dtype(backend_));
  a.ln2_rstd = backend_.empty({m});
  backend_.add_rmsnorm_forward(x, a.h1, lw.post_norm, eps, a.ln2, a.ln2_rstd,  // h1 = x + attention
                               round ? &a.h1_rounded : nullptr);
  Tensor out = backend_.empty({m, cfg_.hidden_size});  // the shared experts' product or a fill, then the rest
  if (lw.moe) {
    moe_forward(backend_, cfg_, lw, a.ln2, a.moe, out, for_backward, /*combine=*/next == nullptr);
  } else {
    mlp_forward(backend_, lw.mlp, a.ln2, a.mlp, out);
  }
  // Backward remakes the gated activations from the gate/up products it keeps (mlp_backward).
  if (for_backward) a.mlp.act = a.moe.shared.act = Tensor();
  if (next == nullptr) {
    backend_.add(a.h1, out);
    return out;
  }
  // The residual add (after a MoE layer, the routed experts' weighted sum too) and the next norm in one
  // pass: the same bits as the add, then the norm.
  Tensor* rounded = next->rounded.defined() ? &next->rounded : nullptr;
  if (lw.moe) {
    backend_.moe_combine_add_rmsnorm(a.moe.ys, a.moe.weights, a.moe.row_of, a.h1, out, *next->w, eps, next->y,
                                     next->rstd, rounded);
    if (for_backward) a.moe.ys = Tensor();
  } else {
    backend_.add_rmsnorm_forward(a.h1, out, *next->w, eps, next->y, next->rstd, rounded);
  }
  return out;
}

void Model::remake_dropped(int l, const Tensor& positions, bool products, LayerActs& a) {
  const int64_t m = a.x.size(0);
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const LayerWeights& lw = w_.layers[l];
  Tensor rstd = backend_.empty({m});  // the kept rstd, again
  a.ln1 = backend_.empty({m, cfg_.hidden_size}, product_dtype(backend_));
  backend_.rmsnorm_forward(a.x, lw.input_norm, eps, a.ln1, rstd);
  mla_remake_operands(backend_, cfg_, lw, rope_, a.ln1, positions, a.attn);
  // The forward's add_rmsnorm_forward computes its norm as rmsnorm_forward does (the same bits).
  a.ln2 = backend_.empty({m, cfg_.hidden_size}, product_dtype(backend_));
  backend_.rmsnorm_forward(a.h1, lw.post_norm, eps, a.ln2, rstd);
  if (!products) return;
  if (lw.moe) {
    moe_remake(backend_, cfg_, lw, a.ln2, a.moe);
  } else {
    mlp_remake(backend_, lw.mlp, a.ln2, a.mlp);
  }
}

void Model::forward_hidden(const Tensor& tokens, ForwardState& st, bool keep, std::vector<Tensor>* hidden) {
  const int64_t batch = tokens.size(0), seq = tokens.size(1), m = batch * seq;
  CHECK_LE(seq, cfg_.max_position_embeddings);
  refresh_matmul_weights(/*always=*/true);
  st = ForwardState();
  st.batch = batch;
  st.seq = seq;
  Tensor x = embed(tokens, &st.tokens);
  st.positions = positions(batch, seq, 0);
  if (hidden) hidden->assign(1, x);
  if (keep) st.recompute = recompute_;
  // The layers' norm inputs rounded for backward where the state keeps them (kNone; the modes that remake
  // the norms keep x and h1, and backward rounds them); the final norm's in every mode.
  const bool round = keep && product_dtype(backend_) == core::DType::kBF16;
  const bool round_layers = round && recompute_ == Recompute::kNone;
  LayerActs pending;  // the next layer's input norm, made in the last pass of the layer before it
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
    LayerActs a = std::move(pending);
    pending = LayerActs();
    // The norm after this layer (the next layer's input norm, or the final norm), in its last pass. The
    // final norm's output is the LM head's operand, in the products' dtype unless the hidden states are
    // asked for; its input is kept for backward (rounded to bf16 with bf16 products).
    const bool last = l + 1 == cfg_.num_hidden_layers;
    FusedNorm next;
    next.w = last ? &w_.final_norm : &w_.layers[l + 1].input_norm;
    next.y = backend_.empty({m, cfg_.hidden_size}, last && hidden ? core::DType::kF32 : product_dtype(backend_));
    next.rstd = backend_.empty({m});
    if (last ? round : round_layers) next.rounded = backend_.empty({m, cfg_.hidden_size}, core::DType::kBF16);
    Tensor out = layer_forward(l, x, st.positions, batch, a, keep, &next, round_layers);
    if (!last) {
      pending.ln1 = next.y;
      pending.ln1_rstd = next.rstd;
      pending.x_rounded = next.rounded;
    } else {
      st.normed = next.y;
      st.final_rstd = next.rstd;
      st.x_final = next.rounded.defined() ? next.rounded : out;
    }
    if (keep) {
      if (recompute_ == Recompute::kLayers) {
        LayerActs input;
        input.x = x;
        a = std::move(input);
      } else if (recompute_ != Recompute::kNone) {
        drop_remakeable(a, recompute_ == Recompute::kExperts);
      } else if (a.x_rounded.defined()) {  // the norms' backward reads the rounded inputs only
        a.x = a.h1 = Tensor();
      }
      st.layers.push_back(std::move(a));
    }
    x = out;
    if (hidden && l + 1 < cfg_.num_hidden_layers) hidden->push_back(x);
  }
  if (hidden) hidden->push_back(st.normed);
}

void Model::backward(ForwardState& st, const Tensor& dlogits) {
  const int64_t m = st.batch * st.seq, h = cfg_.hidden_size;
  // logits = normed · lm_headᵀ
  Tensor dnormed = backend_.empty({m, h});
  const Tensor dl = product_operand(backend_, dlogits);  // rounded once for both products
  backend_.gemm(dl, false, w_.lm_head, false, dnormed);
  const float gbeta = take_grad_beta();
  Tensor glm = g_.lm_head;
  backend_.gemm(dl, true, st.normed, false, glm, 1.0f, gbeta);
  backward_hidden(st, std::move(dnormed), gbeta);
}

void Model::backward_hidden(ForwardState& st, Tensor dnormed, float gbeta) {
  CHECK_EQ(static_cast<int>(st.layers.size()), cfg_.num_hidden_layers) << "forward ran without a state";
  const int64_t m = st.batch * st.seq, h = cfg_.hidden_size;
  Tensor dx = backend_.zeros({m, h});
  // The residual gradient's copy in the products' dtype, made by the norm backward that makes it (where
  // the products are bf16): the next layer's products read that.
  const bool round = product_dtype(backend_) == core::DType::kBF16;
  const auto rounded = [&] { return round ? backend_.empty({m, h}, core::DType::kBF16) : Tensor(); };
  // A norm's input as its backward reads it: kept rounded, or rounded now as the forward would have.
  const auto norm_input = [&](const Tensor& kept_rounded, const Tensor& exact) {
    return kept_rounded.defined() ? kept_rounded : product_operand(backend_, exact);
  };
  Tensor dxp = rounded();
  Tensor gnorm = g_.final_norm;
  backend_.rmsnorm_backward(dnormed, st.x_final, w_.final_norm, st.final_rstd, dx, gnorm, round ? &dxp : nullptr);
  // The head's tensors are done with: given back before the layers' backward (which holds the most).
  dnormed = Tensor();
  st.x_final = st.normed = Tensor();
  for (int l = cfg_.num_hidden_layers - 1; l >= 0; --l) {
    const LayerWeights& lw = w_.layers[l];
    const LayerWeights& lg = g_.layers[l];
    LayerActs a;  // views of what the state keeps, and what backward makes again
    if (st.recompute == Recompute::kLayers) {
      layer_forward(l, st.layers[l].x, st.positions, st.batch, a, /*for_backward=*/true, /*next=*/nullptr,
                    /*round_inputs=*/true);
    } else {
      a = st.layers[l];
      if (st.recompute != Recompute::kNone) remake_dropped(l, st.positions, st.recompute == Recompute::kExperts, a);
    }
    // out = h1 + ffn(ln2(h1))
    Tensor dln2 = backend_.empty({m, h});  // written by the layer's backward
    if (lw.moe) {
      moe_backward(backend_, cfg_, lw, lg, a.ln2, a.moe, dx, dxp, dln2, gbeta);
    } else {
      mlp_backward(backend_, lw.mlp, lg.mlp, a.ln2, a.mlp, dx, dxp, dln2, gbeta);
    }
    Tensor dh1 = dx;  // the residual path
    Tensor dh1p = rounded();
    Tensor gpost = lg.post_norm;
    backend_.rmsnorm_backward(dln2, norm_input(a.h1_rounded, a.h1), lw.post_norm, a.ln2_rstd, dh1, gpost,
                              round ? &dh1p : nullptr);
    // h1 = x + attn(ln1(x))
    Tensor dln1 = backend_.empty({m, h});  // written by attention's backward
    mla_backward(backend_, cfg_, lw, lg, rope_, a.ln1, st.positions, a.attn, dh1, dh1p, dln1, gbeta);
    Tensor gin = lg.input_norm;
    dxp = l > 0 ? rounded() : Tensor();  // the embedding's backward takes f32
    backend_.rmsnorm_backward(dln1, norm_input(a.x_rounded, a.x), lw.input_norm, a.ln1_rstd, dh1, gin,
                              dxp.defined() ? &dxp : nullptr);
    dx = dh1;
  }
  Tensor gemb = g_.embed;
  backend_.embedding_backward(dx, st.tokens, gemb);
}

namespace {

// The step's block tables into rows of `width` entries at out (which holds zeros past each table's end
// and in rows past the step's sequences).
void fill_table_rows(const StepBatch& step, int64_t width, int32_t* out) {
  for (size_t s = 0; s < step.block_tables.size(); ++s)
    std::copy(step.block_tables[s].begin(), step.block_tables[s].end(), out + static_cast<int64_t>(s) * width);
}

Tensor upload_i32(core::Backend& be, const std::vector<int32_t>& v, const core::Shape& shape) {
  Tensor host = Tensor::wrap(const_cast<int32_t*>(v.data()), shape, core::DType::kI32);
  Tensor dev = be.empty(shape, core::DType::kI32);
  be.upload(host, dev);
  return dev;
}

}  // namespace

// Decode steps replay a graph per (batch, table width) bucket: buffers the graph reads and writes in
// place, and the graph once captured.
struct Model::StepGraph {
  Tensor inputs;  // the step's inputs, I32, in one buffer (the views below)
  StepTensors st;
  Tensor ids, logits;  // [B] I32, [B, V]
  bool warmed = false;
  std::function<void()> replay;
};

Model::~Model() = default;

namespace {

constexpr int64_t kMaxGraphBatch = 512, kMaxGraphs = 32;

// Batch buckets: powers of two and the halfway points between them (1, 2, 3, 4, 6, 8, 12, 16, ...).
int64_t batch_bucket(int64_t n) {
  int64_t b = 1;
  while (b < n) {
    if (b >= 2 && b + b / 2 >= n) return b + b / 2;
    b *= 2;
  }
  return b;
}

// Where the block tables start in a step graph's input buffer (a multiple of 4 entries).
int64_t step_tables_at(int64_t b) { return (5 * b + 1 + 3) / 4 * 4; }

int64_t width_bucket(int64_t w) {
  int64_t b = 4;
  while (b < w) b *= 2;
  return b;
}

}  // namespace

Tensor Model::forward_step(const StepBatch& step, LatentCache& cache) {
  const int64_t m = step.num_tokens(), n_seq = step.num_sequences();
  CHECK_GT(m, 0);
  CHECK_EQ(static_cast<int64_t>(step.seq_starts.size()), n_seq + 1);
  refresh_matmul_weights(/*always=*/false);
  for (int32_t p : step.positions) CHECK(p >= 0 && p < cfg_.max_position_embeddings) << "position " << p;
  size_t max_blocks = 1;
  for (const auto& t : step.block_tables) max_blocks = std::max(max_blocks, t.size());
  // One token a sequence, each wanting its logits: a decode step.
  if (step_graphs_on_ && backend_.can_capture() && m == n_seq && static_cast<int64_t>(step.logit_rows.size()) == m &&
      m <= kMaxGraphBatch)
    return forward_step_graph(step, cache, static_cast<int64_t>(max_blocks));
  StepTensors st;
  st.positions = upload_i32(backend_, step.positions, {m});
  st.slots = upload_i32(backend_, step.slots, {m});
  st.seq_starts = upload_i32(backend_, step.seq_starts, {n_seq + 1});
  st.context_lens = upload_i32(backend_, step.context_lens, {n_seq});
  std::vector<int32_t> tables(static_cast<size_t>(n_seq) * max_blocks, 0);
  fill_table_rows(step, static_cast<int64_t>(max_blocks), tables.data());
  st.block_tables = upload_i32(backend_, tables, {n_seq, static_cast<int64_t>(max_blocks)});
  Tensor ids = upload_i32(backend_, step.tokens, {m});
  if (step.device_tokens.defined()) {
    CHECK_EQ(step.device_tokens.numel(), m) << "device tokens for every token of the step";
    backend_.copy(step.device_tokens, ids);
  }
  const int64_t n_out = static_cast<int64_t>(step.logit_rows.size());
  Tensor logits = backend_.empty({n_out, cfg_.vocab_size});
  const Tensor rows = n_out > 0 ? upload_i32(backend_, step.logit_rows, {n_out}) : Tensor();
  run_step(st, ids, &rows, cache, logits);  // with no logits wanted, still the latents of every token
  return logits;
}

Tensor Model::forward_step_graph(const StepBatch& step, LatentCache& cache, int64_t max_blocks) {
  const int64_t n = step.num_sequences(), b = batch_bucket(n), w = width_bucket(max_blocks);
  if (cache.id() != graphs_cache_) {  // the graphs write another cache's memory
    step_graphs_.clear();
    graphs_cache_ = cache.id();
  }
  std::unique_ptr<StepGraph>& g = step_graphs_[{b, w}];
  if (!g) {
    if (static_cast<int64_t>(step_graphs_.size()) > kMaxGraphs) {  // shapes keep changing: start over
      step_graphs_.clear();
      return forward_step_graph(step, cache, max_blocks);
    }
    g = std::make_unique<StepGraph>();
    // Every input of the step in one buffer, so that a step uploads them in one transfer:
    // ids, positions, slots, context lengths [b] each, sequence starts [b + 1], block tables [b, w]
    // (16-byte aligned).
    g->inputs = backend_.zeros({step_tables_at(b) + b * w}, core::DType::kI32);
    const auto part = [&](int64_t at, int64_t len) { return g->inputs.slice(0, at, len); };
    g->ids = part(0, b);
    g->st.positions = part(b, b);
    g->st.slots = part(2 * b, b);
    g->st.context_lens = part(3 * b, b);
    g->st.seq_starts = part(4 * b, b + 1);
    g->st.block_tables = part(step_tables_at(b), b * w).view({b, w});
    g->logits = backend_.zeros({b, cfg_.vocab_size});
  }
  // The step's rows, then pad rows: token 0 at position 0 in the pad block, a context of one.
  const int32_t pad = static_cast<int32_t>(cache.pad_block());
  std::vector<int32_t> host(static_cast<size_t>(step_tables_at(b) + b * w), 0);
  int32_t* ids = host.data();
  int32_t *positions = ids + b, *slots = ids + 2 * b, *ctx = ids + 3 * b, *starts = ids + 4 * b;
  int32_t* tables = ids + step_tables_at(b);
  fill_table_rows(step, w, tables);
  for (int64_t i = 0; i < b; ++i) {
    starts[i + 1] = static_cast<int32_t>(i + 1);
    if (i < n) {
      ids[i] = step.tokens[i];
      positions[i] = step.positions[i];
      slots[i] = step.slots[i];
      ctx[i] = step.context_lens[i];
    } else {
      slots[i] = pad * cache.block_size();
      ctx[i] = 1;
      tables[i * w] = pad;
    }
  }
  backend_.upload(Tensor::wrap(host.data(), g->inputs.shape(), core::DType::kI32), g->inputs);
  if (step.device_tokens.defined()) {
    CHECK_EQ(step.device_tokens.numel(), n) << "device tokens for every token of the step";
    Tensor first = g->ids.slice(0, 0, n);
    backend_.copy(step.device_tokens, first);
  }
  StepGraph& sg = *g;
  const auto work = [this, &sg, &cache] { run_step(sg.st, sg.ids, nullptr, cache, sg.logits); };
  if (!sg.replay && sg.warmed) sg.replay = backend_.capture(work);
  if (sg.replay) {
    sg.replay();
  } else {
    work();
    sg.warmed = true;
  }
  return sg.logits.slice(0, 0, n);
}

void Model::run_step(const StepTensors& st, const Tensor& ids, const Tensor* logit_rows, LatentCache& cache,
                     Tensor& logits) {
  const int64_t m = ids.numel();
  Tensor x = backend_.empty({m, cfg_.hidden_size});
  backend_.embedding_forward(w_.embed, ids, x);
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  Tensor ln = backend_.empty({m, cfg_.hidden_size}, product_dtype(backend_)), rstd = backend_.empty({m});
  // Each residual add goes with the norm after it: x + attention with the post-attention norm, the
  // layer's output with the next layer's input norm.
  backend_.rmsnorm_forward(x, w_.layers[0].input_norm, eps, ln, rstd);
  // Every row wanting logits (a decode step: no logit_rows): the final norm goes in with the last
  // layer's residual add, as each layer's output goes in with the next layer's input norm.
  const int64_t n_out = logits.size(0);
  const bool all_rows = logit_rows == nullptr && n_out == m;
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
    const LayerWeights& lw = w_.layers[l];
    Tensor h1 = backend_.empty({m, cfg_.hidden_size});
    mla_forward_paged(backend_, cfg_, lw, rope_, ln, st, cache, l, h1);
    backend_.add_rmsnorm_forward(x, h1, lw.post_norm, eps, ln, rstd);
    Tensor out = backend_.empty({m, cfg_.hidden_size});
    const bool last = l + 1 == cfg_.num_hidden_layers;
    const bool fused_norm = !last || all_rows;  // the next norm in the same pass
    const Tensor& next_norm = last ? w_.final_norm : w_.layers[l + 1].input_norm;
    if (lw.moe) {
      // The routed experts' outputs go in with the residual add and the next norm, in one pass.
      MoeActs a;
      moe_forward(backend_, cfg_, lw, ln, a, out, /*for_backward=*/false, /*combine=*/!fused_norm);
      if (fused_norm) backend_.moe_combine_add_rmsnorm(a.ys, a.weights, a.row_of, h1, out, next_norm, eps, ln, rstd);
    } else {
      MlpActs a;
      mlp_forward(backend_, lw.mlp, ln, a, out);
      if (fused_norm) backend_.add_rmsnorm_forward(h1, out, next_norm, eps, ln, rstd);
    }
    if (!fused_norm) backend_.add(h1, out);
    x = out;
  }
  if (n_out == 0) return;
  if (all_rows) {  // ln holds the final norm of every row
    backend_.gemm(ln, false, w_.lm_head, true, logits);
    return;
  }
  // Only the rows that need logits go through the final norm and the head.
  Tensor picked = x;
  if (logit_rows) {
    picked = backend_.empty({n_out, cfg_.hidden_size});
    backend_.embedding_forward(x, *logit_rows, picked);
  }
  Tensor normed = backend_.empty({n_out, cfg_.hidden_size}, product_dtype(backend_)), prstd = backend_.empty({n_out});
  backend_.rmsnorm_forward(picked, w_.final_norm, eps, normed, prstd);
  backend_.gemm(normed, false, w_.lm_head, true, logits);
}

PaddedTokens pad_tokens(const std::vector<const std::vector<int32_t>*>& seqs) {
  PaddedTokens p;
  p.b = static_cast<int64_t>(seqs.size());
  for (const std::vector<int32_t>* s : seqs) p.t = std::max<int64_t>(p.t, static_cast<int64_t>(s->size()));
  p.tokens = Tensor::zeros({p.b, p.t}, core::DType::kI32);
  p.targets = Tensor::zeros({p.b * p.t}, core::DType::kI32);
  int32_t* tok = p.tokens.data<int32_t>();
  int32_t* tg = p.targets.data<int32_t>();
  for (int64_t r = 0; r < p.b; ++r) {
    const std::vector<int32_t>& s = *seqs[static_cast<size_t>(r)];
    for (size_t j = 0; j < s.size(); ++j) tok[r * p.t + static_cast<int64_t>(j)] = s[j];
    for (size_t j = 0; j + 1 < s.size(); ++j) tg[r * p.t + static_cast<int64_t>(j)] = s[j + 1];
  }
  return p;
}

}  // namespace r1lab::model
