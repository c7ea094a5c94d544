#include "trainer/parity.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"
#include "rollout/engine.h"
#include "trainer/grpo.h"

namespace r1lab::trainer {
namespace {

using core::Tensor;

double max_rel(const Tensor& got, const Tensor& ref) {
  Tensor a = got.to_f32(), b = ref.to_f32();
  double md = 0, mr = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    md = std::max(md, std::fabs(static_cast<double>(a.f32()[i]) - b.f32()[i]));
    mr = std::max(mr, std::fabs(static_cast<double>(b.f32()[i])));
  }
  return mr > 0 ? md / mr : md;
}

double rel_l2(const Tensor& got, const Tensor& ref) {
  Tensor a = got.to_f32(), b = ref.to_f32();
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double d = static_cast<double>(a.f32()[i]) - b.f32()[i];
    num += d * d;
    den += static_cast<double>(b.f32()[i]) * b.f32()[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

bool ParityReport::all_pass() const {
  if (items.empty()) return false;
  for (const ParityItem& i : items)
    if (!i.pass) return false;
  return true;
}

absl::StatusOr<ParityReport> check_parity(const std::string& dir, core::Backend& be, const ParityOptions& opt) {
  namespace fs = std::filesystem;
  R1LAB_ASSIGN_OR_RETURN(auto model, model::Model::load(dir, be));
  const model::ModelConfig& cfg = model->config();
  const std::string ref_path = opt.reference.empty() ? (fs::path(dir) / "reference.safetensors").string() : opt.reference;
  R1LAB_ASSIGN_OR_RETURN(auto ref, model::SafetensorsFile::open(ref_path));
  // Settings of the reference, when it has a reference.json beside it.
  GrpoConfig grpo;
  int gen_prompt = 8;
  {
    std::ifstream in(fs::path(ref_path).parent_path() / "reference.json");
    if (in) {
      std::stringstream ss;
      ss << in.rdbuf();
      nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
      if (!j.is_discarded() && j.contains("grpo") && j["grpo"].is_object()) {
        const auto& g = j["grpo"];
        if (g.contains("clip_eps") && g["clip_eps"].is_number())
          grpo.clip_eps_low = grpo.clip_eps_high = g["clip_eps"].get<float>();
        if (g.contains("kl_beta") && g["kl_beta"].is_number()) grpo.kl_beta = g["kl_beta"].get<float>();
        if (g.contains("generate") && g["generate"].is_string()) {
          int p = 0, n = 0;
          if (std::sscanf(g["generate"].get<std::string>().c_str(), "greedy from input_ids[:, :%d], %d", &p, &n) == 2)
            gen_prompt = p;
        }
      }
    }
  }
  for (const char* need : {"input_ids", "logits"})
    if (!ref->contains(need)) return absl::InvalidArgumentError(absl::StrCat(ref_path, ": lacks '", need, "'"));
  Tensor ids64 = ref->tensor("input_ids");
  if (ids64.dim() != 2) return absl::InvalidArgumentError(absl::StrCat(ref_path, ": input_ids must be [B, T]"));
  const int64_t b = ids64.size(0), t = ids64.size(1), m = b * t;
  if (t < 2 || t > cfg.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrCat(ref_path, ": input_ids has ", t,
                                                   " positions; the model takes 2 to ", cfg.max_position_embeddings));
  Tensor ids = Tensor::zeros({b, t}, core::DType::kI32);
  {
    Tensor f = ids64.to_f32();
    for (int64_t i = 0; i < m; ++i) {
      const float v = f.f32()[i];
      if (v < 0 || v >= cfg.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat(ref_path, ": input id ", v, " outside the vocabulary"));
      ids.data<int32_t>()[i] = static_cast<int32_t>(v);
    }
  }
  ParityReport rep;
  auto add = [&](std::string name, std::string metric, double v, double tol) {
    rep.items.push_back({std::move(name), std::move(metric), v, tol, std::isfinite(v) && v <= tol});
  };
  // Forward, hidden states.
  model::ForwardState state;
  std::vector<Tensor> hidden;
  Tensor logits;
  rep.forward_ms = 1e30;
  for (int rep_i = 0; rep_i < 3; ++rep_i) {
    const auto t0 = std::chrono::steady_clock::now();
    logits = model->forward(ids, &state, &hidden);
    rep.forward_ms = std::min(rep.forward_ms, ms_since(t0));
  }
  Tensor logits_host = be.download(logits);
  add("logits", "max|d|/max|ref|", max_rel(logits_host, ref->tensor("logits").to_f32().view({m, -1})),
      opt.logits_tolerance);
  for (size_t i = 0; i < hidden.size(); ++i) {
    const std::string name = absl::StrCat("hidden_states.", i);
    if (!ref->contains(name)) continue;
    add(name, "max|d|/max|ref|", max_rel(be.download(hidden[i]), ref->tensor(name).to_f32().view({m, -1})),
        opt.logits_tolerance);
  }
  // Greedy generation through the rollout engine (paged latent cache).
  if (ref->contains("generated")) {
    Tensor gen = ref->tensor("generated").to_f32();
    const int64_t total = gen.size(1), n_new = total - gen_prompt;
    std::vector<rollout::GroupRequest> groups(static_cast<size_t>(b));
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < gen_prompt; ++j) groups[i].prompt.push_back(ids.data<int32_t>()[i * t + j]);
      groups[i].params.temperature = 0.0f;
      groups[i].params.max_new_tokens = static_cast<int>(n_new);
    }
    rollout::Engine engine(*model, rollout::EngineOptions{});
    R1LAB_ASSIGN_OR_RETURN(auto outs, engine.generate(std::move(groups)));
    int64_t mismatches = 0;
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < n_new; ++j) {
        // transformers pads a sequence that stopped early with pad_token_id (0 here).
        const int32_t mine = j < static_cast<int64_t>(outs[i].tokens.size()) ? outs[i].tokens[j] : 0;
        if (mine != static_cast<int32_t>(gen.f32()[i * total + gen_prompt + j])) ++mismatches;
      }
    }
    add("generated", "mismatched tokens", static_cast<double>(mismatches), 0.0);
  }
  // GRPO loss and gradients through the trainer's loss and the model's backward.
  if (ref->contains("old_logprobs") && ref->contains("grpo_loss")) {
    Tensor targets = Tensor::zeros({m}, core::DType::kI32);
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j + 1 < t; ++j) targets.data<int32_t>()[i * t + j] = ids.data<int32_t>()[i * t + j + 1];
    Tensor tg = be.zeros({m}, core::DType::kI32), lp = be.zeros({m}), lse = be.zeros({m});
    be.upload(targets, tg);
    be.logprobs_forward(logits, tg, lp, lse);
    Tensor lp_all = be.download(lp);
    Tensor logp = Tensor::zeros({b, t - 1});
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j + 1 < t; ++j) logp.f32()[i * (t - 1) + j] = lp_all.f32()[i * t + j];
    if (ref->contains("token_logprobs"))
      add("token_logprobs", "max|d|/max|ref|", max_rel(logp, ref->tensor("token_logprobs")), opt.logits_tolerance);
    Tensor dlogp = Tensor::zeros({b, t - 1});
    const double loss = grpo_loss(grpo, logp, ref->tensor("old_logprobs").to_f32(),
                                  ref->tensor("ref_logprobs").to_f32(), ref->tensor("advantages").to_f32(),
                                  ref->tensor("mask").to_f32(), &dlogp);
    const double ref_loss = ref->tensor("grpo_loss").to_f32().f32()[0];
    add("grpo_loss", "|d|/|ref|", std::fabs(loss - ref_loss) / std::max(std::fabs(ref_loss), 1e-12),
        opt.logits_tolerance);
    const auto t0 = std::chrono::steady_clock::now();
    Tensor dlp_all = Tensor::zeros({m});
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j + 1 < t; ++j) dlp_all.f32()[i * t + j] = dlogp.f32()[i * (t - 1) + j];
    Tensor dlp_dev = be.zeros({m}), dlogits = be.zeros({m, cfg.vocab_size});
    be.upload(dlp_all, dlp_dev);
    be.logprobs_backward(dlp_dev, logits, tg, lse, dlogits);
    model->zero_grads();
    model->backward(state, dlogits);
    rep.backward_ms = ms_since(t0);
    Tensor grads = be.download(model->grads().buffer());
    for (const model::ParamInfo& p : model->grads().infos()) {
      const std::string name = "grad." + p.name;
      if (!ref->contains(name)) {
        if (p.trainable)
          return absl::InvalidArgumentError(absl::StrCat(ref_path, ": lacks '", name, "'"));
        continue;
      }
      Tensor mine = grads.slice(0, p.offset, core::shape_numel(p.shape)).view(p.shape);
      add(name, "rel L2", rel_l2(mine, ref->tensor(name)), opt.grad_tolerance);
    }
    if (cfg.tie_word_embeddings && ref->contains("grad.lm_head.weight"))
      add("grad.lm_head.weight (tied)", "rel L2",
          rel_l2(grads.slice(0, 0, static_cast<int64_t>(cfg.vocab_size) * cfg.hidden_size).view({cfg.vocab_size, cfg.hidden_size}),
                 ref->tensor("grad.lm_head.weight")),
          opt.grad_tolerance);
  }
  return rep;
}

}  // namespace r1lab::trainer
