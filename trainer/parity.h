// Checks the model against a Hugging Face reference fixture (../shared/fixtures/hf_deepseek_v3 format):
// logits, every hidden state, greedy generation through the latent cache, the GRPO loss through the
// trainer's own loss code, and every parameter gradient.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"

namespace r1lab::trainer {

struct ParityItem {
  std::string name;    // "logits", "hidden_states.2", "generated", "grad.<param>", ...
  std::string metric;  // "max|d|/max|ref|", "rel L2", "mismatches"
  double value = 0;
  double tolerance = 0;
  bool pass = false;
};

struct ParityReport {
  std::vector<ParityItem> items;
  double forward_ms = 0;   // one full forward of the fixture batch (best of 3)
  double backward_ms = 0;  // the GRPO backward
  bool all_pass() const;
};

struct ParityOptions {
  std::string reference;          // default: FIXTURE_DIR/reference.safetensors
  double logits_tolerance = 1e-4;  // fp32 tolerances of the fixture README
  double grad_tolerance = 1e-3;
};

absl::StatusOr<ParityReport> check_parity(const std::string& fixture_dir, core::Backend& backend,
                                          const ParityOptions& options);

}  // namespace r1lab::trainer
