// The rollout engine: samples groups of completions for many prompts at once, the way the best serving
// engines do it.
//
//  - Continuous batching: every step runs the new tokens of many sequences through Model::forward_step;
//    sequences join and leave at every step. Prefill and decode share a per-step token budget; a long
//    prompt is prefilled in chunks over several steps.
//  - Paged latent cache: each sequence holds a table of fixed-size blocks of MLA latents. A group's
//    prompt is prefilled once; its G samples then share the prompt's blocks, copying a shared block only
//    when they write into it (copy-on-write).
//  - Prefix cache: full blocks stay findable by content after their sequence ends, so a new prompt that
//    starts with the same tokens skips their prefill; unused cached blocks are evicted least recently
//    used first.
//  - Preemption: when blocks run out, the youngest running sequences give theirs back and are recomputed
//    later from their tokens — never dropped. A sequence's result does not depend on batching, sharing or
//    preemption: every token's arithmetic is independent of the rest of the step and every sample has its
//    own generator, seeded from (seed, sample index).
//  - Weights: update_weights swaps in a new version between steps; every completion records the versions
//    that produced it.
//
// Thread-safety: submit, cancel, update_weights and stats may be called from any thread. Steps run either
// on the engine's own thread (start) or on the caller's (step); completions are delivered on the thread
// that runs the step.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "model/latent_cache.h"
#include "model/model.h"
#include "model/vocabulary.h"
#include "rollout/block_manager.h"
#include "rollout/sampler.h"

namespace r1lab::rollout {

// One prompt, sampled num_samples times.
struct GroupRequest {
  std::vector<int32_t> prompt;
  int num_samples = 1;
  SamplingParams params;
};

enum class FinishReason { kStop, kLength, kCancelled };
const char* finish_reason_name(FinishReason r);

struct Completion {
  uint64_t request_id = 0;
  int group = 0;   // index of the group in its request
  int sample = 0;  // index of the sample in its group
  std::vector<int32_t> tokens;  // new tokens only; a stop token or the token completing a stop string included
  std::vector<float> logprobs;  // per token under the unmodified distribution (empty with logprobs off)
  std::string text;             // decoded tokens (with a vocabulary), cut before a matched stop string
  FinishReason finish_reason = FinishReason::kLength;
  std::string stop;             // the stop string, or the stop token id in decimal, that ended it
  int64_t policy_version = 0;        // of the weights that sampled the last token
  int64_t first_policy_version = 0;  // ... and the first (differs when an update landed mid-sequence)
  int64_t prompt_tokens = 0;
  int64_t cached_prompt_tokens = 0;  // prompt tokens whose latents came from the prefix cache or the group
  int preemptions = 0;
  double queue_seconds = 0;        // submit -> first scheduled
  double first_token_seconds = 0;  // submit -> first token
  double total_seconds = 0;        // submit -> finished
};

struct EngineOptions {
  int block_size = 16;                       // tokens per cache block
  int64_t num_blocks = 0;                    // 0: as many as cache_bytes holds
  int64_t cache_bytes = int64_t{256} << 20;  // latent cache size when num_blocks is 0
  // How the cache keeps its rows (model/latent_cache.h). The model and the backend must be able to:
  // LatentCache::resolve_dtype says beforehand.
  model::LatentFormat latents = model::LatentFormat::kAuto;
  // Each completion's logprobs from the trainer's forward instead of the sampling step's logits: once a
  // completion ends, Model::forward_logprobs over its prompt + completion (the completions that end in a
  // step together, padded as the trainer pads a micro-batch) under the weights that sampled its last
  // token. These are what the trainer recomputes, bit for bit where that forward gives a row the same bits
  // whatever else is in its batch, as the CPU backend does, so GRPO's ratio against them starts at exactly
  // 1; it costs one more forward over every completion. Off: the sampling step's logprobs (the decode
  // path: absorbed attention over the latent cache, rounded differently).
  bool rescore_logprobs = false;
  int64_t max_tokens_per_step = 1024;        // prefill + decode tokens in one step
  int64_t max_running = 256;                 // sequences in the running batch
  bool prefix_cache = true;
  bool step_graphs = true;  // decode steps replay captured graphs where the backend can (Model::forward_step)
  // Back-to-back decode steps overlap the host with the device: while the batch stays the same, step
  // n + 1 is queued, reading step n's picks where they were sampled, before the host takes step n's
  // picks (stop checks, completions). The same tokens as one step at a time.
  bool overlap_steps = true;
  int max_group_size = 1024;
  int64_t max_sequences_per_request = int64_t{1} << 16;
};

struct EngineStats {
  int64_t policy_version = 0;
  int64_t running = 0, waiting = 0;  // sequences
  int64_t blocks_total = 0, blocks_in_use = 0, blocks_cached = 0;
  int block_size = 0;
  int64_t steps = 0, tokens_computed = 0, tokens_generated = 0, prefix_hit_tokens = 0, preemptions = 0;
  int64_t overlapped_steps = 0;  // decode steps queued before the host took the step before's picks
  // Seconds of the engine's thread in steps: scheduling and queuing the model's device work (up to the
  // forward's return), and whole steps (through sampling). Host time near step time: the host is the
  // bottleneck, not the device.
  double host_seconds = 0, step_seconds = 0;
  // Where a step's time goes: scheduling (through the batch's description), the forward's host side
  // (uploads and the launch or graph replay), sampling (with the wait for the device's work), and
  // taking the sampled tokens (stop checks, completions).
  double schedule_seconds = 0, launch_seconds = 0, sample_seconds = 0, accept_seconds = 0;
  // Seconds in the rescoring forwards (EngineOptions::rescore_logprobs), and the tokens they ran over.
  double rescore_seconds = 0;
  int64_t rescored_tokens = 0;
};

class Engine {
 public:
  using Sink = std::function<void(Completion&&)>;

  // The engine reads the model's weights in place (an in-process trainer shares them without a copy).
  // vocab (optional, must outlive the engine) enables stop strings and completion text.
  Engine(model::Model& model, EngineOptions options, const model::Vocabulary* vocab = nullptr);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Checks every group (INVALID_ARGUMENT with a message on bad input) and queues them. on_completion
  // gets each completion as it finishes; on_done is called once afterwards (also after cancel).
  absl::StatusOr<uint64_t> submit(std::vector<GroupRequest> groups, Sink on_completion,
                                  std::function<void()> on_done = nullptr);
  // Ends a request's unfinished sequences (they complete with kCancelled) and frees their blocks.
  void cancel(uint64_t request_id);
  // Waits until no step is running, calls apply(model) (which may change the weights in place; an error
  // leaves the version as it was), then sets the version and forgets the prefix cache. version must
  // exceed the current one.
  absl::Status update_weights(int64_t version, const std::function<absl::Status(model::Model&)>& apply);
  EngineStats stats() const;
  const model::ModelConfig& config() const { return model_.config(); }
  model::Model& model() { return model_; }
  bool has_vocabulary() const { return vocab_ != nullptr; }
  bool started() const { return thread_.joinable(); }
  const EngineOptions& options() const { return opt_; }

  // Runs steps on an engine thread until stop() or destruction.
  void start();
  void stop();
  // One step on the caller's thread (only when not started). False when there was nothing to run.
  bool step();
  // Submits and hands each completion to on_completion on the caller's thread as it finishes; returning
  // false cancels the rest (not delivered). Returns when the request has ended. Without start(), the
  // caller's thread runs the steps.
  absl::Status stream(std::vector<GroupRequest> groups, const std::function<bool(Completion&&)>& on_completion);
  // Every completion, in (group, sample) order.
  absl::StatusOr<std::vector<Completion>> generate(std::vector<GroupRequest> groups);

 private:
  struct Sequence;
  struct Request;
  struct Pending;
  struct Finished;
  using Clock = std::chrono::steady_clock;

  absl::Status validate(const GroupRequest& g) const;
  bool step_locked();
  bool step_body();
  void absorb_incoming();
  bool reserve(Sequence& s, int64_t n);
  void preempt(Sequence* s);
  void match_prefix(Sequence& s);
  // Offers s's full blocks below token `upto` (computed, or being computed this step) to the prefix cache.
  void publish_full_blocks(Sequence& s, int64_t upto);
  // The sequences that sample from s's logits: s, and when its group's prompt is now in the cache, the
  // group's other samples (made here, sharing s's blocks).
  std::vector<Sequence*> samplers_of(Sequence* s);
  // Appends a sampled token (and its log-probability) and applies the stop rules.
  void accept(Sequence* s, int32_t tok, float lp);
  void finish(Sequence* s, FinishReason reason);
  // Hands completions to their request's sink and ends the request after its last.
  void deliver(Request& req, std::vector<Completion> outs);
  // The completions that finish() held back for rescoring: their logprobs from the trainer's forward,
  // then delivered. Called before anything can change the weights they were sampled with.
  void deliver_finished();
  void release_blocks(Sequence& s);
  // Gives the blocks back and forgets what was computed (recomputed from the tokens when rescheduled).
  void drop_cache(Sequence& s);
  void loop();
  void publish_stats();  // under step_mu_
  // The pending decode step (its picks still on the way): queues the next decode step over the same
  // sequences, reading those picks on the device, and then takes them. False (nothing done) where the
  // batch would change: admissions, cancels, a weight update, blocks running out, a sequence done.
  bool continue_pending();
  // The step's device work queued (Model::forward_step), its time and tokens counted.
  core::Tensor launch(const model::StepBatch& sb, Clock::time_point step_start);
  // Waits for the pending step's picks and accepts them (sequences done since it was queued skip theirs).
  void take_pending();
  // Removes the sequences that are done from running_ (never while a pending step holds them).
  void drop_done();

  model::Model& model_;
  EngineOptions opt_;
  const model::Vocabulary* vocab_;
  std::unique_ptr<model::LatentCache> cache_;
  std::unique_ptr<BlockManager> blocks_;

  // Guards the step (scheduler state, cache, weights).
  mutable std::mutex step_mu_;
  std::map<uint64_t, std::shared_ptr<Request>> requests_;
  std::vector<std::unique_ptr<Sequence>> running_;  // oldest first
  std::unique_ptr<Pending> pending_;  // a decode step whose picks the host has not taken yet
  std::vector<Finished> finished_;    // ended, waiting for their logprobs (rescore_logprobs)
  std::deque<std::unique_ptr<Sequence>> waiting_;   // preempted at the front, new at the back
  EngineStats counters_;
  EngineStats snapshot_;  // under in_mu_
  bool has_work_ = false;  // under in_mu_
  int64_t version_ = 0;
  uint64_t next_order_ = 0;

  // Guards what other threads hand in.
  mutable std::mutex in_mu_;
  std::condition_variable in_cv_;
  std::vector<std::shared_ptr<Request>> incoming_;
  std::vector<uint64_t> cancels_;
  uint64_t next_request_ = 1;
  bool stopping_ = false;
  std::atomic<int> updates_waiting_{0};  // the loop steps aside for them
  std::thread thread_;
};

// Orders completions by (group, sample).
void sort_completions(std::vector<Completion>& completions);

// The completions of one submitted request, handed from the thread that runs the engine's steps to the
// thread that consumes them:  CompletionQueue q; engine.submit(groups, q.sink(), q.on_done());
class CompletionQueue {
 public:
  Engine::Sink sink();
  std::function<void()> on_done();
  // Waits up to `wait` for completions or the request's end, then moves the completions ready into
  // *out. True when the request has ended and *out holds the last of them.
  bool take(std::deque<Completion>* out, std::chrono::steady_clock::duration wait);
  static constexpr std::chrono::steady_clock::duration kForever = std::chrono::hours(24 * 365);
  // Blocks until the request has ended (after Engine::cancel, before this queue goes away).
  void wait_done();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Completion> queue_;
  bool done_ = false;
};

// The slow reference the engine is tested and benchmarked against: re-runs the full forward over the
// whole sequence for every new token. Same sampling, seeds and stop rules as the engine (no stop strings).
absl::StatusOr<Completion> reference_generate(model::Model& m, const std::vector<int32_t>& prompt,
                                              const SamplingParams& p, int sample_index);

}  // namespace r1lab::rollout
