#include "run/runner.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include <boost/process.hpp>
#include <boost/process/extend.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/backend.h"
#include "core/device.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "rewards/plugins.h"
#include "rewards/service.h"
#include "rollout/client.h"
#include "rollout/engine.h"
#include "run/rl.h"
#include "run/stages.h"
#include "run/store.h"

namespace r1lab::run {
namespace {

namespace bp = boost::process;
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A server child: r1lab serve-reward / serve-rollout on a free loopback port, output to a log file.
class Child {
 public:
  static absl::StatusOr<std::unique_ptr<Child>> start(const std::string& name, const std::string& program,
                                                      const std::vector<std::string>& args, const std::string& log,
                                                      const std::atomic<bool>* stop) {
    auto c = std::unique_ptr<Child>(new Child());
    c->name_ = name;
    c->log_ = log;
    try {
      c->proc_ = bp::child(
          bp::exe = program, bp::args = args, (bp::std_out & bp::std_err) > log, bp::std_in < bp::null,
          bp::extend::on_exec_setup = [](auto&) {
            // Its own process group: the terminal's Ctrl-C reaches the trainer only, which stops children in
            // order. And it dies with the trainer, however the trainer ends.
            setpgid(0, 0);
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            sigset_t all;
            sigfillset(&all);
            sigprocmask(SIG_UNBLOCK, &all, nullptr);
          });
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("cannot start the ", name, " (", program, "): ", e.what()));
    }
    // The server prints "... on HOST:PORT ..." once it listens.
    static const std::regex listening(R"( on ([^ ,]+):([0-9]+))");
    const auto t0 = Clock::now();
    for (;;) {
      std::ifstream in(log);
      std::string line;
      while (std::getline(in, line)) {
        std::smatch m;
        if (line.find("r1lab serve-") != std::string::npos && std::regex_search(line, m, listening)) {
          c->target_ = absl::StrCat(m[1].str(), ":", m[2].str());
          return c;
        }
      }
      if (!c->running()) return absl::UnavailableError(absl::StrCat("the ", name, " ", c->exit_description(), "; its log (", log, ") ends:\n", c->tail()));
      if (stop && stop->load()) return absl::CancelledError(absl::StrCat("interrupted while the ", name, " started"));
      if (since(t0) > 120) return absl::DeadlineExceededError(absl::StrCat("the ", name, " did not start listening in 120 s; see ", log));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  ~Child() { shutdown(); }
  const std::string& target() const { return target_; }
  const std::string& name() const { return name_; }
  int pid() const { return proc_.id(); }
  bool running() {
    std::error_code ec;
    return proc_.valid() && proc_.running(ec);
  }
  std::string exit_description() {
    if (running()) return absl::StrCat("(pid ", pid(), ") is running");
    const int raw = proc_.native_exit_code();
    if (WIFSIGNALED(raw)) return absl::StrCat("(pid ", pid(), ") was killed by signal ", WTERMSIG(raw), " (", strsignal(WTERMSIG(raw)), ")");
    return absl::StrCat("(pid ", pid(), ") exited with code ", WIFEXITED(raw) ? WEXITSTATUS(raw) : raw);
  }
  std::string tail() const {
    std::ifstream in(log_);
    std::vector<std::string> lines;
    std::string line;
    while (std::getline(in, line)) lines.push_back(line);
    std::string out;
    for (size_t i = lines.size() > 5 ? lines.size() - 5 : 0; i < lines.size(); ++i) absl::StrAppend(&out, "  ", lines[i], "\n");
    return out;
  }
  void terminate() {
    if (proc_.valid() && running()) ::kill(pid(), SIGTERM);
  }
  // SIGTERM, then SIGKILL after `grace`.
  void shutdown(std::chrono::milliseconds grace = std::chrono::milliseconds(5000)) {
    if (!proc_.valid()) return;
    if (running()) {
      ::kill(pid(), SIGTERM);
      const auto t0 = Clock::now();
      while (running() && Clock::now() - t0 < grace) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      if (running()) ::kill(pid(), SIGKILL);
    }
    std::error_code ec;
    proc_.wait(ec);
    proc_.detach();
  }

 private:
  Child() = default;
  std::string name_, log_, target_;
  bp::child proc_;
};

std::string default_run_dir(const Recipe& r) {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &tm);
  std::string base = absl::StrCat(r.runs_dir, "/", r.name, "-", stamp);
  std::string dir = base;
  for (int i = 2; std::filesystem::exists(dir); ++i) dir = absl::StrCat(base, "-", i);
  return dir;
}

// One status line: rewritten in place on a terminal, else printed per update.
class Progress {
 public:
  explicit Progress(bool live) : live_(live && isatty(STDOUT_FILENO)) {}
  void update(const std::string& line) {
    if (live_) {
      std::printf("\r\033[K%s", line.c_str());
    } else {
      std::printf("%s\n", line.c_str());
    }
    std::fflush(stdout);
    open_ = live_;
  }
  void done() {
    if (open_) std::printf("\n");
    open_ = false;
    std::fflush(stdout);
  }
  void say(const std::string& line) {
    done();
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }

 private:
  bool live_;
  bool open_ = false;
};

}  // namespace

absl::StatusOr<RunResult> run_recipe(const Recipe& recipe, const RunnerOptions& options, const std::atomic<bool>* stop) {
  if (options.in_process && !recipe.rollout_device.empty() && recipe.rollout_device != recipe.device)
    return absl::InvalidArgumentError(absl::StrCat(
        "rollout_device=", recipe.rollout_device, " needs the rollout worker as a process of its own; in process ",
        "the engine samples from the trainer's model on ", recipe.device, " (drop --in-process or rollout_device)"));
  const auto t_run = Clock::now();
  RunResult res;
  res.run_dir = options.run_dir.empty() ? default_run_dir(recipe) : options.run_dir;
  res.store_path = res.run_dir + "/run.db";
  std::error_code ec;
  std::filesystem::create_directories(res.run_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", res.run_dir, ": ", ec.message()));
  auto store_or = RunStore::create(res.store_path, recipe.name, recipe.source.dump());
  if (!store_or.ok()) return store_or.status();
  RunStore& store = **store_or;
  Progress progress(options.live);
  progress.say(absl::StrCat("r1lab run: ", recipe.name, " -> ", res.run_dir));
  auto interrupted = [&] { return stop && stop->load(); };

  // Whatever happens below, the store says how the run ended.
  auto fail = [&](const absl::Status& s) -> absl::Status {
    progress.done();
    const bool cancelled = interrupted();
    (void)store.set("status", cancelled ? "interrupted" : "failed");
    (void)store.set("message", std::string(s.message()));
    (void)store.set("finished", absl::StrFormat("%.3f", unix_seconds()));
    return s;
  };

  // The trainer's device (the rollout worker makes its own backend on the same device).
  auto be_or = core::make_backend(recipe.device, recipe.gemm);
  if (!be_or.ok()) return fail(be_or.status());
  core::Backend& be = **be_or;
  if (recipe.device != "cpu") progress.say(absl::StrCat("device: ", recipe.device, ", matrix products in ", recipe.gemm));

  // ---- Stage 1: the base model.
  std::string base_dir = recipe.base_model;
  if (base_dir.empty()) {
    base_dir = res.run_dir + "/base";
    (void)store.begin_stage("pretrain_base");
    const auto t0 = Clock::now();
    const int64_t total = recipe.pretrain.steps;
    const int64_t log_every = std::max<int64_t>(1, total / 100);
    absl::Status st = pretrain_base(
        be, recipe.task, recipe.pretrain, base_dir,
        [&](int64_t step, const trainer::SftStepStats& s, double secs) {
          if ((step + 1) % log_every == 0 || step + 1 == total) {
            (void)store.log_metrics("pretrain_base", step + 1,
                                    {{"loss", s.loss}, {"token_accuracy", s.token_accuracy}, {"grad_norm", s.opt.grad_norm},
                                     {"lr", s.opt.lr}});
            progress.update(absl::StrFormat("pretrain_base %lld/%lld | loss %.3f | token acc %.3f | %.0fs",
                                            static_cast<long long>(step + 1), static_cast<long long>(total), s.loss,
                                            s.token_accuracy, secs));
          }
        },
        stop);
    res.seconds_pretrain = since(t0);
    (void)store.end_stage("pretrain_base", st.ok() ? "done" : "failed");
    if (!st.ok()) return fail(st);
    if (interrupted()) return fail(absl::CancelledError("interrupted during pretrain_base"));
    progress.say(absl::StrFormat("pretrain_base: %.0fs, base model in %s", res.seconds_pretrain, base_dir));
  }

  (void)store.set("base_model", base_dir);
  // ---- The parts: reward service and rollout worker (children), or in process.
  auto policy_or = model::Model::load(base_dir, be);
  if (!policy_or.ok()) return fail(policy_or.status());
  model::Model& policy = **policy_or;
  policy.set_recompute(recipe.recompute);
  // The rollout's latent format must suit the model (the worker checks its own backend again).
  if (auto dt = model::LatentCache::resolve_dtype(policy.config(), be, recipe.rollout_latents); !dt.ok())
    return fail(dt.status());
  std::unique_ptr<model::Model> reference;
  if (recipe.rl.grpo.kl_beta > 0) {
    auto r = model::Model::load(base_dir, be);
    if (!r.ok()) return fail(r.status());
    reference = *std::move(r);
  }
  const std::string rewards_path = res.run_dir + "/rewards.json";
  if (auto st = model::write_file_atomic(rewards_path, recipe.rewards_file().dump(2)); !st.ok()) return fail(st);

  const std::string rollout_device = recipe.rollout_device.empty() ? recipe.device : recipe.rollout_device;
  std::unique_ptr<Child> reward_child, rollout_child;
  std::unique_ptr<rewards::RewardClient> reward_client;
  std::unique_ptr<rollout::RolloutClient> rollout_client;
  std::unique_ptr<rollout::Engine> local_engine;
  std::shared_ptr<const rewards::RewardSet> local_rewards;
  if (options.in_process) {
    auto set = rewards::load_reward_set(recipe.rewards_file(), res.run_dir);
    if (!set.ok()) return fail(set.status());
    local_rewards = std::make_shared<const rewards::RewardSet>(*std::move(set));
    reward_client = rewards::make_local_reward_client(local_rewards);
    rollout::EngineOptions eo;
    eo.cache_bytes = recipe.rollout_cache_mb << 20;
    eo.latents = recipe.rollout_latents;
    eo.rescore_logprobs = recipe.rollout_rescore_logprobs;
    local_engine = std::make_unique<rollout::Engine>(policy, eo);
    rollout_client = rollout::make_local_client(*local_engine, base_dir);
  } else {
    auto rc = Child::start("reward service", options.program,
                           {"serve-reward", "--port=0", "--host=127.0.0.1", "--rewards=" + rewards_path},
                           res.run_dir + "/reward.log", stop);
    if (!rc.ok()) return fail(rc.status());
    reward_child = *std::move(rc);
    auto wc = Child::start("rollout worker", options.program,
                           {"serve-rollout", "--model=" + base_dir, "--port=0", "--host=127.0.0.1",
                            absl::StrCat("--cache-mb=", recipe.rollout_cache_mb),
                            absl::StrCat("--latents=", model::latent_format_name(recipe.rollout_latents)),
                            absl::StrCat("--rescore_logprobs=", recipe.rollout_rescore_logprobs ? "true" : "false"),
                            "--device=" + rollout_device, "--gemm=" + recipe.gemm},
                           res.run_dir + "/rollout.log", stop);
    if (!wc.ok()) return fail(wc.status());
    rollout_child = *std::move(wc);
    reward_client = rewards::make_grpc_reward_client(reward_child->target());
    rollout_client = rollout::make_grpc_client(rollout_child->target());
    progress.say(absl::StrFormat("reward service on %s (pid %d), rollout worker on %s (pid %d)", reward_child->target(),
                                 reward_child->pid(), rollout_child->target(), rollout_child->pid()));
    // A worker on another GPU joins the trainer's weight group: new versions go GPU to GPU.
    auto gpu = [](const std::string& d) { return d == "cuda" ? std::string("cuda:0") : d; };
    if (absl::StartsWith(recipe.device, "cuda") && absl::StartsWith(rollout_device, "cuda") &&
        gpu(recipe.device) != gpu(rollout_device)) {
      const absl::Status joined = rollout_client->join_weight_group(policy);
      progress.say(joined.ok() ? absl::StrFormat("weights: NCCL broadcast from %s to the worker on %s", recipe.device,
                                                 rollout_device)
                               : absl::StrFormat("weights: over gRPC (no NCCL weight group: %s)", joined.message()));
    }
  }
  // An error from a part: name the child that died, if one did. A killed child's sockets close a moment
  // before its exit can be collected, so a child that still looks alive gets a second to show its exit.
  auto part_error = [&](const absl::Status& s) -> absl::Status {
    const auto t0 = Clock::now();
    for (;;) {
      for (Child* c : {reward_child.get(), rollout_child.get()}) {
        if (c != nullptr && !c->running())
          return fail(absl::UnavailableError(absl::StrCat("the ", c->name(), " ", c->exit_description(), " (",
                                                          s.message(), "); its log ends:\n", c->tail())));
      }
      if (options.in_process || since(t0) > 1.0) return fail(s);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  };

  const data::Tokenizer tok = data::Tokenizer::builtin();
  auto eval_problems = data::make_problems(recipe.task.task, recipe.task.eval_seed, 0, recipe.eval.problems, recipe.task.options);
  if (!eval_problems.ok()) return fail(eval_problems.status());
  auto run_eval = [&](int64_t step) -> absl::StatusOr<EvalResult> {
    const auto t0 = Clock::now();
    rollout::SamplingParams sp;
    sp.temperature = static_cast<float>(recipe.eval.temperature);
    sp.max_new_tokens = recipe.eval.max_new_tokens;
    sp.seed = recipe.task.eval_seed;
    auto r = evaluate(*rollout_client, *reward_client, recipe.reward_name, tok, *eval_problems, recipe.eval.samples, sp);
    res.seconds_eval += since(t0);
    if (!r.ok()) return r.status();
    (void)store.log_metrics("eval", step, {{"accuracy", r->accuracy}, {"format_rate", r->format_rate},
                                           {"response_length", r->mean_length}});
    return r;
  };

  (void)store.begin_stage("eval");
  auto before = run_eval(0);
  if (!before.ok()) return part_error(before.status());
  res.accuracy_before = before->accuracy;
  progress.say(absl::StrFormat("held-out before RL: accuracy %.1f%% | format %.1f%% | length %.1f (%d problems x %d)",
                               100 * before->accuracy, 100 * before->format_rate, before->mean_length,
                               recipe.eval.problems, recipe.eval.samples));

  // ---- Stage 2: GRPO.
  (void)store.begin_stage("rl");
  RlContext ctx;
  ctx.policy = &policy;
  ctx.reference = reference.get();
  ctx.rollout = rollout_client.get();
  ctx.rewards = reward_client.get();
  ctx.store = &store;
  ctx.stop = stop;
  const std::string policy_dir = res.run_dir + "/policy";
  ctx.save_dir = policy_dir;
  (void)store.set("policy", policy_dir);
  double tokens_per_s = 0;
  ctx.on_step = [&](const RlStepReport& r) {
    const auto& m = r.metrics;
    res.seconds_rollout += m.at("rollout_seconds");
    res.seconds_reward += m.at("reward_seconds");
    res.seconds_train += m.at("train_seconds");
    res.seconds_sync += m.at("sync_seconds");
    tokens_per_s = m.at("rollout_tokens_per_second");
    progress.update(absl::StrFormat("rl %lld/%lld | reward %.3f | acc %.1f%% | len %.1f | kl %.4f | %.0f tok/s | %.2f s/step",
                                    static_cast<long long>(r.step), static_cast<long long>(recipe.rl.steps),
                                    m.at("reward_mean"), 100 * m.at("accuracy"), m.at("response_length"), m.at("kl"),
                                    tokens_per_s, m.at("step_seconds")));
  };
  ctx.on_eval = [&](int64_t step) -> absl::Status {
    auto r = run_eval(step);
    if (!r.ok()) return r.status();
    progress.say(absl::StrFormat("held-out at step %lld: accuracy %.1f%%", static_cast<long long>(step), 100 * r->accuracy));
    return absl::OkStatus();
  };
  absl::Status st = grpo(recipe, ctx);
  progress.done();
  (void)store.end_stage("rl", st.ok() ? (interrupted() ? "interrupted" : "done") : "failed");
  if (!st.ok()) return part_error(st);

  // ---- The held-out evaluation after (the policy is in policy_dir).
  if (interrupted()) {
    res.interrupted = true;
    (void)store.end_stage("eval", "interrupted");
    (void)fail(absl::CancelledError("interrupted"));
  } else {
    auto after = run_eval(recipe.rl.steps);
    if (!after.ok()) return part_error(after.status());
    res.accuracy_after = after->accuracy;
    (void)store.end_stage("eval", "done");
    (void)store.set("accuracy_before", absl::StrCat(res.accuracy_before));
    (void)store.set("accuracy_after", absl::StrCat(res.accuracy_after));
    (void)store.set("status", "finished");
    (void)store.set("finished", absl::StrFormat("%.3f", unix_seconds()));
  }
  // Both at once: each takes about a second to wind gRPC down.
  for (Child* c : {rollout_child.get(), reward_child.get()})
    if (c != nullptr) c->terminate();
  for (Child* c : {rollout_child.get(), reward_child.get()})
    if (c != nullptr) c->shutdown();
  res.seconds_total = since(t_run);
  (void)store.set("seconds", absl::StrFormat(
      R"({"total": %.2f, "pretrain": %.2f, "rollout": %.2f, "reward": %.2f, "train": %.2f, "sync": %.2f, "eval": %.2f})",
      res.seconds_total, res.seconds_pretrain, res.seconds_rollout, res.seconds_reward, res.seconds_train, res.seconds_sync,
      res.seconds_eval));
  return res;
}

}  // namespace r1lab::run
