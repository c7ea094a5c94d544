// The DeepSeek-V3-family network (Multi-head Latent Attention + DeepSeekMoE) over a core::Backend:
// forward, a hand-written backward for every parameter, and incremental decoding through a cache that
// keeps only MLA's compressed latent and rope key per token (absorbed weights, never full K/V).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "model/config.h"
#include "model/latent_cache.h"
#include "model/weights.h"

namespace r1lab::model {

// What one layer's backward needs from its forward. M = B*T tokens.
struct AttentionActs {
  core::Tensor q_a, q_a_norm, q_a_rstd;  // [M, q_lora_rank], [M] (with query compression)
  core::Tensor ckv;                      // [M, r + rope] output of kv_a_proj_with_mqa (before rope)
  core::Tensor c_norm, c_rstd;           // [M, r] normalised latent, [M]
  // Attention's operands in the products' dtype (bf16 products: attention reads them rounded anyway):
  // q [M, heads, nope + rope] with rope applied; kv [M, heads, nope + v], the keys' nope parts and the
  // values, as the kv product makes them; k_pe [M, 1, rope], the rope key all heads share, rotated.
  // Attention reads the keys in two parts (kv's nope columns, k_pe expanded over the heads).
  core::Tensor q, kv, k_pe;
  core::Tensor out, lse;                 // [B, T, heads, v], [B, heads, T]
};
struct MlpActs {
  // [N, 2I], [N, I]. gate_up is in the products' dtype (rounded once: the gated activation is made from
  // the rounded values, and backward reads them), except the shared experts' (f32: a slice of the product
  // that also makes the router's logits, which decode gates as they are). A forward for backward keeps
  // no act: backward remakes it from gate_up (one pass over them, where it is needed).
  core::Tensor gate_up, act;
};
struct MoeActs {
  core::Tensor logits, scores, idx, weights;  // [M, E], [M, E], [M, K] I32, [M, K]
  core::Tensor token_of, row_of;              // [M*K] I32: each expert row's token (rows grouped by
                                              // expert), each assignment's row
  core::Tensor offsets;                       // [E + 1] I64 group bounds, on the device
  // Over the M*K rows. A forward for backward keeps experts.gate_up only: backward remakes the gated
  // activations from it and needs no outputs (moe_backward). Decode's forward leaves ys for the caller.
  MlpActs experts;
  core::Tensor ys;  // [M*K, H], in the products' dtype

  MlpActs shared;
};
struct LayerActs {
  core::Tensor x;                  // [M, H] layer input (f32: the residual stream)
  core::Tensor ln1, ln1_rstd;      // input_layernorm
  AttentionActs attn;
  core::Tensor h1;                 // [M, H] x + attention
  core::Tensor ln2, ln2_rstd;      // post_attention_layernorm
  // With bf16 products, the norms' inputs x and h1 rounded to bf16 (the norms write them): what the
  // norms' backward reads. Recompute::kNone keeps these instead of x and h1 (half the bytes); the modes
  // that remake the norms keep x and h1, and backward rounds them the same way.
  core::Tensor x_rounded, h1_rounded;
  MlpActs mlp;
  MoeActs moe;
};
// What a training forward keeps for backward (Model::set_recompute). Backward remakes the rest with the
// same ops on the same inputs, so the gradients are the same bits in every mode.
enum class Recompute {
  kNone,       // every layer's activations: the fastest step
  kSelective,  // all but what cheap ops remake: the norms' outputs and attention's q, k and v (from the
               // kept latents)
  kExperts,    // kSelective's, and the routed experts' and dense MLPs' products: backward runs the
               // experts' products again (the largest activations of a MoE layer: k rows a token)
  kLayers,     // each layer's input only: backward runs the layer's forward again before its backward
};
// "none", "selective", "experts", "layers"
absl::StatusOr<Recompute> recompute_from_name(std::string_view name);
std::string_view recompute_name(Recompute r);

struct ForwardState {
  int64_t batch = 0, seq = 0;
  Recompute recompute = Recompute::kNone;  // what the layers hold
  core::Tensor tokens, positions;  // [M] I32 on the backend
  std::vector<LayerActs> layers;
  // [M, H], [M, H], [M]. x_final: the final norm's input as its backward reads it (rounded to bf16 with
  // bf16 products, f32 otherwise).
  core::Tensor x_final, normed, final_rstd;
  core::Tensor lse;                          // [M] log-sum-exp of the logits (forward_logprobs)
  // d(loss)/d(normed) [M, H] where forward_logprobs ran the head's backward too, and the beta its
  // products used for the matrix weights' gradients (backward_from_head goes on from there).
  core::Tensor dnormed;
  float grad_beta = 1.0f;
  // The bytes of backend memory the state holds (a storage that several tensors view counted once).
  int64_t bytes() const;
};

// What forward_logprobs can report besides the log-probabilities.
struct HeadStats {
  core::Tensor entropy;  // [M] f32: the entropy of each row's next-token distribution (nats)
  core::Tensor argmax;   // [M] I32: each row's most likely next token
};

// d(loss)/d(logprob) of a chunk of rows, queued on the backend from their log-probabilities lp ([n],
// rows row0 .. row0 + n - 1 of the batch): how forward_logprobs runs the head's backward in its own pass
// when the loss's gradient per row is known from that row's log-probability.
using LogprobGradient = std::function<core::Tensor(const core::Tensor& lp, int64_t row0)>;

struct StepTensors;  // model/layers.h

class Model {
 public:
  // Parameters zeroed; call init_random or load.
  Model(ModelConfig cfg, core::Backend& backend);
  // config.json + weights of a Hugging Face directory.
  static absl::StatusOr<std::unique_ptr<Model>> load(const std::string& dir, core::Backend& backend);

  // Linear and embedding weights ~ N(0, std²), norms 1, router bias 0 (transformers' init).
  void init_random(uint64_t seed, float std);
  absl::Status save(const std::string& dir, ExpertLayout layout = ExpertLayout::kFused) const;

  const ModelConfig& config() const { return cfg_; }
  core::Backend& backend() const { return backend_; }
  ParameterSet& params() { return params_; }
  // The gradients; zeros where zero_grads left them for the next backward to overwrite.
  ParameterSet& grads();
  const ParameterSet& params() const { return params_; }
  // Gradients to zero. The matrix weights' gradients (the products' operands) are not cleared now: the
  // next backward writes them instead of adding to them (saving a pass over them and the reads of the
  // adds), and grads() clears them if it is asked first. The rest (norms, the embedding, the router
  // bias) are cleared now.
  void zero_grads();

  // tokens: host I32 [B, T] at positions 0..T-1. Returns logits [B*T, V] on the backend.
  // state: keeps what backward needs. hidden: as transformers' output_hidden_states: the embeddings,
  // the output of every layer but the last, then the final normalised hidden state ([B*T, H] each).
  core::Tensor forward(const core::Tensor& tokens, ForwardState* state = nullptr,
                       std::vector<core::Tensor>* hidden = nullptr);
  // Accumulates d(loss)/d(parameter) into grads() from dlogits [B*T, V] (the first backward after
  // zero_grads writes the matrix weights' gradients). Each backward here uses up what its state holds
  // for the head: a state serves one backward.
  void backward(ForwardState& state, const core::Tensor& dlogits);

  // The log-probability of each row's target (targets: backend I32 [B*T]) as [B*T] on the backend,
  // with the LM head and log-softmax run over chunks of rows: the [B*T, V] logits never exist whole
  // (one chunk of head_chunk_rows() rows at a time), here or in backward_logprobs.
  // stats: also each row's softmax entropy and argmax ([B*T] f32 and I32 on the backend), from the same chunks.
  // gradient (with state): the head's backward as well, in the same pass, each chunk's logits made once
  // for both; its gradients go into grads() and backward_from_head(state) does the rest of the backward.
  core::Tensor forward_logprobs(const core::Tensor& tokens, const core::Tensor& targets, ForwardState* state,
                                HeadStats* stats = nullptr, const LogprobGradient* gradient = nullptr);
  // Accumulates into grads() from dlp = d(loss)/d(logprob) [B*T], after forward_logprobs with `state`.
  // The head's logits are recomputed chunk by chunk.
  void backward_logprobs(ForwardState& state, const core::Tensor& targets, const core::Tensor& dlp);
  // The backward below the head, after forward_logprobs ran the head's (same gradients as
  // backward_logprobs with the dlp that `gradient` gave).
  void backward_from_head(ForwardState& state);
  // Rows a chunk: 128 MiB of f32 logits by default; set_head_chunk_rows(n > 0) fixes it.
  int64_t head_chunk_rows() const;
  void set_head_chunk_rows(int64_t rows) { head_chunk_rows_ = rows; }
  // What forwards that keep a state hold for backward from now on (kNone by default).
  void set_recompute(Recompute r) { recompute_ = r; }
  Recompute recompute() const { return recompute_; }

  // Runs the new tokens of `step` (prompt chunks and decode tokens of many sequences) over the paged
  // latent cache: stores their latents in their slots and returns the logits [logit_rows, V] of the rows
  // step.logit_rows names. Attention runs in latent space with the absorbed weights. A token's result
  // does not depend on what else is in the step (up to the rounding of the kernels a batch size picks).
  //
  // Decode steps (one token a sequence, every one wanting logits) replay a captured graph of the whole
  // step where the backend can capture (Backend::capture), one per batch bucket and block-table width
  // bucket: the batch is padded with rows that write and read only the cache's pad block, the tables
  // with unused columns. A shape is captured the second time it comes (the first runs as it comes and
  // warms every buffer). The logits then live in the graph's output buffer: read them before the next
  // step. set_step_graphs(false) runs every step as it comes.
  core::Tensor forward_step(const StepBatch& step, LatentCache& cache);
  void set_step_graphs(bool on) { step_graphs_on_ = on; }
  // Tells forward_step that the parameters changed in place (Engine::update_weights calls it; forward,
  // forward_logprobs, load and init_random need no call).
  void weights_changed() {
    ++weights_epoch_;
    rounded_written_ = false;
  }
  // The bf16 copy of the parameters that bf16 products read (undefined where products take f32), for an
  // optimizer to write as it updates them (Backend::adamw_update's `rounded`). rounded_weights_written()
  // then spares the next forward its conversion of the whole buffer.
  core::Tensor rounded_weights() const { return mm_buffer_; }
  void rounded_weights_written() {
    rounded_written_ = true;
    mm_epoch_ = weights_epoch_;
  }

  ~Model();

 private:
  struct StepGraph;
  // The device part of forward_step on uploaded inputs: logits [rows, V] of the rows logit_rows names
  // (all rows when it is null) into `logits`.
  void run_step(const StepTensors& st, const core::Tensor& ids, const core::Tensor* logit_rows, LatentCache& cache,
                core::Tensor& logits);
  core::Tensor forward_step_graph(const StepBatch& step, LatentCache& cache, int64_t max_blocks);
  core::Tensor embed(const core::Tensor& tokens_host, core::Tensor* ids_out);
  // Embedding through the final norm: fills state (its layers only when keep).
  void forward_hidden(const core::Tensor& tokens, ForwardState& state, bool keep,
                      std::vector<core::Tensor>* hidden);
  // From d(loss)/d(final normalised hidden state) down to the embeddings; gbeta for the matrix
  // weights' gradients as in mla_backward.
  // Uses up the state's head tensors (x_final, normed): a state serves one backward.
  void backward_hidden(ForwardState& state, core::Tensor dnormed, float gbeta);
  // The beta of this backward's first write into each matrix weight's gradient: 0 (overwrite) once
  // after zero_grads, else 1.
  float take_grad_beta();
  // The norm after a layer, run in the pass of the layer's residual add: its weight, its outputs (y in
  // its own dtype, rstd) and, defined, its input rounded to bf16 (rounded).
  struct FusedNorm {
    const core::Tensor* w = nullptr;
    core::Tensor y, rstd, rounded;
  };
  // Layer l from its input x [M, H] (positions [M], `batch` sequences): returns its output; `a` holds
  // what backward needs (the experts' products for backward too where for_backward). The layer's input
  // norm (a.ln1, a.ln1_rstd, a.x_rounded) comes made by the previous layer's last pass where a.ln1 is
  // defined; with next, the norm after the layer runs in its residual add's pass. round_inputs (bf16
  // products, for backward): the norms also write their inputs rounded (a.x_rounded, a.h1_rounded), where
  // the state keeps them.
  core::Tensor layer_forward(int l, const core::Tensor& x, const core::Tensor& positions, int64_t batch, LayerActs& a,
                             bool for_backward, FusedNorm* next, bool round_inputs);
  // The activations kSelective (with `products`, kExperts) drops, made again from what it keeps.
  void remake_dropped(int l, const core::Tensor& positions, bool products, LayerActs& a);
  // Remakes the low-precision copy of the matrix weights from the parameters: always (but once after
  // rounded_weights_written()), or when weights_changed() was called since the last time.
  void refresh_matmul_weights(bool always);
  // Positions start .. start+t-1 of each of `batch` sequences, [batch * t] I32 on the backend.
  core::Tensor positions(int64_t batch, int64_t t, int64_t start);

  ModelConfig cfg_;
  core::Backend& backend_;
  ParameterSet params_;
  ParameterSet grads_;
  bool matrix_grads_stale_ = false;  // zero_grads left the matrix weights' gradients for backward to write
  // What the layers read: views of params_, except where the backend's products round weights to bf16
  // (Backend::weight_dtype): there the matrix weights are views of mm_buffer_, a bf16 copy of the
  // parameters made before every forward (forward_step: when the weights changed), so that products
  // read 2 bytes a weight and convert nothing.
  Weights w_;
  Weights g_;
  core::Tensor mm_buffer_;
  int64_t weights_epoch_ = 0, mm_epoch_ = -1;
  bool rounded_written_ = false;  // the optimizer wrote mm_buffer_ with its update, nothing since
  core::RopeTable rope_;
  int64_t head_chunk_rows_ = 0;
  Recompute recompute_ = Recompute::kNone;
  bool step_graphs_on_ = true;
  std::map<std::pair<int64_t, int64_t>, std::unique_ptr<StepGraph>> step_graphs_;  // by (batch, width) bucket
  uint64_t graphs_cache_ = 0;  // LatentCache::id() of the cache the graphs were captured over
};

// Sequences in the layout forward_logprobs takes them: tokens [B, T] I32 and each position's next token
// as its target [B*T] I32 (host tensors), T the longest sequence, positions past a sequence's end 0 (a
// row's logprobs do not depend on them: attention is causal). The trainer's micro-batches and the rollout
// engine's rescoring both lay sequences out so.
struct PaddedTokens {
  int64_t b = 0, t = 0;
  core::Tensor tokens, targets;
};
PaddedTokens pad_tokens(const std::vector<const std::vector<int32_t>*>& seqs);

}  // namespace r1lab::model
