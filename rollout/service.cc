#include "rollout/service.h"

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "core/comm.h"
#include "grpcpp/grpcpp.h"
#include "r1lab/v1/rollout.grpc.pb.h"
#include "rollout/client.h"
#include "rollout/proto_convert.h"

namespace r1lab::rollout {
namespace {

grpc::Status to_grpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

class Service final : public pb::Rollout::Service {
 public:
  Service(Engine& engine, std::string dir) : engine_(engine), dir_(std::move(dir)), local_(make_local_client(engine, dir_)) {}

  grpc::Status Generate(grpc::ServerContext* ctx, const pb::GenerateRequest* req,
                        grpc::ServerWriter<pb::GenerateResponse>* writer) override {
    auto groups = groups_from_proto(*req);
    if (!groups.ok()) return to_grpc(groups.status());
    CompletionQueue q;
    auto id = engine_.submit(std::move(*groups), q.sink(), q.on_done());
    if (!id.ok()) return to_grpc(id.status());
    for (;;) {
      std::deque<Completion> ready;
      const bool finished = q.take(&ready, std::chrono::milliseconds(50));
      bool broken = false;
      for (const Completion& c : ready) {
        pb::GenerateResponse resp;
        completion_to_proto(c, resp.mutable_completion());
        if (!writer->Write(resp)) {
          broken = true;
          break;
        }
      }
      if (finished && !broken) return grpc::Status::OK;
      if (broken || ctx->IsCancelled()) {
        // The client went away: end its sequences, and wait until the engine lets go of the queue.
        engine_.cancel(*id);
        q.wait_done();
        return grpc::Status(grpc::StatusCode::CANCELLED, "generate cancelled");
      }
    }
  }

  grpc::Status UpdateWeights(grpc::ServerContext* ctx, grpc::ServerReader<pb::WeightChunk>* reader,
                             pb::UpdateWeightsResponse* resp) override {
    const auto t0 = std::chrono::steady_clock::now();
    struct Staged {
      core::Tensor tensor;
      size_t received = 0;
    };
    std::map<std::string, Staged> staged;
    const model::ParameterSet& params = engine_.model().params();
    pb::WeightChunk c;
    bool any = false;
    int64_t version = 0, bytes = 0;
    auto bad = [](const std::string& m) { return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, m); };
    while (reader->Read(&c)) {
      if (!any) version = c.version();
      any = true;
      if (c.version() != version)
        return bad(absl::StrCat("chunk of '", c.name(), "' has version ", c.version(), ", the stream's is ", version));
      if (c.name().empty()) {
        if (!c.data().empty()) return bad("a chunk with data must name its parameter");
        continue;
      }
      if (!params.contains(c.name())) return bad(absl::StrCat("unknown parameter '", c.name(), "'"));
      auto dtype = dtype_from_proto(c.dtype());
      if (!dtype.ok()) return bad(absl::StrCat("parameter '", c.name(), "': ", dtype.status().message()));
      core::Shape shape(c.shape().begin(), c.shape().end());
      const model::ParamInfo& info = params.info(c.name());
      if (shape != info.shape)
        return bad(absl::StrCat("parameter '", c.name(), "': shape ", core::shape_str(shape), ", the model's is ",
                                core::shape_str(info.shape)));
      auto [it, fresh] = staged.try_emplace(c.name());
      Staged& s = it->second;
      if (fresh) s.tensor = core::Tensor::empty(shape, *dtype);  // every byte arrives (checked below)
      if (s.tensor.dtype() != *dtype) return bad(absl::StrCat("parameter '", c.name(), "': dtype changed mid-stream"));
      const size_t total = static_cast<size_t>(s.tensor.numel()) * core::dtype_size(*dtype);
      if (c.offset() != s.received)
        return bad(absl::StrCat("parameter '", c.name(), "': chunk at byte ", c.offset(), ", expected ", s.received));
      if (s.received + c.data().size() > total)
        return bad(absl::StrCat("parameter '", c.name(), "': more than its ", total, " bytes"));
      std::memcpy(static_cast<char*>(s.tensor.raw()) + s.received, c.data().data(), c.data().size());
      s.received += c.data().size();
      bytes += static_cast<int64_t>(c.data().size());
    }
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "update cancelled");
    if (!any) return bad("no chunks: the stream must carry at least the version");
    std::vector<NamedTensor> tensors;
    for (auto& [name, s] : staged) {
      const size_t total = static_cast<size_t>(s.tensor.numel()) * core::dtype_size(s.tensor.dtype());
      if (s.received != total)
        return bad(absl::StrCat("parameter '", name, "': ", s.received, " of ", total, " bytes arrived"));
      tensors.push_back({name, std::move(s.tensor)});
    }
    absl::Status st = local_->update_weights(version, tensors);
    if (!st.ok()) return to_grpc(st);
    resp->set_version(version);
    resp->set_tensors(static_cast<int64_t>(tensors.size()));
    resp->set_bytes(bytes);
    resp->set_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return grpc::Status::OK;
  }

  grpc::Status JoinWeightGroup(grpc::ServerContext* ctx, const pb::JoinWeightGroupRequest* req,
                               pb::JoinWeightGroupResponse* resp) override {
    if (req->world_size() < 2 || req->rank() < 1 || req->rank() >= req->world_size())
      return to_grpc(absl::InvalidArgumentError(
          absl::StrCat("JoinWeightGroup: rank ", req->rank(), " of ", req->world_size(), " (a worker's rank is in [1, world_size))")));
    const double timeout = req->timeout_seconds() > 0 ? req->timeout_seconds() : 60;
    std::lock_guard<std::mutex> lk(group_mu_);
    // NCCL sets itself up on this thread and its own streams; the engine keeps stepping meanwhile.
    auto comm = core::join_group(engine_.model().backend(), req->group_id(), req->rank(), req->world_size(),
                                 {timeout, [ctx] { return ctx->IsCancelled(); }});
    if (!comm.ok()) return to_grpc(comm.status());
    group_ = *std::move(comm);
    group_failure_.clear();
    resp->set_device(engine_.model().backend().name());
    return grpc::Status::OK;
  }

  grpc::Status BroadcastWeights(grpc::ServerContext* ctx, const pb::BroadcastWeightsRequest* req,
                                grpc::ServerWriter<pb::BroadcastWeightsResponse>* writer) override {
    const auto t0 = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lk(group_mu_);
    if (!group_)
      return to_grpc(absl::FailedPreconditionError(
          group_failure_.empty() ? "BroadcastWeights: no weight group (call JoinWeightGroup first)"
                                 : absl::StrCat("BroadcastWeights: the weight group failed (", group_failure_, "); join again")));
    const model::ParameterSet& params = engine_.model().params();
    if (req->layout() != params.fingerprint())
      return to_grpc(absl::InvalidArgumentError(absl::StrCat("BroadcastWeights: parameter layout ", req->layout(),
                                                             ", this worker's is ", params.fingerprint())));
    if (req->dtype() != dtype_to_proto(params.buffer().dtype()) || req->numel() != params.numel())
      return to_grpc(absl::InvalidArgumentError(absl::StrCat(
          "BroadcastWeights: ", req->numel(), " elements of dtype ", pb::DType_Name(req->dtype()), ", this worker holds ",
          params.numel(), " of ", core::dtype_name(params.buffer().dtype()))));
    const double timeout = req->timeout_seconds() > 0 ? req->timeout_seconds() : 300;
    bool ready = false;
    absl::Status received;
    // Between engine steps, so that this thread owns the backend's stream: stage, say ready, receive,
    // and only a complete transfer replaces the weights.
    const absl::Status st = engine_.update_weights(req->version(), [&](model::Model& m) -> absl::Status {
      core::Tensor staging = m.backend().empty({req->numel()}, params.buffer().dtype());  // written whole
      pb::BroadcastWeightsResponse r;
      r.set_ready(true);
      if (!writer->Write(r)) return absl::CancelledError("BroadcastWeights: the trainer went away before the transfer");
      ready = true;
      received = group_->broadcast(staging, 0, {timeout, [ctx] { return ctx->IsCancelled(); }});
      if (!received.ok()) return received;
      core::Tensor dst = m.params().buffer();
      m.backend().copy(staging, dst);
      m.backend().synchronize();
      return absl::OkStatus();
    });
    if (ready && !received.ok()) {
      group_failure_ = std::string(received.message());
      group_.reset();
    }
    if (!st.ok()) return to_grpc(st);
    pb::BroadcastWeightsResponse r;
    pb::UpdateWeightsResponse* a = r.mutable_applied();
    a->set_version(req->version());
    a->set_tensors(static_cast<int64_t>(params.infos().size()));
    a->set_bytes(req->numel() * static_cast<int64_t>(core::dtype_size(params.buffer().dtype())));
    a->set_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    writer->Write(r);
    return grpc::Status::OK;
  }

  grpc::Status Health(grpc::ServerContext*, const pb::HealthRequest*, pb::HealthResponse* resp) override {
    auto h = local_->health();
    if (!h.ok()) return to_grpc(h.status());
    health_to_proto(*h, resp);
    return grpc::Status::OK;
  }

 private:
  Engine& engine_;
  std::string dir_;
  std::unique_ptr<RolloutClient> local_;  // health and the weight checks, shared with in-process use
  std::mutex group_mu_;                     // one weight-group call at a time
  std::unique_ptr<core::Communicator> group_;
  std::string group_failure_;  // why the last group ended, if it failed
};

class Server final : public RolloutServer {
 public:
  Server(model::Model& model, const model::Vocabulary* vocab, std::string dir, const ServerOptions& opt)
      : engine_(model, opt.engine, vocab), service_(engine_, std::move(dir)) {}

  absl::Status start(const ServerOptions& opt) {
    engine_.start();
    grpc::ServerBuilder b;
    const std::string addr = absl::StrCat(opt.host.find(':') != std::string::npos ? "[" + opt.host + "]" : opt.host,
                                          ":", opt.port);
    b.AddListeningPort(addr, grpc::InsecureServerCredentials(), &port_);
    b.SetMaxReceiveMessageSize(64 << 20);
    b.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
    b.AddChannelArgument(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 16 << 20);
    b.RegisterService(&service_);
    server_ = b.BuildAndStart();
    if (!server_ || port_ == 0) {
      engine_.stop();
      return absl::UnavailableError(absl::StrCat("cannot listen on ", addr));
    }
    return absl::OkStatus();
  }
  ~Server() override { shutdown(); }

  int port() const override { return port_; }
  Engine& engine() override { return engine_; }
  void shutdown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    engine_.stop();
  }
  void wait() override {
    if (server_) server_->Wait();
  }

 private:
  Engine engine_;
  Service service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<RolloutServer>> start_rollout_server(model::Model& model,
                                                                    const model::Vocabulary* vocab,
                                                                    std::string model_dir,
                                                                    const ServerOptions& options) {
  auto s = std::make_unique<Server>(model, vocab, std::move(model_dir), options);
  absl::Status st = s->start(options);
  if (!st.ok()) return st;
  return std::unique_ptr<RolloutServer>(std::move(s));
}

}  // namespace r1lab::rollout
