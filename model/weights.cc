#include "model/weights.h"

#include <cmath>
#include <filesystem>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"
#include "model/safetensors.h"

namespace r1lab::model {
namespace {

std::string layer_prefix(int l) { return absl::StrCat("model.layers.", l, "."); }

void add_mlp(std::vector<ParamInfo>& out, const std::string& p, int hidden, int inter) {
  out.push_back({p + "gate_proj.weight", {inter, hidden}});
  out.push_back({p + "up_proj.weight", {inter, hidden}});
  out.push_back({p + "down_proj.weight", {hidden, inter}});
}

}  // namespace

std::vector<ParamInfo> parameter_layout(const ModelConfig& c) {
  std::vector<ParamInfo> out;
  const int h = c.hidden_size, heads = c.num_attention_heads;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = layer_prefix(l);
    out.push_back({p + "input_layernorm.weight", {h}});
    if (c.q_lora_rank > 0) {
      out.push_back({p + "self_attn.q_a_proj.weight", {c.q_lora_rank, h}});
      out.push_back({p + "self_attn.q_a_layernorm.weight", {c.q_lora_rank}});
      out.push_back({p + "self_attn.q_b_proj.weight", {heads * c.qk_head_dim(), c.q_lora_rank}});
    } else {
      out.push_back({p + "self_attn.q_proj.weight", {heads * c.qk_head_dim(), h}});
    }
    out.push_back({p + "self_attn.kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, h}});
    out.push_back({p + "self_attn.kv_a_layernorm.weight", {c.kv_lora_rank}});
    out.push_back({p + "self_attn.kv_b_proj.weight", {heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}});
    out.push_back({p + "self_attn.o_proj.weight", {h, heads * c.v_head_dim}});
    out.push_back({p + "post_attention_layernorm.weight", {h}});
    if (c.is_moe_layer(l)) {
      const int e = c.n_routed_experts, inter = c.moe_intermediate_size;
      // The router right before the shared experts' gate and up rows: one product makes all three (the
      // three take the same input).
      out.push_back({p + "mlp.gate.e_score_correction_bias", {e}, 0, false});
      out.push_back({p + "mlp.experts.gate_up_proj", {e, 2 * inter, h}});
      out.push_back({p + "mlp.experts.down_proj", {e, h, inter}});
      out.push_back({p + "mlp.gate.weight", {e, h}});
      if (c.n_shared_experts > 0) add_mlp(out, p + "mlp.shared_experts.", h, inter * c.n_shared_experts);
    } else {
      add_mlp(out, p + "mlp.", h, c.intermediate_size);
    }
  }
  out.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  int64_t offset = 0;
  for (ParamInfo& p : out) {
    p.offset = offset;
    offset += core::shape_numel(p.shape);
  }
  return out;
}

ParameterSet::ParameterSet(const ModelConfig& cfg, core::Backend& backend)
    : infos_(parameter_layout(cfg)), backend_(&backend) {
  int64_t total = 0;
  for (size_t i = 0; i < infos_.size(); ++i) {
    index_[infos_[i].name] = i;
    total += core::shape_numel(infos_[i].shape);
  }
  buffer_ = backend.zeros({total});
}

std::string ParameterSet::fingerprint() const {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const std::string& bytes) {
    for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  };
  for (const ParamInfo& p : infos_) mix(absl::StrCat(p.name, " ", core::shape_str(p.shape), " ", p.offset, ";"));
  return absl::StrCat(infos_.size(), ":", numel(), ":", absl::Hex(h, absl::kZeroPad16));
}

const ParamInfo& ParameterSet::info(const std::string& name) const {
  auto it = index_.find(name);
  CHECK(it != index_.end()) << "no parameter " << name;
  return infos_[it->second];
}

core::Tensor ParameterSet::get(const std::string& name) const {
  const ParamInfo& p = info(name);
  return buffer_.slice(0, p.offset, core::shape_numel(p.shape)).view(p.shape);
}

Weights matmul_views(const Weights& w, const core::Tensor& buffer, const core::Tensor& copy) {
  CHECK_EQ(buffer.numel(), copy.numel());
  auto move = [&](const core::Tensor& t) {
    if (!t.defined()) return t;
    const int64_t bytes = static_cast<const char*>(t.raw()) - static_cast<const char*>(buffer.raw());
    const int64_t offset = bytes / static_cast<int64_t>(core::dtype_size(buffer.dtype()));
    CHECK(t.is_contiguous() && offset >= 0 && offset + t.numel() <= buffer.numel());
    return copy.slice(0, offset, t.numel()).view(t.shape());
  };
  auto mlp = [&](const MlpWeights& m) { return MlpWeights{move(m.gate_up), move(m.down)}; };
  Weights out = w;
  out.lm_head = move(w.lm_head);
  for (LayerWeights& lw : out.layers) {
    for (core::Tensor* t : {&lw.q_a_proj, &lw.q_b_proj, &lw.q_proj, &lw.kv_a_proj, &lw.kv_b_proj, &lw.o_proj,
                            &lw.router, &lw.experts_gate_up, &lw.experts_down})
      *t = move(*t);
    lw.mlp = mlp(lw.mlp);
    lw.shared = mlp(lw.shared);
  }
  return out;
}

Weights bind_weights(const ModelConfig& c, const ParameterSet& ps) {
  Weights w;
  w.embed = ps.get("model.embed_tokens.weight");
  w.final_norm = ps.get("model.norm.weight");
  w.lm_head = c.tie_word_embeddings ? w.embed : ps.get("lm_head.weight");
  auto mlp = [&](const std::string& p) {
    MlpWeights m;
    // gate_proj and up_proj are adjacent in the buffer: one [2I, H] view spans both.
    const ParamInfo& gate = ps.info(p + "gate_proj.weight");
    const int64_t inter = gate.shape[0], hidden = gate.shape[1];
    m.gate_up = ps.buffer().slice(0, gate.offset, 2 * inter * hidden).view({2 * inter, hidden});
    m.down = ps.get(p + "down_proj.weight");
    return m;
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = layer_prefix(l);
    LayerWeights lw;
    lw.input_norm = ps.get(p + "input_layernorm.weight");
    lw.post_norm = ps.get(p + "post_attention_layernorm.weight");
    if (c.q_lora_rank > 0) {
      lw.q_a_proj = ps.get(p + "self_attn.q_a_proj.weight");
      lw.q_a_norm = ps.get(p + "self_attn.q_a_layernorm.weight");
      lw.q_b_proj = ps.get(p + "self_attn.q_b_proj.weight");
    } else {
      lw.q_proj = ps.get(p + "self_attn.q_proj.weight");
    }
    lw.kv_a_proj = ps.get(p + "self_attn.kv_a_proj_with_mqa.weight");
    lw.kv_a_norm = ps.get(p + "self_attn.kv_a_layernorm.weight");
    lw.kv_b_proj = ps.get(p + "self_attn.kv_b_proj.weight");
    lw.o_proj = ps.get(p + "self_attn.o_proj.weight");
    lw.moe = c.is_moe_layer(l);
    if (lw.moe) {
      lw.router = ps.get(p + "mlp.gate.weight");
      lw.router_bias = ps.get(p + "mlp.gate.e_score_correction_bias");
      lw.experts_gate_up = ps.get(p + "mlp.experts.gate_up_proj");
      lw.experts_down = ps.get(p + "mlp.experts.down_proj");
      if (c.n_shared_experts > 0) lw.shared = mlp(p + "mlp.shared_experts.");
    } else {
      lw.mlp = mlp(p + "mlp.");
    }
    w.layers.push_back(std::move(lw));
  }
  return w;
}

namespace {

// Copies a checkpoint tensor (any supported dtype) into dst on the backend, checking its shape.
absl::Status load_into(const SafetensorsFile& f, const std::string& name, const core::Shape& want,
                       core::Backend& backend, core::Tensor dst) {
  const SafetensorsEntry& e = f.entries().at(name);
  if (e.shape != want)
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": tensor '", name, "' has shape ",
                                                   core::shape_str(e.shape), ", expected ", core::shape_str(want)));
  if (e.dtype != core::DType::kF32 && e.dtype != core::DType::kBF16 && e.dtype != core::DType::kF16)
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": tensor '", name, "' has dtype ",
                                                   core::dtype_name(e.dtype), "; weights must be F32, BF16 or F16"));
  core::Tensor host = f.tensor(name).to_f32();
  for (int64_t i = 0; i < host.numel(); ++i) {
    if (!std::isfinite(host.f32()[i]))
      return absl::DataLossError(absl::StrCat(f.path(), ": tensor '", name, "' holds a non-finite value"));
  }
  if (dst.is_contiguous()) {
    backend.upload(host, dst);
  } else {
    core::Tensor tmp = backend.zeros(want);
    backend.upload(host, tmp);
    backend.copy(tmp, dst);
  }
  return absl::OkStatus();
}

// Layer index of "model.layers.<l>.…", or -1.
int layer_of(const std::string& name) {
  if (!absl::StartsWith(name, "model.layers.")) return -1;
  std::vector<std::string> parts = absl::StrSplit(name, '.');
  int l = -1;
  if (parts.size() > 2 && absl::SimpleAtoi(parts[2], &l)) return l;
  return -1;
}

}  // namespace

absl::Status load_weights(const std::string& dir, const ModelConfig& cfg, core::Backend& backend,
                          ParameterSet& params) {
  R1LAB_ASSIGN_OR_RETURN(auto ck, Checkpoint::open(dir));
  std::set<std::string> used;
  for (const ParamInfo& p : params.infos()) {
    core::Tensor dst = params.get(p.name);
    if (const SafetensorsFile* f = ck->file_of(p.name)) {
      R1LAB_RETURN_IF_ERROR(load_into(*f, p.name, p.shape, backend, dst));
      used.insert(p.name);
      continue;
    }
    // Hub layout: one tensor per expert.
    const bool gate_up = absl::EndsWith(p.name, "mlp.experts.gate_up_proj");
    const bool down = absl::EndsWith(p.name, "mlp.experts.down_proj");
    if (gate_up || down) {
      const std::string base = p.name.substr(0, p.name.rfind('.') + 1);  // "...mlp.experts."
      const int64_t e_count = p.shape[0];
      const int64_t inter = gate_up ? p.shape[1] / 2 : p.shape[2], hidden = gate_up ? p.shape[2] : p.shape[1];
      for (int64_t e = 0; e < e_count; ++e) {
        const std::string pe = absl::StrCat(base, e, ".");
        std::vector<std::pair<std::string, core::Tensor>> parts;
        if (gate_up) {
          parts = {{pe + "gate_proj.weight", dst[e].slice(0, 0, inter)},
                   {pe + "up_proj.weight", dst[e].slice(0, inter, inter)}};
        } else {
          parts = {{pe + "down_proj.weight", dst[e]}};
        }
        for (auto& [name, view] : parts) {
          const SafetensorsFile* f = ck->file_of(name);
          if (f == nullptr)
            return absl::NotFoundError(absl::StrCat(dir, ": checkpoint lacks '", p.name, "' and '", name, "'"));
          const core::Shape want = gate_up ? core::Shape{inter, hidden} : core::Shape{hidden, inter};
          R1LAB_RETURN_IF_ERROR(load_into(*f, name, want, backend, view));
          used.insert(name);
        }
      }
      continue;
    }
    if (!p.trainable) continue;  // a router without correction bias: zeros, as transformers initialises it
    return absl::NotFoundError(absl::StrCat(dir, ": checkpoint lacks tensor '", p.name, "'"));
  }
  std::vector<std::string> unexpected;
  for (const std::string& name : ck->names()) {
    if (used.count(name)) continue;
    if (layer_of(name) >= cfg.num_hidden_layers) continue;  // multi-token-prediction layers
    if (absl::EndsWith(name, "rotary_emb.inv_freq")) continue;
    if (cfg.tie_word_embeddings && name == "lm_head.weight") continue;
    unexpected.push_back(name);
  }
  if (!unexpected.empty())
    return absl::InvalidArgumentError(absl::StrCat(dir, ": ", unexpected.size(), " unexpected tensor(s), first '",
                                                   unexpected.front(), "': the checkpoint does not match config.json"));
  return absl::OkStatus();
}

absl::Status save_checkpoint(const std::string& dir, const ModelConfig& cfg, core::Backend& backend,
                             const ParameterSet& params, ExpertLayout layout) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create: ", ec.message()));
  core::Tensor host = backend.download(params.buffer());
  std::vector<std::pair<std::string, core::Tensor>> out;
  for (const ParamInfo& p : params.infos()) {
    core::Tensor t = host.slice(0, p.offset, core::shape_numel(p.shape)).view(p.shape);
    const bool gate_up = absl::EndsWith(p.name, "mlp.experts.gate_up_proj");
    const bool down = absl::EndsWith(p.name, "mlp.experts.down_proj");
    if (layout == ExpertLayout::kPerExpert && (gate_up || down)) {
      const std::string base = p.name.substr(0, p.name.rfind('.') + 1);
      for (int64_t e = 0; e < p.shape[0]; ++e) {
        const std::string pe = absl::StrCat(base, e, ".");
        if (gate_up) {
          const int64_t inter = p.shape[1] / 2;
          out.emplace_back(pe + "gate_proj.weight", t[e].slice(0, 0, inter));
          out.emplace_back(pe + "up_proj.weight", t[e].slice(0, inter, inter));
        } else {
          out.emplace_back(pe + "down_proj.weight", t[e]);
        }
      }
      continue;
    }
    out.emplace_back(p.name, t);
  }
  R1LAB_RETURN_IF_ERROR(write_safetensors(dir + "/model.safetensors", out, {{"format", "pt"}}));
  return write_file_atomic(dir + "/config.json", cfg.to_json().dump(2) + "\n");
}

}  // namespace r1lab::model
