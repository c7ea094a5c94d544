#include "rewards/service.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "r1lab/v1/reward.grpc.pb.h"

namespace r1lab::rewards {
namespace {

namespace pb = ::r1lab::v1;

constexpr size_t kMaxSamples = 65536;
constexpr size_t kMaxText = 1 << 20;

// Well-formed UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

}  // namespace

absl::StatusOr<RewardSet> RewardSet::make(const RewardRegistry& registry, const nlohmann::json& spec) {
  RewardSet set;
  for (const std::string& name : registry.names()) {
    auto fn = registry.make(name, nlohmann::json::object());
    if (!fn.ok()) return fn.status();
    set.rewards_[name] = {std::shared_ptr<RewardFn>(std::move(*fn)), nlohmann::json::array({{{"name", name}}}).dump()};
  }
  if (spec.is_null()) return set;
  if (!spec.is_object()) return absl::InvalidArgumentError("reward spec: an object of name -> list of rules");
  for (const auto& [name, rules] : spec.items()) {
    auto sum = WeightedSum::from_json(registry, rules);
    if (!sum.ok()) return absl::InvalidArgumentError(absl::StrCat("reward '", name, "': ", sum.status().message()));
    set.rewards_[name] = {std::shared_ptr<RewardFn>(std::move(*sum)), rules.dump()};
  }
  return set;
}

const RewardFn* RewardSet::find(const std::string& name) const {
  auto it = rewards_.find(name);
  return it == rewards_.end() ? nullptr : it->second.fn.get();
}

std::vector<std::pair<std::string, std::string>> RewardSet::list() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [name, e] : rewards_) out.emplace_back(name, e.spec);
  return out;
}

absl::Status check_samples(const std::vector<Sample>& samples) {
  if (samples.size() > kMaxSamples)
    return absl::InvalidArgumentError(absl::StrCat(samples.size(), " samples; at most ", kMaxSamples, " per call"));
  for (size_t i = 0; i < samples.size(); ++i) {
    const Sample& s = samples[i];
    for (const auto& [field, text] : {std::pair<const char*, const std::string*>{"prompt", &s.prompt},
                                      {"completion", &s.completion},
                                      {"reference", &s.reference},
                                      {"task", &s.task}}) {
      if (text->size() > kMaxText)
        return absl::InvalidArgumentError(absl::StrCat("sample ", i, ": ", field, " over 1 MiB"));
      if (!valid_utf8(*text)) return absl::InvalidArgumentError(absl::StrCat("sample ", i, ": ", field, " is not UTF-8"));
    }
    if (!s.meta.is_null() && !s.meta.is_object())
      return absl::InvalidArgumentError(absl::StrCat("sample ", i, ": meta must be a JSON object"));
  }
  return absl::OkStatus();
}

namespace {

class LocalRewardClient final : public RewardClient {
 public:
  explicit LocalRewardClient(std::shared_ptr<const RewardSet> set) : set_(std::move(set)) {}

  absl::StatusOr<std::vector<Score>> score(const std::string& reward, const std::vector<Sample>& samples) override {
    const RewardFn* fn = set_->find(reward);
    if (!fn) {
      std::string known;
      for (const auto& [name, spec] : set_->list()) absl::StrAppend(&known, known.empty() ? "" : ", ", name);
      return absl::InvalidArgumentError(absl::StrCat("unknown reward '", reward, "' (offered: ", known, ")"));
    }
    R1LAB_RETURN_IF_ERROR(check_samples(samples));
    std::vector<Score> out;
    out.reserve(samples.size());
    for (const Sample& s : samples) out.push_back(fn->score(s));
    return out;
  }

  absl::StatusOr<std::vector<RewardInfo>> list() override {
    std::vector<RewardInfo> out;
    for (const auto& [name, spec] : set_->list()) out.push_back({name, spec});
    return out;
  }

 private:
  std::shared_ptr<const RewardSet> set_;
};

grpc::Status to_grpc(const absl::Status& s) {
  return s.ok() ? grpc::Status::OK : grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}
absl::Status from_grpc(const grpc::Status& s) {
  return s.ok() ? absl::OkStatus() : absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

class Service final : public pb::Reward::Service {
 public:
  explicit Service(std::shared_ptr<const RewardSet> set) : local_(std::move(set)) {}

  grpc::Status Score(grpc::ServerContext*, const pb::ScoreRequest* req, pb::ScoreResponse* resp) override {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<Sample> samples;
    samples.reserve(static_cast<size_t>(req->samples_size()));
    for (int i = 0; i < req->samples_size(); ++i) {
      const pb::RewardSample& p = req->samples(i);
      Sample s{p.prompt(), p.completion(), p.reference(), p.task(), nlohmann::json::object()};
      if (!p.meta_json().empty()) {
        s.meta = nlohmann::json::parse(p.meta_json(), nullptr, /*allow_exceptions=*/false);
        if (s.meta.is_discarded() || !s.meta.is_object())
          return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              absl::StrCat("sample ", i, ": meta_json is not a JSON object"));
      }
      samples.push_back(std::move(s));
    }
    auto scores = local_.score(req->reward(), samples);
    if (!scores.ok()) return to_grpc(scores.status());
    for (const rewards::Score& s : *scores) {
      pb::SampleScore* o = resp->add_scores();
      o->set_value(s.value);
      for (const auto& [k, v] : s.components) (*o->mutable_components())[k] = v;
      o->set_error(s.error);
    }
    resp->set_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return grpc::Status::OK;
  }

  grpc::Status List(grpc::ServerContext*, const pb::ListRequest*, pb::ListResponse* resp) override {
    auto infos = local_.list();
    if (!infos.ok()) return to_grpc(infos.status());
    for (const RewardInfo& r : *infos) {
      pb::RewardInfo* o = resp->add_rewards();
      o->set_name(r.name);
      o->set_spec_json(r.spec_json);
    }
    return grpc::Status::OK;
  }

 private:
  LocalRewardClient local_;
};

class GrpcRewardClient final : public RewardClient {
 public:
  GrpcRewardClient(const std::string& target, double timeout_s) : timeout_s_(timeout_s) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(64 << 20);
    args.SetMaxReceiveMessageSize(64 << 20);
    stub_ = pb::Reward::NewStub(grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args));
  }

  absl::StatusOr<std::vector<Score>> score(const std::string& reward, const std::vector<Sample>& samples) override {
    pb::ScoreRequest req;
    req.set_reward(reward);
    for (const Sample& s : samples) {
      pb::RewardSample* p = req.add_samples();
      p->set_prompt(s.prompt);
      p->set_completion(s.completion);
      p->set_reference(s.reference);
      p->set_task(s.task);
      if (!s.meta.is_null()) p->set_meta_json(s.meta.dump());
    }
    grpc::ClientContext ctx;
    set_deadline(ctx);
    pb::ScoreResponse resp;
    R1LAB_RETURN_IF_ERROR(from_grpc(stub_->Score(&ctx, req, &resp)));
    if (resp.scores_size() != req.samples_size())
      return absl::InternalError(absl::StrCat("reward server returned ", resp.scores_size(), " scores for ",
                                              req.samples_size(), " samples"));
    std::vector<Score> out;
    for (const pb::SampleScore& s : resp.scores()) {
      Score o;
      o.value = s.value();
      o.components.insert(s.components().begin(), s.components().end());
      o.error = s.error();
      out.push_back(std::move(o));
    }
    return out;
  }

  absl::StatusOr<std::vector<RewardInfo>> list() override {
    grpc::ClientContext ctx;
    set_deadline(ctx);
    pb::ListResponse resp;
    R1LAB_RETURN_IF_ERROR(from_grpc(stub_->List(&ctx, pb::ListRequest(), &resp)));
    std::vector<RewardInfo> out;
    for (const pb::RewardInfo& r : resp.rewards()) out.push_back({r.name(), r.spec_json()});
    return out;
  }

 private:
  void set_deadline(grpc::ClientContext& ctx) const {
    if (timeout_s_ > 0)
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::microseconds(static_cast<int64_t>(timeout_s_ * 1e6)));
  }
  double timeout_s_;
  std::unique_ptr<pb::Reward::Stub> stub_;
};

class Server final : public RewardServer {
 public:
  explicit Server(std::shared_ptr<const RewardSet> set) : service_(std::move(set)) {}
  absl::Status start(const std::string& host, int port) {
    grpc::ServerBuilder b;
    const std::string addr = absl::StrCat(host.find(':') != std::string::npos ? "[" + host + "]" : host, ":", port);
    b.AddListeningPort(addr, grpc::InsecureServerCredentials(), &port_);
    b.SetMaxReceiveMessageSize(64 << 20);
    b.RegisterService(&service_);
    server_ = b.BuildAndStart();
    if (!server_ || port_ == 0) return absl::UnavailableError(absl::StrCat("cannot listen on ", addr));
    return absl::OkStatus();
  }
  ~Server() override { shutdown(); }
  int port() const override { return port_; }
  void shutdown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }

 private:
  Service service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace

std::unique_ptr<RewardClient> make_local_reward_client(std::shared_ptr<const RewardSet> rewards) {
  return std::make_unique<LocalRewardClient>(std::move(rewards));
}

std::unique_ptr<RewardClient> make_grpc_reward_client(const std::string& target, double timeout_s) {
  return std::make_unique<GrpcRewardClient>(target, timeout_s);
}

absl::StatusOr<std::unique_ptr<RewardServer>> start_reward_server(std::shared_ptr<const RewardSet> rewards,
                                                                  const std::string& host, int port) {
  auto s = std::make_unique<Server>(std::move(rewards));
  R1LAB_RETURN_IF_ERROR(s->start(host, port));
  return std::unique_ptr<RewardServer>(std::move(s));
}

}  // namespace r1lab::rewards
