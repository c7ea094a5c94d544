#include "rollout/client.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/check.h"
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
};

}  // namespace

std::unique_ptr<RolloutClient> make_local_client(Engine& engine, std::string model_dir) {
  return std::make_unique<LocalClient>(engine, std::move(model_dir));
}

std::unique_ptr<RolloutClient> make_grpc_client(const std::string& target, size_t chunk_bytes) {
  return std::make_unique<GrpcClient>(target, chunk_bytes);
}

}  // namespace r1lab::rollout
