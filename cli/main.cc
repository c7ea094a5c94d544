// r1lab: one program, subcommands as thin adapters over the libraries.
#include <algorithm>
#include <atomic>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <iostream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/marshalling.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/backend.h"
#include "core/device.h"
#include "model/model.h"
#include "nlohmann/json.hpp"
#include "rollout/engine.h"
#include "rollout/client.h"
#include "rollout/service.h"
#include "rewards/plugins.h"
#include "rewards/service.h"
#include "trainer/parity.h"
#include "run/recipe.h"
#include "run/stages.h"
#include "run/runner.h"
#include "run/report.h"
#include "sandbox/sandbox.h"

ABSL_FLAG(std::string, device, "", "backend: cpu (the reference; the default) or cuda[:N]; run: overrides the "
          "recipe's device");
ABSL_FLAG(std::string, gemm, "",
          "--device cuda: matrix products in f32 (the default), tf32, bf16 (tensor cores; "
          "f32 storage) or bf16_invariant (bf16, each row's result independent of its batch); run: overrides the "
          "recipe's gemm");
ABSL_FLAG(std::string, reference, "", "check-parity: reference tensors (default FIXTURE_DIR/reference.safetensors)");
ABSL_FLAG(std::string, model, "", "generate: a Hugging Face model directory");
ABSL_FLAG(std::string, prompt_ids, "", "generate: comma-separated prompt token ids");
ABSL_FLAG(int, max_new_tokens, 16, "generate: tokens to sample at most");
ABSL_FLAG(double, temperature, 0.0, "generate: 0 is greedy");
ABSL_FLAG(double, top_p, 1.0, "generate: nucleus mass in (0, 1]");
ABSL_FLAG(int, top_k, 0, "generate: keep the k most likely tokens (0: all)");
ABSL_FLAG(double, min_p, 0.0, "generate: drop tokens below min_p times the most likely");
ABSL_FLAG(uint64_t, seed, 0, "generate: sampling seed");
ABSL_FLAG(std::string, server, "", "generate: a rollout worker host:port to sample from instead of --model");
ABSL_FLAG(int, num_samples, 1, "generate: completions of the prompt (a group)");
ABSL_FLAG(std::vector<std::string>, stop, {}, "generate: comma-separated stop strings (needs tokenizer.json)");
ABSL_FLAG(std::string, host, "127.0.0.1", "serve-*: address to listen on (loopback by default)");
ABSL_FLAG(int, port, -1, "serve-*: port (default 50051 for serve-rollout, 50052 for serve-reward; 0: any free port, "
          "printed at start)");
ABSL_FLAG(std::string, rewards, "", "serve-reward: a reward config (JSON or YAML): named rewards {\"name\": [{\"name\": "
          "rule, \"weight\": w, \"params\": {...}, \"gate\": rule}, ...]} and \"plugins\" (see rewards/plugins.h)");
ABSL_FLAG(std::string, reward, "", "reward score: the reward(s) to apply, NAME[,NAME...] (summed)");
ABSL_FLAG(std::string, config, "", "reward score: a reward config (JSON or YAML), as serve-reward --rewards");
ABSL_FLAG(std::string, input, "", "reward score: JSONL of {\"completion\", \"answer\", ...} (- for stdin)");
ABSL_FLAG(int, block_size, 16, "serve-rollout, generate: tokens per latent-cache block");
ABSL_FLAG(int64_t, cache_mb, 256, "serve-rollout, generate: latent-cache size in MiB");
ABSL_FLAG(std::string, latents, "auto",
          "serve-rollout, generate: how the latent cache keeps its rows: auto (bf16 on a GPU with "
          "bf16 products, else f32), f32, bf16 or fp8 (E4M3 latent with power-of-two scales, bf16 rope key: about "
          "0.58 of bf16's bytes)");
ABSL_FLAG(bool, rescore_logprobs, false,
          "serve-rollout, generate: each completion's logprobs from the trainer's forward over "
          "prompt + completion once it ends (what the trainer recomputes; one more forward a completion)");
ABSL_FLAG(int64_t, max_tokens_per_step, 1024, "serve-rollout, generate: prefill + decode tokens per engine step");
ABSL_FLAG(int64_t, max_running, 256, "serve-rollout, generate: sequences decoded together at most");
ABSL_FLAG(bool, in_process, false, "run: rollout and rewards in this process instead of child processes");
ABSL_FLAG(std::string, run_dir, "", "run: the run directory (default RUNS_DIR/NAME-DATE-TIME)");
ABSL_FLAG(std::string, plots, "", "report: where to write the PNG plots (default: beside RUN_DB)");
ABSL_FLAG(std::string, out, "", "pretrain-base: the model directory to write");
ABSL_FLAG(std::string, lang, "python", "sandbox run: python, c or cpp");
ABSL_FLAG(std::string, stdin, "", "sandbox run: a file given to the program as its standard input");
ABSL_FLAG(std::string, expected, "", "sandbox run: a file with the expected standard output (WA when it differs)");
ABSL_FLAG(int64_t, time_limit_ms, 2000, "sandbox run: CPU time limit");
ABSL_FLAG(int64_t, wall_limit_ms, 0, "sandbox run: wall-clock limit (0: 2 x time limit + 1 s)");
ABSL_FLAG(int64_t, memory_mb, 256, "sandbox run: memory limit (address space per process; cgroup memory.max)");
ABSL_FLAG(int64_t, max_processes, 32, "sandbox run: processes and threads at once");
ABSL_FLAG(int64_t, output_limit_bytes, 1 << 20, "sandbox run: stdout and stderr cap each (beyond it: OLE)");
ABSL_FLAG(bool, allow_unsafe, false, "sandbox run: run even where namespaces or seccomp are missing");
ABSL_FLAG(bool, prefix_cache, true, "serve-rollout, generate: reuse cached prompt prefixes across requests");

namespace {

using r1lab::core::Backend;

constexpr char kUsage[] =
    "r1lab <command> [flags]\n"
    "commands:\n"
    "  run RECIPE.yaml [key=value ...] [--device cuda[:N] --gemm bf16 --in-process --run-dir DIR]\n"
    "      a whole run from a recipe (recipes/): base model, held-out evaluation, GRPO, evaluation again;\n"
    "      key=value overrides recipe keys (rl.steps=20); --device/--gemm override its device and gemm\n"
    "  report RUN_DIR/run.db [--plots DIR]\n"
    "      a run's summary and plots\n"
    "  pretrain-base RECIPE.yaml --out DIR [key=value ...]\n"
    "      only the recipe's base model, then its held-out accuracy\n"
    "  check-parity FIXTURE_DIR [--reference FILE] [--device cpu]\n"
    "      compare the model with a Hugging Face reference fixture; exit 0 when all items pass\n"
    "  generate (--model DIR | --server HOST:PORT) --prompt-ids 1,2,3 [--max-new-tokens N --temperature T --top-p P --top-k K\n"
    "           --min-p M --seed S --num-samples G --stop STR,...]\n"
    "      sample G continuations with the rollout engine; prints one JSON object per completion\n"
    "  serve-rollout --model DIR [--host 127.0.0.1 --port 50051 --block-size 16 --cache-mb 256\n"
    "                --max-tokens-per-step 1024 --max-running 256 --prefix-cache=true]\n"
    "      a rollout worker: the r1lab.v1.Rollout gRPC service (proto/r1lab/v1/rollout.proto)\n"
    "  serve-reward [--rewards FILE.json --host 127.0.0.1 --port 50052]\n"
    "      the reward service: r1lab.v1.Reward (proto/r1lab/v1/reward.proto) with the built-in rules\n"
    "      and the named weighted sums and plugins of FILE (JSON or YAML)\n"
    "  reward score --reward NAME[,NAME...] [--config FILE] --input FILE.jsonl\n"
    "      scores each line {\"completion\", \"answer\", \"prompt\", \"task\", \"meta\", ...} and writes it back with\n"
    "      \"reward\" and \"components\" (and \"error\" where a sample could not be judged); other fields of a\n"
    "      line reach the rewards as metadata\n"
    "  reward list [--config FILE]\n"
    "      the rewards available, one JSON object per line\n";

// --device and --gemm (empty: cpu and f32; `run` takes them from its recipe instead).
absl::StatusOr<std::unique_ptr<Backend>> make_backend() {
  const std::string d = absl::GetFlag(FLAGS_device), g = absl::GetFlag(FLAGS_gemm);
  return r1lab::core::make_backend(d.empty() ? "cpu" : d, g.empty() ? "f32" : g);
}

int fail(const absl::Status& s) {
  std::cerr << "r1lab: " << s.message() << "\n";
  return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

// The rollout engine's options from the command line (serve-rollout, and generate in process): sizes,
// the prefix cache, the latent format (checked against the model and the backend) and rescoring.
absl::StatusOr<r1lab::rollout::EngineOptions> engine_options(const r1lab::model::Model& model, const Backend& be) {
  r1lab::rollout::EngineOptions o;
  o.block_size = absl::GetFlag(FLAGS_block_size);
  o.cache_bytes = absl::GetFlag(FLAGS_cache_mb) << 20;
  o.max_tokens_per_step = absl::GetFlag(FLAGS_max_tokens_per_step);
  o.max_running = absl::GetFlag(FLAGS_max_running);
  o.prefix_cache = absl::GetFlag(FLAGS_prefix_cache);
  if (o.block_size <= 0 || o.cache_bytes <= 0 || o.max_tokens_per_step <= 0 || o.max_running <= 0)
    return absl::InvalidArgumentError(
        "--block-size, --cache-mb, --max-tokens-per-step and --max-running must be "
        "positive");
  auto latents = r1lab::model::latent_format_from_name(absl::GetFlag(FLAGS_latents));
  if (!latents.ok()) return latents.status();
  if (auto dt = r1lab::model::LatentCache::resolve_dtype(model.config(), be, *latents); !dt.ok()) return dt.status();
  o.latents = *latents;
  o.rescore_logprobs = absl::GetFlag(FLAGS_rescore_logprobs);
  return o;
}

int check_parity(const std::vector<char*>& args) {
  if (args.size() != 3) {
    std::cerr << kUsage;
    return 2;
  }
  auto be = make_backend();
  if (!be.ok()) return fail(be.status());
  r1lab::trainer::ParityOptions opt;
  opt.reference = absl::GetFlag(FLAGS_reference);
  auto rep = r1lab::trainer::check_parity(args[2], **be, opt);
  if (!rep.ok()) return fail(rep.status());
  std::printf("%-62s %-18s %12s %10s  %s\n", "item", "metric", "value", "tolerance", "result");
  int failed = 0;
  for (const auto& it : rep->items) {
    std::printf("%-62s %-18s %12.3e %10.1e  %s\n", it.name.c_str(), it.metric.c_str(), it.value, it.tolerance,
                it.pass ? "ok" : "FAIL");
    failed += it.pass ? 0 : 1;
  }
  std::printf("%zu items, %d failed; forward %.2f ms, GRPO backward %.2f ms on %s\n", rep->items.size(), failed,
              rep->forward_ms, rep->backward_ms, (*be)->name().c_str());
  return rep->all_pass() ? 0 : 1;
}

// A Hugging Face directory: the model, and its vocabulary when tokenizer.json is there.
absl::StatusOr<std::pair<std::unique_ptr<r1lab::model::Model>, std::optional<r1lab::model::Vocabulary>>>
load_model_dir(const std::string& dir, Backend& be) {
  auto model = r1lab::model::Model::load(dir, be);
  if (!model.ok()) return model.status();
  std::optional<r1lab::model::Vocabulary> vocab;
  if (std::filesystem::exists(dir + "/tokenizer.json")) {
    auto v = r1lab::model::Vocabulary::from_file(dir + "/tokenizer.json");
    if (!v.ok()) return v.status();
    vocab = std::move(*v);
  }
  return std::make_pair(std::move(*model), std::move(vocab));
}

int generate(const std::vector<char*>& args) {
  const std::string server = absl::GetFlag(FLAGS_server);
  if (args.size() != 2 || absl::GetFlag(FLAGS_model).empty() == server.empty() ||
      absl::GetFlag(FLAGS_prompt_ids).empty()) {
    std::cerr << kUsage;
    return 2;
  }
  std::vector<int32_t> prompt;
  for (absl::string_view piece : absl::StrSplit(absl::GetFlag(FLAGS_prompt_ids), ',')) {
    int32_t id;
    if (!absl::SimpleAtoi(piece, &id))
      return fail(absl::InvalidArgumentError(absl::StrCat("--prompt-ids: '", piece, "' is not an integer")));
    prompt.push_back(id);
  }
  // In process, or through a worker: the same RolloutClient either way.
  std::unique_ptr<Backend> be;
  std::unique_ptr<r1lab::model::Model> model;
  std::optional<r1lab::model::Vocabulary> vocab;
  std::unique_ptr<r1lab::rollout::Engine> engine;
  std::unique_ptr<r1lab::rollout::RolloutClient> client;
  if (server.empty()) {
    auto b = make_backend();
    if (!b.ok()) return fail(b.status());
    be = std::move(*b);
    auto loaded = load_model_dir(absl::GetFlag(FLAGS_model), *be);
    if (!loaded.ok()) return fail(loaded.status());
    model = std::move(loaded->first);
    vocab = std::move(loaded->second);
    auto eo = engine_options(*model, *be);
    if (!eo.ok()) return fail(eo.status());
    engine = std::make_unique<r1lab::rollout::Engine>(*model, *eo, vocab ? &*vocab : nullptr);
    client = r1lab::rollout::make_local_client(*engine, absl::GetFlag(FLAGS_model));
  } else {
    client = r1lab::rollout::make_grpc_client(server);
  }
  auto health = client->health();
  if (!health.ok()) return fail(health.status());
  r1lab::rollout::GroupRequest g;
  g.prompt = prompt;
  g.num_samples = absl::GetFlag(FLAGS_num_samples);
  r1lab::rollout::SamplingParams& sp = g.params;
  sp.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  sp.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  sp.top_k = absl::GetFlag(FLAGS_top_k);
  sp.min_p = static_cast<float>(absl::GetFlag(FLAGS_min_p));
  sp.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  sp.seed = absl::GetFlag(FLAGS_seed);
  sp.stop_strings = absl::GetFlag(FLAGS_stop);
  const auto t0 = std::chrono::steady_clock::now();
  auto out = client->generate_all({g});
  if (!out.ok()) return fail(out.status());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int64_t total = 0;
  for (const auto& c : *out) total += static_cast<int64_t>(c.tokens.size());
  for (const auto& c : *out) {
    nlohmann::json j;
    j["sample"] = c.sample;
    j["prompt_ids"] = prompt;
    j["tokens"] = c.tokens;
    j["logprobs"] = c.logprobs;
    if (health->has_tokenizer) j["text"] = c.text;
    j["policy_version"] = c.policy_version;
    j["finish_reason"] = r1lab::rollout::finish_reason_name(c.finish_reason);
    j["stop"] = c.stop;
    j["tokens_per_second"] = s > 0 ? static_cast<double>(total) / s : 0.0;
    std::cout << j.dump() << "\n";
  }
  return 0;
}

// SIGINT and SIGTERM blocked in this thread and every thread started after: they wait for wait_for.
sigset_t block_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

int wait_for(const sigset_t& set) {
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

int serve_rollout(const std::vector<char*>& args) {
  const std::string dir = absl::GetFlag(FLAGS_model);
  if (args.size() != 2 || dir.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  const sigset_t stop_signals = block_stop_signals();
  auto be = make_backend();
  if (!be.ok()) return fail(be.status());
  auto loaded = load_model_dir(dir, **be);
  if (!loaded.ok()) return fail(loaded.status());
  auto& [model, vocab] = *loaded;
  r1lab::rollout::ServerOptions opt;
  opt.host = absl::GetFlag(FLAGS_host);
  opt.port = absl::GetFlag(FLAGS_port) < 0 ? 50051 : absl::GetFlag(FLAGS_port);
  if (opt.port < 0 || opt.port > 65535) return fail(absl::InvalidArgumentError("--port must be in 0..65535"));
  auto eo = engine_options(*model, **be);
  if (!eo.ok()) return fail(eo.status());
  opt.engine = *eo;
  const auto latent_dtype = r1lab::model::LatentCache::resolve_dtype((*model).config(), **be, opt.engine.latents);
  auto server = r1lab::rollout::start_rollout_server(*model, vocab ? &*vocab : nullptr, dir, opt);
  if (!server.ok()) return fail(server.status());
  const auto st = (*server)->engine().stats();
  std::printf("r1lab serve-rollout: %s on %s:%d, %lld cache blocks of %d tokens (%s rows), tokenizer %s\n", dir.c_str(),
              opt.host.c_str(), (*server)->port(), static_cast<long long>(st.blocks_total), st.block_size,
              *latent_dtype == r1lab::core::DType::kU8 ? "fp8" : r1lab::core::dtype_name(*latent_dtype),
              vocab ? "loaded" : "absent (no stop strings, no text)");
  std::fflush(stdout);
  std::printf("r1lab serve-rollout: signal %d, shutting down\n", wait_for(stop_signals));
  (*server)->shutdown();
  return 0;
}

int serve_reward(const std::vector<char*>& args) {
  if (args.size() != 2) {
    std::cerr << kUsage;
    return 2;
  }
  const sigset_t stop_signals = block_stop_signals();
  nlohmann::json spec;
  const std::string path = absl::GetFlag(FLAGS_rewards);
  auto set = path.empty() ? r1lab::rewards::load_reward_set(spec, "") : r1lab::rewards::load_reward_set_file(path);
  if (!set.ok()) return fail(set.status());
  auto shared = std::make_shared<const r1lab::rewards::RewardSet>(std::move(*set));
  const std::string host = absl::GetFlag(FLAGS_host);
  const int port = absl::GetFlag(FLAGS_port) < 0 ? 50052 : absl::GetFlag(FLAGS_port);
  auto server = r1lab::rewards::start_reward_server(shared, host, port);
  if (!server.ok()) return fail(server.status());
  std::string names;
  for (const auto& [name, rule_spec] : shared->list()) absl::StrAppend(&names, names.empty() ? "" : ", ", name);
  std::printf("r1lab serve-reward: on %s:%d, rewards: %s\n", host.c_str(), (*server)->port(), names.c_str());
  std::fflush(stdout);
  std::printf("r1lab serve-reward: signal %d, shutting down\n", wait_for(stop_signals));
  (*server)->shutdown();
  return 0;
}

// A recipe's key=value overrides: those after the recipe, then --device and --gemm where given.
std::vector<std::string> recipe_overrides(const std::vector<char*>& args) {
  std::vector<std::string> o(args.begin() + 3, args.end());
  if (!absl::GetFlag(FLAGS_device).empty()) o.push_back("device=" + absl::GetFlag(FLAGS_device));
  if (!absl::GetFlag(FLAGS_gemm).empty()) o.push_back("gemm=" + absl::GetFlag(FLAGS_gemm));
  return o;
}

int run(const std::vector<char*>& args) {
  if (args.size() < 3) {
    std::cerr << kUsage;
    return 2;
  }
  auto recipe = r1lab::run::load_recipe(args[2], recipe_overrides(args));
  if (!recipe.ok()) return fail(recipe.status());
  // Ctrl-C / SIGTERM: the first ends the run cleanly after the current step; a second exits at once (the
  // children die with this process).
  const sigset_t stop_signals = block_stop_signals();
  static std::atomic<bool> stop{false};
  std::thread([stop_signals] {
    for (int n = 0;; ++n) {
      const int sig = wait_for(stop_signals);
      if (n == 0) {
        std::fprintf(stderr, "\nr1lab run: signal %d, stopping after this step (again to quit now)\n", sig);
        stop = true;
      } else {
        std::fprintf(stderr, "\nr1lab run: second signal, quitting now\n");
        std::_Exit(130);
      }
    }
  }).detach();
  r1lab::run::RunnerOptions opt;
  std::error_code ec;
  opt.program = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  if (ec) opt.program = args[0];
  opt.in_process = absl::GetFlag(FLAGS_in_process);
  opt.run_dir = absl::GetFlag(FLAGS_run_dir);
  auto res = r1lab::run::run_recipe(*recipe, opt, &stop);
  if (!res.ok()) {
    std::fprintf(stderr, "r1lab run: %s\n", std::string(res.status().message()).c_str());
    return stop ? 130 : 1;
  }
  if (res->interrupted) {
    std::printf("r1lab run: interrupted; the run store is %s\n", res->store_path.c_str());
    return 130;
  }
  const double other = res->seconds_total - res->seconds_pretrain - res->seconds_rollout - res->seconds_reward -
                       res->seconds_train - res->seconds_sync - res->seconds_eval;
  std::printf("time: total %.0fs = pretrain %.0fs + rollout %.0fs + reward %.1fs + train %.0fs + weight sync %.1fs + "
              "eval %.1fs + other %.1fs\n",
              res->seconds_total, res->seconds_pretrain, res->seconds_rollout, res->seconds_reward, res->seconds_train,
              res->seconds_sync, res->seconds_eval, other);
  std::printf("run store: %s  (r1lab report %s)\n", res->store_path.c_str(), res->store_path.c_str());
  std::printf("held-out accuracy: %.1f%% -> %.1f%%\n", 100 * res->accuracy_before, 100 * res->accuracy_after);
  return 0;
}

int report(const std::vector<char*>& args) {
  if (args.size() != 3) {
    std::cerr << kUsage;
    return 2;
  }
  auto r = r1lab::run::report(args[2], absl::GetFlag(FLAGS_plots));
  if (!r.ok()) return fail(r.status());
  std::printf("%s", r->c_str());
  return 0;
}

int pretrain_base(const std::vector<char*>& args) {
  if (args.size() < 3 || absl::GetFlag(FLAGS_out).empty()) {
    std::cerr << kUsage;
    return 2;
  }
  auto recipe = r1lab::run::load_recipe(args[2], recipe_overrides(args));
  if (!recipe.ok()) return fail(recipe.status());
  auto be = r1lab::core::make_backend(recipe->device, recipe->gemm);
  if (!be.ok()) return fail(be.status());
  const std::string out = absl::GetFlag(FLAGS_out);
  const int64_t every = std::max<int64_t>(1, recipe->pretrain.steps / 20);
  auto st = r1lab::run::pretrain_base(**be, recipe->task, recipe->pretrain, out,
                                      [&](int64_t step, const r1lab::trainer::SftStepStats& s, double secs) {
                                        if ((step + 1) % every && step + 1 != recipe->pretrain.steps) return;
                                        std::printf("pretrain %5lld  loss %.4f  token acc %.3f  grad %.3f  lr %.2e  %.1fs\n",
                                                    static_cast<long long>(step + 1), s.loss, s.token_accuracy,
                                                    s.opt.grad_norm, s.opt.lr, secs);
                                        std::fflush(stdout);
                                      });
  if (!st.ok()) return fail(st);
  auto m = r1lab::model::Model::load(out, **be);
  if (!m.ok()) return fail(m.status());
  const r1lab::data::Tokenizer tok = r1lab::data::Tokenizer::builtin();
  r1lab::rollout::EngineOptions eo;
  eo.cache_bytes = recipe->rollout_cache_mb << 20;
  r1lab::rollout::Engine engine(**m, eo);
  auto rollout = r1lab::rollout::make_local_client(engine, out);
  auto set = r1lab::rewards::RewardSet::make(r1lab::rewards::RewardRegistry::with_builtin_rules(), recipe->rewards_file());
  if (!set.ok()) return fail(set.status());
  auto rewards = r1lab::rewards::make_local_reward_client(std::make_shared<const r1lab::rewards::RewardSet>(*std::move(set)));
  auto problems = r1lab::data::make_problems(recipe->task.task, recipe->task.eval_seed, 0, recipe->eval.problems,
                                             recipe->task.options);
  if (!problems.ok()) return fail(problems.status());
  r1lab::rollout::SamplingParams sp;
  sp.temperature = static_cast<float>(recipe->eval.temperature);
  sp.max_new_tokens = recipe->eval.max_new_tokens;
  sp.seed = recipe->task.eval_seed;
  const auto t0 = std::chrono::steady_clock::now();
  auto ev = r1lab::run::evaluate(*rollout, *rewards, recipe->reward_name, tok, *problems, recipe->eval.samples, sp);
  if (!ev.ok()) return fail(ev.status());
  std::printf("held-out: accuracy %.1f%%  format %.1f%%  length %.1f  (%lld samples, %.1fs)\n", 100 * ev->accuracy,
              100 * ev->format_rate, ev->mean_length, static_cast<long long>(ev->samples),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
}

}  // namespace

absl::StatusOr<std::string> read_input_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// r1lab reward score | list: the reward library from the command line, to try and debug rewards.
int reward(const std::vector<char*>& args) {
  namespace rw = r1lab::rewards;
  using json = nlohmann::json;
  const std::string sub = args.size() > 2 ? args[2] : "";
  if (args.size() != 3 || (sub != "score" && sub != "list")) {
    std::cerr << kUsage;
    return 2;
  }
  const std::string config = absl::GetFlag(FLAGS_config);
  auto set = config.empty() ? rw::load_reward_set(json(), "") : rw::load_reward_set_file(config);
  if (!set.ok()) return fail(set.status());
  if (sub == "list") {
    for (const auto& [name, spec] : set->list())
      std::cout << json({{"name", name}, {"spec", json::parse(spec, nullptr, false)}}).dump() << "\n";
    return 0;
  }
  std::vector<const rw::RewardFn*> fns;
  std::vector<std::string> names = absl::StrSplit(absl::GetFlag(FLAGS_reward), ',', absl::SkipWhitespace());
  if (names.empty()) return fail(absl::InvalidArgumentError("reward score: --reward NAME[,NAME...] is required"));
  for (const std::string& n : names) {
    const rw::RewardFn* fn = set->find(n);
    if (!fn) {
      std::string known;
      for (const auto& [name, spec] : set->list()) absl::StrAppend(&known, known.empty() ? "" : ", ", name);
      return fail(absl::InvalidArgumentError(absl::StrCat("unknown reward '", n, "' (known: ", known, ")")));
    }
    fns.push_back(fn);
  }
  const std::string input = absl::GetFlag(FLAGS_input);
  if (input.empty()) return fail(absl::InvalidArgumentError("reward score: --input FILE.jsonl is required (- for stdin)"));
  std::ifstream file;
  if (input != "-") {
    file.open(input);
    if (!file) return fail(absl::NotFoundError(absl::StrCat("--input: cannot open ", input)));
  }
  std::istream& in = input == "-" ? std::cin : file;
  // Every line, parsed; a line that is not a JSON object comes back with an error, never dropped.
  std::vector<json> lines;
  std::vector<std::string> line_errors;
  int bad = 0;
  for (std::string text; std::getline(in, text);) {
    if (absl::StripAsciiWhitespace(text).empty()) continue;
    json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
    std::string err;
    if (j.is_discarded() || !j.is_object()) {
      err = "not a JSON object";
    } else if (!j.contains("completion") || !j["completion"].is_string()) {
      err = "needs a string \"completion\"";
    } else if (j.contains("meta") && !j["meta"].is_object()) {
      err = "\"meta\" must be an object";
    }
    if (!err.empty()) {
      std::cerr << "r1lab reward score: " << input << ":" << lines.size() + 1 << ": " << err << "\n";
      ++bad;
      j = json{{"line", text}};
    }
    lines.push_back(std::move(j));
    line_errors.push_back(err);
  }
  auto text_field = [](const json& j, const char* key) {
    return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : std::string();
  };
  std::vector<json> out(lines.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next++) < lines.size();) {
      json& j = lines[i];
      if (!line_errors[i].empty()) {
        out[i] = j;
        out[i]["error"] = line_errors[i];
        continue;
      }
      rw::Sample s;
      s.prompt = text_field(j, "prompt");
      s.completion = text_field(j, "completion");
      s.reference = j.contains("answer") ? text_field(j, "answer") : text_field(j, "reference");
      if (j.contains("answer") && j["answer"].is_number()) s.reference = j["answer"].dump();
      s.task = text_field(j, "task");
      s.meta = j.value("meta", json::object());
      for (const auto& [k, v] : j.items())
        if (k != "prompt" && k != "completion" && k != "answer" && k != "reference" && k != "task" && k != "meta" &&
            !s.meta.contains(k))
          s.meta[k] = v;
      double value = 0;
      json components = json::object();
      std::string error;
      for (size_t r = 0; r < fns.size(); ++r) {
        const rw::Score sc = fns[r]->score(s);
        value += sc.value;
        if (fns.size() > 1) components[names[r]] = sc.value;
        for (const auto& [k, v] : sc.components) components[k] = v;
        if (!sc.error.empty()) absl::StrAppend(&error, error.empty() ? "" : "; ", sc.error);
      }
      out[i] = j;
      out[i]["reward"] = value;
      out[i]["components"] = components;
      if (!error.empty()) out[i]["error"] = error;
    }
  };
  std::vector<std::thread> threads;
  const unsigned n = std::max(1u, std::min<unsigned>(std::thread::hardware_concurrency(), 16));
  for (unsigned t = 0; t < n; ++t) threads.emplace_back(work);
  for (std::thread& t : threads) t.join();
  for (const json& j : out) std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  std::cout.flush();
  return bad > 0 ? 1 : 0;
}

int sandbox(const std::vector<char*>& args) {
  namespace sb = r1lab::sandbox;
  const std::string sub = args.size() > 2 ? args[2] : "";
  if (!((sub == "run" && args.size() == 4) || (sub == "check" && args.size() == 3))) {
    std::cerr << kUsage;
    return 2;
  }
  sb::RunnerOptions opt;
  opt.allow_unsafe = absl::GetFlag(FLAGS_allow_unsafe);
  auto runner = sb::Runner::create(opt);
  if (!runner.ok()) return fail(runner.status());
  if (sub == "check") {
    std::cout << (*runner)->protections().describe();
    return (*runner)->protections().missing().empty() ? 0 : 1;
  }
  sb::Program prog;
  auto lang = sb::parse_language(absl::GetFlag(FLAGS_lang));
  if (!lang.ok()) return fail(lang.status());
  prog.lang = *lang;
  auto src = read_input_file(args[3]);
  if (!src.ok()) return fail(src.status());
  prog.source = *src;
  if (!absl::GetFlag(FLAGS_stdin).empty()) {
    auto in = read_input_file(absl::GetFlag(FLAGS_stdin));
    if (!in.ok()) return fail(in.status());
    prog.stdin_data = *in;
  }
  std::optional<std::string> expected;
  if (!absl::GetFlag(FLAGS_expected).empty()) {
    auto e = read_input_file(absl::GetFlag(FLAGS_expected));
    if (!e.ok()) return fail(e.status());
    expected = *e;
  }
  sb::Limits lim;
  lim.time_limit_ms = absl::GetFlag(FLAGS_time_limit_ms);
  lim.wall_limit_ms = absl::GetFlag(FLAGS_wall_limit_ms);
  lim.memory_mb = absl::GetFlag(FLAGS_memory_mb);
  lim.max_processes = absl::GetFlag(FLAGS_max_processes);
  lim.output_limit_bytes = absl::GetFlag(FLAGS_output_limit_bytes);
  auto res = (*runner)->run(prog, lim, expected);
  if (!res.ok()) return fail(res.status());
  std::cout << sb::result_json(*res) << std::endl;
  return res->verdict == sb::Verdict::kSandboxError ? 1 : 0;
}

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // Flags are spelled with dashes (--prompt-ids) as well as Abseil's underscores (--prompt_ids).
  std::vector<std::string> storage(argv, argv + argc);
  for (size_t i = 1; i < storage.size(); ++i) {
    std::string& a = storage[i];
    if (a == "--") break;
    if (a.size() < 3 || a[0] != '-' || a[1] != '-') continue;
    const size_t end = std::min(a.find('='), a.size());
    for (size_t c = 2; c < end; ++c)
      if (a[c] == '-') a[c] = '_';
  }
  std::vector<char*> cargv;
  for (std::string& a : storage) cargv.push_back(a.data());
  std::vector<char*> args = absl::ParseCommandLine(argc, cargv.data());
  if (args.size() < 2) {
    std::cerr << kUsage;
    return 2;
  }
  const std::string cmd = args[1];
  if (cmd == "check-parity") return check_parity(args);
  if (cmd == "generate") return generate(args);
  if (cmd == "serve-rollout") return serve_rollout(args);
  if (cmd == "serve-reward") return serve_reward(args);
  if (cmd == "pretrain-base") return pretrain_base(args);
  if (cmd == "run") return run(args);
  if (cmd == "report") return report(args);
  if (cmd == "sandbox") return sandbox(args);
  if (cmd == "reward") return reward(args);
  std::cerr << "r1lab: unknown command '" << cmd << "'\n" << kUsage;
  return 2;
}
