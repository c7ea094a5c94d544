// Token cross-entropy for supervised fine-tuning (cold start, rejection sampling, distillation):
//   loss = -Σ_m w_m · log p(target_m | prefix) / Σ_m w_m,
// with per-token weights w (0 masks prompt tokens and padding).
#pragma once

#include "core/backend.h"
#include "model/model.h"

namespace r1lab::trainer {

// logits [M, V] and targets [M] I32 on the backend; weights: host f32 [M]. Returns the loss; when
// dlogits is given ([M, V] on the backend) the gradient is written into it.
double cross_entropy(core::Backend& be, const core::Tensor& logits, const core::Tensor& targets,
                     const core::Tensor& weights, core::Tensor* dlogits);

// The same loss of the model on tokens (host I32 [B, T]) through its chunked log-probability head, so
// no [M, V] logits exist; with backward, the gradient is accumulated into the model's grads().
double cross_entropy(model::Model& m, const core::Tensor& tokens, const core::Tensor& targets,
                     const core::Tensor& weights, bool backward);

}  // namespace r1lab::trainer
