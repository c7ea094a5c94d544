#include "rollout/proto_convert.h"

#include <limits>

#include "absl/strings/str_cat.h"

namespace r1lab::rollout {

absl::StatusOr<std::vector<GroupRequest>> groups_from_proto(const pb::GenerateRequest& req) {
  std::vector<GroupRequest> out;
  out.reserve(static_cast<size_t>(req.groups_size()));
  for (int i = 0; i < req.groups_size(); ++i) {
    const pb::PromptGroup& g = req.groups(i);
    const pb::SamplingParams& s = g.sampling();
    GroupRequest r;
    r.prompt.assign(g.prompt_token_ids().begin(), g.prompt_token_ids().end());
    r.num_samples = g.group_size();
    SamplingParams& p = r.params;
    p.temperature = s.has_temperature() ? s.temperature() : 1.0f;
    p.top_p = s.has_top_p() ? s.top_p() : 1.0f;
    p.top_k = s.top_k();
    p.min_p = s.min_p();
    p.max_new_tokens = s.max_new_tokens();
    p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
    p.stop_strings.assign(s.stop_strings().begin(), s.stop_strings().end());
    switch (s.stop_string_mode()) {
      case pb::STOP_STRING_MODE_EXCLUDE:
        p.include_stop_string = false;
        break;
      case pb::STOP_STRING_MODE_INCLUDE:
        p.include_stop_string = true;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("group ", i, ": unknown stop_string_mode ", static_cast<int>(s.stop_string_mode())));
    }
    p.seed = s.has_seed() ? s.seed() : 0;
    p.logprobs = s.has_logprobs() ? s.logprobs() : true;
    out.push_back(std::move(r));
  }
  return out;
}

void groups_to_proto(const std::vector<GroupRequest>& groups, pb::GenerateRequest* req) {
  for (const GroupRequest& r : groups) {
    pb::PromptGroup* g = req->add_groups();
    g->mutable_prompt_token_ids()->Add(r.prompt.begin(), r.prompt.end());
    g->set_group_size(r.num_samples);
    pb::SamplingParams* s = g->mutable_sampling();
    const SamplingParams& p = r.params;
    s->set_temperature(p.temperature);
    s->set_top_p(p.top_p);
    s->set_top_k(p.top_k);
    s->set_min_p(p.min_p);
    s->set_max_new_tokens(p.max_new_tokens);
    s->mutable_stop_token_ids()->Add(p.stop_token_ids.begin(), p.stop_token_ids.end());
    for (const std::string& stop : p.stop_strings) s->add_stop_strings(stop);
    s->set_stop_string_mode(p.include_stop_string ? pb::STOP_STRING_MODE_INCLUDE : pb::STOP_STRING_MODE_EXCLUDE);
    s->set_seed(p.seed);
    s->set_logprobs(p.logprobs);
  }
}

namespace {

pb::FinishReason to_proto(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return pb::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return pb::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled:
      return pb::FINISH_REASON_CANCELLED;
  }
  return pb::FINISH_REASON_UNSPECIFIED;
}

FinishReason from_proto(pb::FinishReason r) {
  switch (r) {
    case pb::FINISH_REASON_STOP:
      return FinishReason::kStop;
    case pb::FINISH_REASON_CANCELLED:
      return FinishReason::kCancelled;
    default:
      return FinishReason::kLength;
  }
}

}  // namespace

void completion_to_proto(const Completion& c, pb::Completion* out) {
  out->set_group_index(c.group);
  out->set_sample_index(c.sample);
  out->mutable_token_ids()->Add(c.tokens.begin(), c.tokens.end());
  out->mutable_logprobs()->Add(c.logprobs.begin(), c.logprobs.end());
  out->set_text(c.text);
  out->set_finish_reason(to_proto(c.finish_reason));
  out->set_stop(c.stop);
  out->set_policy_version(c.policy_version);
  out->set_first_policy_version(c.first_policy_version);
  out->set_prompt_tokens(c.prompt_tokens);
  out->set_cached_prompt_tokens(c.cached_prompt_tokens);
  out->set_preemptions(c.preemptions);
  out->set_queue_seconds(c.queue_seconds);
  out->set_first_token_seconds(c.first_token_seconds);
  out->set_total_seconds(c.total_seconds);
}

Completion completion_from_proto(const pb::Completion& c) {
  Completion out;
  out.group = c.group_index();
  out.sample = c.sample_index();
  out.tokens.assign(c.token_ids().begin(), c.token_ids().end());
  out.logprobs.assign(c.logprobs().begin(), c.logprobs().end());
  out.text = c.text();
  out.finish_reason = from_proto(c.finish_reason());
  out.stop = c.stop();
  out.policy_version = c.policy_version();
  out.first_policy_version = c.first_policy_version();
  out.prompt_tokens = c.prompt_tokens();
  out.cached_prompt_tokens = c.cached_prompt_tokens();
  out.preemptions = c.preemptions();
  out.queue_seconds = c.queue_seconds();
  out.first_token_seconds = c.first_token_seconds();
  out.total_seconds = c.total_seconds();
  return out;
}

void health_to_proto(const Health& h, pb::HealthResponse* out) {
  out->set_policy_version(h.policy_version);
  out->set_model(h.model);
  out->set_vocab_size(h.vocab_size);
  out->set_max_context(h.max_context);
  out->set_has_tokenizer(h.has_tokenizer);
  out->set_running_sequences(h.stats.running);
  out->set_waiting_sequences(h.stats.waiting);
  out->set_block_size(h.stats.block_size);
  out->set_cache_blocks_total(h.stats.blocks_total);
  out->set_cache_blocks_in_use(h.stats.blocks_in_use);
  out->set_cache_blocks_cached(h.stats.blocks_cached);
  out->set_steps(h.stats.steps);
  out->set_tokens_generated(h.stats.tokens_generated);
  out->set_prefix_hit_tokens(h.stats.prefix_hit_tokens);
  out->set_preemptions(h.stats.preemptions);
  out->set_uptime_seconds(h.uptime_seconds);
}

Health health_from_proto(const pb::HealthResponse& h) {
  Health out;
  out.policy_version = h.policy_version();
  out.model = h.model();
  out.vocab_size = h.vocab_size();
  out.max_context = h.max_context();
  out.has_tokenizer = h.has_tokenizer();
  out.stats.policy_version = h.policy_version();
  out.stats.running = h.running_sequences();
  out.stats.waiting = h.waiting_sequences();
  out.stats.block_size = h.block_size();
  out.stats.blocks_total = h.cache_blocks_total();
  out.stats.blocks_in_use = h.cache_blocks_in_use();
  out.stats.blocks_cached = h.cache_blocks_cached();
  out.stats.steps = h.steps();
  out.stats.tokens_generated = h.tokens_generated();
  out.stats.prefix_hit_tokens = h.prefix_hit_tokens();
  out.stats.preemptions = h.preemptions();
  out.uptime_seconds = h.uptime_seconds();
  return out;
}

pb::DType dtype_to_proto(core::DType d) {
  switch (d) {
    case core::DType::kF32:
      return pb::DTYPE_F32;
    case core::DType::kBF16:
      return pb::DTYPE_BF16;
    case core::DType::kF16:
      return pb::DTYPE_F16;
    default:
      return pb::DTYPE_UNSPECIFIED;
  }
}

absl::StatusOr<core::DType> dtype_from_proto(pb::DType d) {
  switch (d) {
    case pb::DTYPE_F32:
      return core::DType::kF32;
    case pb::DTYPE_BF16:
      return core::DType::kBF16;
    case pb::DTYPE_F16:
      return core::DType::kF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat("dtype ", static_cast<int>(d), " (F32, BF16, F16 accepted)"));
  }
}

}  // namespace r1lab::rollout
