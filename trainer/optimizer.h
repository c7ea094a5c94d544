// AdamW over a model's one parameter buffer (decoupled weight decay on matrices only, never on norms or
// state such as the router's correction bias), global gradient-norm clipping, and the learning-rate
// schedule: linear warmup, then cosine decay to min_lr_ratio · lr. The moments checkpoint and reload
// bit-exactly, so a resumed run continues as if it never stopped.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/backend.h"
#include "model/model.h"
#include "model/weights.h"

namespace r1lab::trainer {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;  // <= 0: no clipping
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;  // the cosine's length; 0: constant after warmup
  double min_lr_ratio = 0.1;
};

// The learning rate of optimizer step `step` (0-based).
double learning_rate(const AdamWConfig& c, int64_t step);

struct StepStats {
  double grad_norm = 0;  // before clipping
  double lr = 0;
  bool clipped = false;
  bool skipped = false;  // a non-finite gradient: parameters untouched
};

// The moments live on the parameters' backend, and the update runs there (one fused pass over the
// buffer on a GPU); only the gradient norm comes back to the host, to decide clipping and skipping.
class AdamW {
 public:
  AdamW(const model::ParameterSet& params, AdamWConfig config);

  // Updates params from grads (scaled by grad_scale first, e.g. 1/micro-batches). A gradient with a NaN
  // or Inf leaves every parameter as it was and reports skipped.
  StepStats step(model::ParameterSet& params, const model::ParameterSet& grads, double grad_scale = 1.0,
                 core::Tensor* rounded = nullptr);
  // The same on the model's parameters and gradients; where its products read a bf16 copy of the
  // weights, the update writes that copy too (Model::rounded_weights), and its next forward skips the
  // conversion.
  StepStats step(model::Model& model, double grad_scale = 1.0);

  int64_t steps() const { return step_; }
  const AdamWConfig& config() const { return cfg_; }
  // m, v and the step count, to/from a safetensors file.
  absl::Status save(const std::string& path) const;
  absl::Status load(const std::string& path);

 private:
  AdamWConfig cfg_;
  int64_t step_ = 0;
  core::Backend* backend_;
  core::Tensor m_, v_;                 // [N] f32 on the backend
  std::vector<core::ParamSpan> spans_;  // the trainable parameters
};

}  // namespace r1lab::trainer
