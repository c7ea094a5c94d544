#include "trainer/policy.h"

#include <algorithm>
#include <cmath>

namespace r1lab::trainer {
namespace {

using core::Tensor;

// One micro-batch laid out for the model: tokens [B, T] right-padded; row i*T + j predicts token j + 1
// of sequence i; completion rows are j in [prompt_len - 1, len - 2].
struct Packed {
  int64_t b = 0, t = 0;
  Tensor tokens;   // host I32 [B, T]
  Tensor targets;  // host I32 [B*T]
  size_t begin = 0;  // batch position of row 0 (row r is sequence begin + r)
  const TrainSequence& seq(const std::vector<TrainSequence>& batch, int64_t r) const {
    return batch[begin + static_cast<size_t>(r)];
  }
};

Packed pack(const std::vector<TrainSequence>& batch, size_t begin, size_t end) {
  std::vector<const std::vector<int32_t>*> seqs;
  for (size_t i = begin; i < end; ++i) {
    const TrainSequence& s = batch[i];
    CHECK(s.prompt_len >= 1 && s.prompt_len <= static_cast<int32_t>(s.tokens.size()))
        << "sequence " << i << ": prompt_len " << s.prompt_len << " of " << s.tokens.size() << " tokens";
    seqs.push_back(&s.tokens);
  }
  model::PaddedTokens padded = model::pad_tokens(seqs);
  Packed p;
  p.b = padded.b;
  p.t = padded.t;
  p.tokens = std::move(padded.tokens);
  p.targets = std::move(padded.targets);
  p.begin = begin;
  return p;
}

int64_t completion_len(const TrainSequence& s) { return static_cast<int64_t>(s.tokens.size()) - s.prompt_len; }

// Logprobs of the targets, [B*T] host, and the backend tensors backward needs. The LM head runs in
// chunks of rows (Model::forward_logprobs): no [B*T, V] logits, and only [B*T] vectors come to the host.
struct MicroForward {
  model::ForwardState state;
  Tensor targets;                   // backend I32 [B*T]
  Tensor lp_host;                   // [B*T] f32
  Tensor entropy_host, argmax_host; // [B*T] f32 and I32, with want_stats
};

// gradient: the head's backward in the same pass (then backward_from_head(f.state) goes on).
MicroForward run_forward(model::Model& m, const Packed& p, bool keep_state, bool want_stats,
                         const model::LogprobGradient* gradient = nullptr) {
  core::Backend& be = m.backend();
  MicroForward f;
  f.targets = be.zeros({p.b * p.t}, core::DType::kI32);
  be.upload(p.targets, f.targets);
  model::HeadStats stats;
  const Tensor lp =
      m.forward_logprobs(p.tokens, f.targets, keep_state ? &f.state : nullptr, want_stats ? &stats : nullptr, gradient);
  if (gradient) m.backward_from_head(f.state);  // queued before the downloads below wait for the device
  f.lp_host = be.download(lp);
  if (want_stats) {
    f.entropy_host = be.download(stats.entropy);
    f.argmax_host = be.download(stats.argmax);
  }
  return f;
}

// The entropy summed over the completion rows of a micro-batch.
double entropy_sum(const MicroForward& f, const Packed& p, const std::vector<TrainSequence>& batch) {
  double sum = 0;
  for (int64_t r = 0; r < p.b; ++r) {
    const TrainSequence& s = p.seq(batch, r);
    for (int64_t j = s.prompt_len - 1; j + 1 < static_cast<int64_t>(s.tokens.size()); ++j)
      sum += f.entropy_host.f32()[r * p.t + j];
  }
  return sum;
}

}  // namespace

std::vector<std::vector<float>> completion_logprobs(model::Model& model, const std::vector<TrainSequence>& batch,
                                                    int micro_batch) {
  CHECK(micro_batch > 0);
  std::vector<std::vector<float>> out(batch.size());
  for (size_t begin = 0; begin < batch.size(); begin += static_cast<size_t>(micro_batch)) {
    const size_t end = std::min(batch.size(), begin + static_cast<size_t>(micro_batch));
    const Packed p = pack(batch, begin, end);
    const MicroForward f = run_forward(model, p, /*keep_state=*/false, /*want_stats=*/false);
    for (int64_t r = 0; r < p.b; ++r) {
      const TrainSequence& s = p.seq(batch, r);
      auto& lp = out[p.begin + static_cast<size_t>(r)];
      for (int64_t j = s.prompt_len - 1; j + 1 < static_cast<int64_t>(s.tokens.size()); ++j)
        lp.push_back(f.lp_host.f32()[r * p.t + j]);
    }
  }
  return out;
}

GrpoStepStats grpo_gradients(model::Model& model, const GrpoConfig& cfg, const std::vector<TrainSequence>& batch,
                             int micro_batch) {
  CHECK(micro_batch > 0);
  core::Backend& be = model.backend();
  model.zero_grads();
  GrpoNormaliser norm;
  norm.sequences = static_cast<int64_t>(batch.size());
  for (const TrainSequence& s : batch) {
    const size_t n = static_cast<size_t>(completion_len(s));
    CHECK(s.old_logprobs.size() == n || (cfg.old == GrpoConfig::Old::kPolicy && s.old_logprobs.empty()))
        << "old_logprobs: " << s.old_logprobs.size() << " for " << n << " tokens";
    CHECK(cfg.kl_beta == 0.0f || s.ref_logprobs.size() == n) << "ref_logprobs: " << s.ref_logprobs.size() << " for " << n;
    norm.tokens += static_cast<double>(n);
  }
  GrpoStepStats st;
  GrpoTokenStats ts;
  double entropy = 0, gap_sum = 0, gap_tokens = 0;
  core::ClippedRatioLoss token_loss = clipped_ratio_loss(cfg);
  token_loss.ratio_one = cfg.old == GrpoConfig::Old::kPolicy;
  for (size_t begin = 0; begin < batch.size(); begin += static_cast<size_t>(micro_batch)) {
    const size_t end = std::min(batch.size(), begin + static_cast<size_t>(micro_batch));
    const Packed p = pack(batch, begin, end);
    const int64_t rows = p.b * p.t;
    // What each row's gradient needs besides its logprob, (old, ref, advantage, coefficient), known
    // before the forward: the head's backward runs in the forward's pass (clipped_ratio_grad on each
    // chunk's logprobs). Rows outside the completions get coefficient 0.
    Tensor per_row = Tensor::zeros({rows, 4});
    double call_tokens = 0;
    for (int64_t r = 0; r < p.b; ++r) call_tokens += static_cast<double>(completion_len(p.seq(batch, r)));
    for (int64_t r = 0; r < p.b; ++r) {
      const TrainSequence& s = p.seq(batch, r);
      const int64_t n = completion_len(s);
      const float coef = static_cast<float>(grpo_token_weight(cfg, static_cast<double>(n), call_tokens, p.b, norm));
      for (int64_t k = 0; k < n; ++k) {
        float* row = per_row.f32() + 4 * (r * p.t + s.prompt_len - 1 + k);
        row[0] = cfg.old == GrpoConfig::Old::kPolicy ? 0.0f : s.old_logprobs[static_cast<size_t>(k)];
        row[1] = cfg.kl_beta == 0.0f ? 0.0f : s.ref_logprobs[static_cast<size_t>(k)];
        row[2] = s.advantage;
        row[3] = coef;
      }
    }
    Tensor per_row_dev = be.empty({rows, 4});
    be.upload(per_row, per_row_dev);
    const model::LogprobGradient gradient = [&](const Tensor& lp, int64_t row0) {
      Tensor dlp = be.empty({lp.numel()});
      be.clipped_ratio_grad(lp, per_row_dev.slice(0, row0, lp.numel()), token_loss, dlp);
      return dlp;
    };
    MicroForward f = run_forward(model, p, /*keep_state=*/true, /*want_stats=*/true, &gradient);
    // The loss and its statistics from the same logprobs, on the host.
    Tensor logp = Tensor::zeros({p.b, p.t}), old = Tensor::zeros({p.b, p.t}), ref = Tensor::zeros({p.b, p.t});
    Tensor mask = Tensor::zeros({p.b, p.t}), adv = Tensor::zeros({p.b});
    std::copy(f.lp_host.f32(), f.lp_host.f32() + rows, logp.f32());
    for (int64_t r = 0; r < p.b; ++r) {
      const TrainSequence& s = p.seq(batch, r);
      adv.f32()[r] = s.advantage;
      for (int64_t k = 0; k < completion_len(s); ++k) {
        const int64_t i = r * p.t + s.prompt_len - 1 + k;
        mask.f32()[i] = 1.0f;
        if (!s.old_logprobs.empty()) {
          const double gap = std::fabs(static_cast<double>(logp.f32()[i]) - s.old_logprobs[static_cast<size_t>(k)]);
          st.logprob_gap_max = std::max(st.logprob_gap_max, gap);
          gap_sum += gap;
          gap_tokens += 1;
        }
        old.f32()[i] = cfg.old == GrpoConfig::Old::kPolicy ? logp.f32()[i] : s.old_logprobs[static_cast<size_t>(k)];
        ref.f32()[i] = cfg.kl_beta == 0.0f ? logp.f32()[i] : s.ref_logprobs[static_cast<size_t>(k)];
      }
    }
    st.loss += grpo_loss(cfg, logp, old, ref, adv, mask, nullptr, norm, &ts);
    entropy += entropy_sum(f, p, batch);
  }
  st.tokens = static_cast<int64_t>(ts.tokens);
  if (ts.tokens > 0) {
    st.kl = ts.kl / ts.tokens;
    st.clip_fraction = ts.clipped / ts.tokens;
    st.ratio = ts.ratio / ts.tokens;
    st.entropy = entropy / ts.tokens;
  }
  if (gap_tokens > 0) st.logprob_gap_mean = gap_sum / gap_tokens;
  return st;
}

GrpoStepStats grpo_step(model::Model& model, AdamW& opt, const GrpoConfig& cfg,
                        const std::vector<TrainSequence>& batch, int micro_batch) {
  GrpoStepStats st = grpo_gradients(model, cfg, batch, micro_batch);
  st.opt = opt.step(model);
  return st;
}

SftStepStats sft_step(model::Model& model, AdamW& opt, const std::vector<TrainSequence>& batch, int micro_batch) {
  CHECK(micro_batch > 0);
  core::Backend& be = model.backend();
  model.zero_grads();
  double total = 0;
  for (const TrainSequence& s : batch) total += static_cast<double>(completion_len(s));
  SftStepStats st;
  if (total == 0) return st;
  double correct = 0;
  for (size_t begin = 0; begin < batch.size(); begin += static_cast<size_t>(micro_batch)) {
    const size_t end = std::min(batch.size(), begin + static_cast<size_t>(micro_batch));
    const Packed p = pack(batch, begin, end);
    const int64_t rows = p.b * p.t;
    // d loss / d logprob is -1/total on completion rows whatever the logprobs: the head's backward runs
    // in the forward's pass over it.
    Tensor dlp_host = Tensor::zeros({rows});
    for (int64_t r = 0; r < p.b; ++r) {
      const TrainSequence& s = p.seq(batch, r);
      for (int64_t j = s.prompt_len - 1; j + 1 < static_cast<int64_t>(s.tokens.size()); ++j)
        dlp_host.f32()[r * p.t + j] = static_cast<float>(-1.0 / total);
    }
    Tensor dlp = be.zeros({rows});
    be.upload(dlp_host, dlp);
    const model::LogprobGradient gradient = [&](const Tensor& lp, int64_t row0) {
      return dlp.slice(0, row0, lp.numel());
    };
    MicroForward f = run_forward(model, p, /*keep_state=*/true, /*want_stats=*/true, &gradient);
    for (int64_t r = 0; r < p.b; ++r) {
      const TrainSequence& s = p.seq(batch, r);
      for (int64_t j = s.prompt_len - 1; j + 1 < static_cast<int64_t>(s.tokens.size()); ++j) {
        const int64_t i = r * p.t + j;
        st.loss -= f.lp_host.f32()[i] / total;
        correct += f.argmax_host.data<int32_t>()[i] == p.targets.data<int32_t>()[i];
      }
    }
  }
  st.tokens = static_cast<int64_t>(total);
  st.token_accuracy = correct / total;
  st.opt = opt.step(model);
  return st;
}

}  // namespace r1lab::trainer
