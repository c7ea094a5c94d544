#include "rollout/client.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/check.h"
#include "core/comm.h"
#include "grpcpp/grpcpp.h"
#include "r1lab/v1/rollout.grpc.pb.h"
#include "rollout/proto_convert.h"

namespace r1lab::rollout {

absl::StatusOr<std::vector<Completion>> RolloutClient::generate_all(std::vector<GroupRequest> groups) {
  std::vector<Completion> out;
  R1LAB_RETURN_IF_ERROR(generate(std::move(groups), [&](Completion&& c) {
    out.push_back(std::move(c));
    return true;
  }));
  sort_completions(out);
  return out;
}

absl::Status RolloutClient::publish_weights(int64_t version, const model::Model& policy) {
  return update_weights(version, weight_tensors(policy));
}

absl::Status RolloutClient::join_weight_group(const model::Model&, double) {
  return absl::FailedPreconditionError("an in-process engine needs no weight group (it shares or copies weights)");
}

std::vector<NamedTensor> weight_tensors(const model::Model& m) {
  std::vector<NamedTensor> out;
  // One download; each tensor is a view of it (contiguous, sharing its storage).
  const core::Tensor host = m.backend().download(m.params().buffer());
  for (const model::ParamInfo& p : m.params().infos())
    out.push_back({p.name, host.slice(0, p.offset, core::shape_numel(p.shape)).view(p.shape)});
  return out;
}

absl::Status check_weight_update(const model::ParameterSet& params, const std::vector<NamedTensor>& tensors) {
  std::set<std::string> seen;
  for (const NamedTensor& t : tensors) {
    if (!params.contains(t.name)) return absl::InvalidArgumentError(absl::StrCat("unknown parameter '", t.name, "'"));
    if (!seen.insert(t.name).second)
      return absl::InvalidArgumentError(absl::StrCat("parameter '", t.name, "' given twice"));
    const model::ParamInfo& info = params.info(t.name);
    if (t.tensor.shape() != info.shape)
      return absl::InvalidArgumentError(absl::StrCat("parameter '", t.name, "': shape ", core::shape_str(t.tensor.shape()),
                                                     ", the model's is ", core::shape_str(info.shape)));
    const core::DType d = t.tensor.dtype();
    if (d != core::DType::kF32 && d != core::DType::kBF16 && d != core::DType::kF16)
      return absl::InvalidArgumentError(
          absl::StrCat("parameter '", t.name, "': dtype ", core::dtype_name(d), " (F32, BF16, F16 accepted)"));
    if (t.tensor.device() != core::Device::kCpu || !t.tensor.is_contiguous())
      return absl::InvalidArgumentError(absl::StrCat("parameter '", t.name, "': not a contiguous host tensor"));
    const core::Tensor f = d == core::DType::kF32 ? t.tensor : t.tensor.to_f32();
    const float* v = f.f32();
    const int64_t n = f.numel();
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(v[i]);  // no early exit: this loop vectorises
    if (!finite) {
      const int64_t at = std::find_if(v, v + n, [](float x) { return !std::isfinite(x); }) - v;
      return absl::InvalidArgumentError(absl::StrCat("parameter '", t.name, "' has a non-finite value at ", at));
    }
  }
  return absl::OkStatus();
}

void copy_weights(model::Model& model, const std::vector<NamedTensor>& tensors) {
  for (const NamedTensor& t : tensors) {
    core::Tensor dst = model.params().get(t.name);
    model.backend().upload(t.tensor.dtype() == dst.dtype() ? t.tensor : t.tensor.to(dst.dtype()), dst);
  }
}

namespace {

class LocalClient final : public RolloutClient {
 public:
  LocalClient(Engine& engine, std::string dir) : engine_(engine), dir_(std::move(dir)) {}

  absl::Status generate(std::vector<GroupRequest> groups,
                        const std::function<bool(Completion&&)>& on_completion) override {
    return engine_.stream(std::move(groups), on_completion);
  }

  absl::Status update_weights(int64_t version, const std::vector<NamedTensor>& tensors) override {
    R1LAB_RETURN_IF_ERROR(check_weight_update(engine_.model().params(), tensors));
    return engine_.update_weights(version, [&](model::Model& m) {
      copy_weights(m, tensors);
      return absl::OkStatus();
    });
  }

  // The engine's own model: nothing moves. Another model on the same backend: one device copy of the
  // buffer between steps. Elsewhere: through the host.
  absl::Status publish_weights(int64_t version, const model::Model& policy) override {
    const std::string path = weight_path(policy);
    if (path == "shared") return update_weights(version, {});
    if (path != "copy") return RolloutClient::publish_weights(version, policy);
    return engine_.update_weights(version, [&](model::Model& m) {
      core::Tensor dst = m.params().buffer();
      m.backend().copy(policy.params().buffer(), dst);
      return absl::OkStatus();
    });
  }

  std::string weight_path(const model::Model& policy) const override {
    const model::Model& mine = engine_.model();
    if (&mine == &policy) return "shared";
    if (&mine.backend() == &policy.backend() && mine.params().fingerprint() == policy.params().fingerprint())
      return "copy";
    return "host";
  }

  absl::StatusOr<Health> health() override {
    Health h;
    h.stats = engine_.stats();
    h.policy_version = h.stats.policy_version;
    h.model = dir_;
    h.vocab_size = engine_.config().vocab_size;
    h.max_context = engine_.config().max_position_embeddings;
    h.has_tokenizer = engine_.has_vocabulary();
    h.uptime_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - born_).count();
    return h;
  }

 private:
  Engine& engine_;
  std::string dir_;
  std::chrono::steady_clock::time_point born_ = std::chrono::steady_clock::now();
};

absl::Status from_grpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

class GrpcClient final : public RolloutClient {
 public:
  GrpcClient(const std::string& target, size_t chunk_bytes) : chunk_(std::max<size_t>(chunk_bytes, 1)) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
    args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 16 << 20);
    args.SetInt(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 16 << 20);
    stub_ = pb::Rollout::NewStub(grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args));
  }

  absl::Status generate(std::vector<GroupRequest> groups,
                        const std::function<bool(Completion&&)>& on_completion) override {
    pb::GenerateRequest req;
    groups_to_proto(groups, &req);
    grpc::ClientContext ctx;
    auto reader = stub_->Generate(&ctx, req);
    pb::GenerateResponse resp;
    bool cancelled = false;
    while (reader->Read(&resp)) {
      if (!on_completion(completion_from_proto(resp.completion()))) {
        cancelled = true;
        ctx.TryCancel();
        break;
      }
    }
    grpc::Status st = reader->Finish();
    return cancelled ? absl::OkStatus() : from_grpc(st);
  }

  absl::Status update_weights(int64_t version, const std::vector<NamedTensor>& tensors) override {
    const size_t kChunk = chunk_;
    grpc::ClientContext ctx;
    pb::UpdateWeightsResponse resp;
    auto writer = stub_->UpdateWeights(&ctx, &resp);
    bool ok = true;
    if (tensors.empty()) {
      pb::WeightChunk c;
      c.set_version(version);
      ok = writer->Write(c);
    }
    for (const NamedTensor& t : tensors) {
      if (!ok) break;
      const core::Tensor host = t.tensor.is_contiguous() ? t.tensor : t.tensor.clone();
      const size_t bytes = static_cast<size_t>(host.numel()) * core::dtype_size(host.dtype());
      const char* p = static_cast<const char*>(host.raw());
      for (size_t off = 0; ok && (off < bytes || off == 0); off += kChunk) {
        pb::WeightChunk c;
        c.set_version(version);
        c.set_name(t.name);
        c.set_dtype(dtype_to_proto(host.dtype()));
        for (int64_t d : host.shape()) c.add_shape(d);
        c.set_offset(off);
        c.set_data(p + off, std::min(kChunk, bytes - off));
        ok = writer->Write(c);
        if (bytes == 0) break;
      }
    }
    writer->WritesDone();
    return from_grpc(writer->Finish());
  }

  // Joins the worker as rank 1 of a two-member group: the JoinWeightGroup call runs on a thread of its
  // own while this thread joins as rank 0 (each returns once both have).
  absl::Status join_weight_group(const model::Model& policy, double timeout_seconds) override {
    if (policy.backend().device() != core::Device::kCuda)
      return absl::FailedPreconditionError("the trainer's weights are on the CPU; a weight group needs a GPU");
    std::string why;
    if (!core::comm_available(&why)) return absl::FailedPreconditionError(why);
    auto id = core::new_group_id();
    if (!id.ok()) return id.status();
    pb::JoinWeightGroupRequest req;
    req.set_group_id(*id);
    req.set_rank(1);
    req.set_world_size(2);
    req.set_timeout_seconds(timeout_seconds);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(1e3 * (timeout_seconds + 10))));
    pb::JoinWeightGroupResponse resp;
    grpc::Status rpc;
    std::atomic<bool> rpc_failed{false};
    std::thread call([&] {
      rpc = stub_->JoinWeightGroup(&ctx, req, &resp);
      rpc_failed = !rpc.ok();
    });
    auto comm = core::join_group(policy.backend(), *id, 0, 2, {timeout_seconds, [&] { return rpc_failed.load(); }});
    if (!comm.ok()) ctx.TryCancel();
    call.join();
    const bool worker_failed = !rpc.ok() && rpc.error_code() != grpc::StatusCode::CANCELLED;
    if (!comm.ok())  // this side's error, and the worker's where it had its own
      return absl::Status(comm.status().code(),
                          absl::StrCat(comm.status().message(),
                                       worker_failed ? absl::StrCat("; the worker: ", rpc.error_message()) : ""));
    if (!rpc.ok())
      return absl::Status(from_grpc(rpc).code(),
                          absl::StrCat("the worker did not join the weight group: ", rpc.error_message()));
    group_ = *std::move(comm);
    layout_ = policy.params().fingerprint();
    return absl::OkStatus();
  }

  // Over the weight group: the worker checks the request and says ready, then this side broadcasts
  // the parameter buffer while a second thread reads the worker's result (or sees it fail, which ends
  // the broadcast here too).
  absl::Status publish_weights(int64_t version, const model::Model& policy) override {
    if (!group_) return RolloutClient::publish_weights(version, policy);
    if (policy.params().fingerprint() != layout_)
      return absl::InvalidArgumentError("publish_weights: the model's parameter layout is not the one the weight group joined with");
    constexpr double kTimeout = 300;
    pb::BroadcastWeightsRequest req;
    req.set_version(version);
    req.set_layout(layout_);
    req.set_dtype(dtype_to_proto(policy.params().buffer().dtype()));
    req.set_numel(policy.params().numel());
    req.set_timeout_seconds(kTimeout);
    grpc::ClientContext ctx;
    auto reader = stub_->BroadcastWeights(&ctx, req);
    pb::BroadcastWeightsResponse resp;
    if (!reader->Read(&resp) || !resp.ready()) {
      const absl::Status st = from_grpc(reader->Finish());  // a refusal: the group stays usable
      return st.ok() ? absl::InternalError("BroadcastWeights: the worker ended without saying ready") : st;
    }
    std::atomic<bool> ended{false}, applied{false};
    std::thread result([&] {
      pb::BroadcastWeightsResponse last;
      applied = reader->Read(&last) && last.has_applied();
      ended = true;
    });
    core::Tensor buffer = policy.params().buffer();
    const absl::Status sent = group_->broadcast(buffer, 0, {kTimeout, [&] { return ended && !applied; }});
    if (!sent.ok()) ctx.TryCancel();
    result.join();
    const absl::Status st = from_grpc(reader->Finish());
    if (!sent.ok()) {
      group_.reset();
      return absl::Status(sent.code(), absl::StrCat("NCCL weight broadcast failed (", sent.message(),
                                                    st.ok() ? "" : absl::StrCat("; the worker: ", st.message()),
                                                    "); later versions go by UpdateWeights"));
    }
    return st;
  }

  std::string weight_path(const model::Model&) const override { return group_ ? "nccl" : "grpc"; }

  absl::StatusOr<Health> health() override {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    pb::HealthResponse resp;
    R1LAB_RETURN_IF_ERROR(from_grpc(stub_->Health(&ctx, pb::HealthRequest(), &resp)));
    return health_from_proto(resp);
  }

 private:
  std::unique_ptr<pb::Rollout::Stub> stub_;
  size_t chunk_;
  std::unique_ptr<core::Communicator> group_;  // the weight group with the worker, once joined
  std::string layout_;  // the parameter layout the group was joined with
};

}  // namespace

std::unique_ptr<RolloutClient> make_local_client(Engine& engine, std::string model_dir) {
  return std::make_unique<LocalClient>(engine, std::move(model_dir));
}

std::unique_ptr<RolloutClient> make_grpc_client(const std::string& target, size_t chunk_bytes) {
  return std::make_unique<GrpcClient>(target, chunk_bytes);
}

}  // namespace r1lab::rollout
