// The rollout worker over gRPC on loopback, against the same engine in process.
#include <cstring>
#include <thread>

#include "core/backend.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "r1lab/v1/rollout.grpc.pb.h"
#include "rollout/client.h"
#include "rollout/service.h"
#include "tests/test_util.h"

namespace r1lab::rollout {
namespace {

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    be_ = core::make_cpu_backend();
    served_ = load();
    ServerOptions opt;
    opt.port = 0;
    opt.engine.num_blocks = 256;
    auto server = start_rollout_server(*served_, nullptr, "tiny_a", opt);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    target_ = "127.0.0.1:" + std::to_string(server_->port());
    client_ = make_grpc_client(target_);
  }
  void TearDown() override { server_->shutdown(); }

  std::unique_ptr<model::Model> load() {
    auto m = model::Model::load(testing::fixtures_dir() + "/tiny_a", *be_);
    EXPECT_TRUE(m.ok()) << m.status();
    return std::move(*m);
  }
  static GroupRequest group(int32_t first, int g, int max_new, float temperature = 1.0f) {
    GroupRequest r;
    r.prompt = {first, 17, 29, 31, 5};
    r.num_samples = g;
    r.params.temperature = temperature;
    r.params.max_new_tokens = max_new;
    r.params.seed = static_cast<uint64_t>(first);
    return r;
  }
  // Polls Health until the worker holds no sequences and no blocks.
  void expect_drained() {
    for (int i = 0; i < 200; ++i) {
      auto h = client_->health();
      ASSERT_TRUE(h.ok()) << h.status();
      if (h->stats.running == 0 && h->stats.waiting == 0 && h->stats.blocks_in_use == 0) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    FAIL() << "worker still holds sequences or blocks";
  }

  std::unique_ptr<core::Backend> be_;
  std::unique_ptr<model::Model> served_;
  std::unique_ptr<RolloutServer> server_;
  std::string target_;
  std::unique_ptr<RolloutClient> client_;
};

TEST_F(ServiceTest, GrpcAndInProcessClientsGiveTheSameCompletions) {
  std::vector<GroupRequest> groups = {group(3, 4, 8), group(9, 1, 6, 0.0f), group(11, 2, 5)};
  groups[1].params.logprobs = false;
  auto remote = client_->generate_all(groups);
  ASSERT_TRUE(remote.ok()) << remote.status();
  auto local_model = load();
  EngineOptions eo;
  eo.num_blocks = 256;
  Engine engine(*local_model, eo);
  auto local = make_local_client(engine)->generate_all(groups);
  ASSERT_TRUE(local.ok()) << local.status();
  ASSERT_EQ(remote->size(), 7u);
  ASSERT_EQ(local->size(), 7u);
  for (size_t i = 0; i < 7; ++i) {
    EXPECT_EQ((*remote)[i].group, (*local)[i].group);
    EXPECT_EQ((*remote)[i].sample, (*local)[i].sample);
    EXPECT_EQ((*remote)[i].tokens, (*local)[i].tokens);
    EXPECT_EQ((*remote)[i].logprobs, (*local)[i].logprobs);
    EXPECT_EQ((*remote)[i].finish_reason, (*local)[i].finish_reason);
    EXPECT_EQ((*remote)[i].prompt_tokens, 5);
    EXPECT_GE((*remote)[i].total_seconds, (*remote)[i].first_token_seconds);
  }
  EXPECT_TRUE((*remote)[4].logprobs.empty());
  auto h = client_->health();
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->model, "tiny_a");
  EXPECT_EQ(h->vocab_size, 1024);
  EXPECT_EQ(h->stats.blocks_total, 256);
  EXPECT_GT(h->stats.tokens_generated, 0);
  EXPECT_FALSE(h->has_tokenizer);
}

TEST_F(ServiceTest, MalformedRequestsGetInvalidArgumentAndTheServerKeepsServing) {
  auto stub = v1::Rollout::NewStub(grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()));
  auto call = [&](const v1::GenerateRequest& req) {
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    return reader->Finish();
  };
  auto valid = [] {
    v1::GenerateRequest req;
    auto* g = req.add_groups();
    for (int id : {1, 2, 3}) g->add_prompt_token_ids(id);
    g->set_group_size(2);
    g->mutable_sampling()->set_max_new_tokens(3);
    return req;
  };
  EXPECT_TRUE(call(valid()).ok());
  std::vector<std::string> what;
  std::vector<v1::GenerateRequest> bad;
  auto add = [&](const char* w, const v1::GenerateRequest& q) {
    what.push_back(w);
    bad.push_back(q);
  };
  add("no groups", v1::GenerateRequest());
  auto r = valid();
  r.mutable_groups(0)->clear_prompt_token_ids();
  add("empty prompt", r);
  r = valid();
  r.mutable_groups(0)->set_prompt_token_ids(1, 5000);
  add("token id out of range", r);
  r = valid();
  r.mutable_groups(0)->set_group_size(0);
  add("G = 0", r);
  r = valid();
  r.mutable_groups(0)->set_group_size(1 << 30);
  add("huge G", r);
  r = valid();
  r.mutable_groups(0)->mutable_sampling()->set_max_new_tokens(100000);
  add("max tokens beyond the context", r);
  r = valid();
  r.mutable_groups(0)->mutable_sampling()->set_max_new_tokens(0);
  add("no max tokens", r);
  r = valid();
  r.mutable_groups(0)->mutable_sampling()->set_stop_string_mode(static_cast<v1::StopStringMode>(7));
  add("unknown stop mode", r);
  r = valid();
  r.mutable_groups(0)->mutable_sampling()->add_stop_strings("</answer>");
  add("stop strings without a tokenizer", r);
  r = valid();
  r.mutable_groups(0)->mutable_sampling()->set_temperature(-1);
  add("negative temperature", r);
  for (size_t i = 0; i < bad.size(); ++i) {
    grpc::Status st = call(bad[i]);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what[i];
    EXPECT_FALSE(st.error_message().empty()) << what[i];
  }
  EXPECT_TRUE(call(valid()).ok());
  expect_drained();
}

TEST_F(ServiceTest, CancellingAStreamFreesItsBlocks) {
  for (auto* c : {client_.get()}) {
    int seen = 0;
    // The short group finishes first; stopping there cancels the long one mid-generation.
    absl::Status st = c->generate({group(4, 1, 2), group(6, 8, 1500)}, [&](Completion&& done) {
      ++seen;
      EXPECT_EQ(done.group, 0);
      return false;
    });
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_EQ(seen, 1);
    expect_drained();
  }
  // The same semantics in process.
  auto m = load();
  EngineOptions eo;
  eo.num_blocks = 256;
  Engine engine(*m, eo);
  int seen = 0;
  EXPECT_TRUE(make_local_client(engine)
                  ->generate({group(4, 1, 2), group(6, 8, 1500)},
                             [&](Completion&&) {
                               ++seen;
                               return false;
                             })
                  .ok());
  EXPECT_EQ(seen, 1);
  EXPECT_EQ(engine.stats().blocks_in_use, 0);
  EXPECT_EQ(engine.stats().running, 0);
}

TEST_F(ServiceTest, UpdateWeightsStreamsANewVersion) {
  // lm_head scaled by 3, sent as bf16.
  core::Tensor head = served_->params().get("lm_head.weight").clone();
  for (int64_t i = 0; i < head.numel(); ++i) head.f32()[i] *= 3.0f;
  core::Tensor head_bf16 = head.to(core::DType::kBF16);
  std::vector<NamedTensor> update = {{"lm_head.weight", head_bf16}};
  ASSERT_TRUE(client_->update_weights(1, update).ok());
  auto h = client_->health();
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->policy_version, 1);

  auto local_model = load();
  EngineOptions eo;
  eo.num_blocks = 256;
  Engine engine(*local_model, eo);
  auto local = make_local_client(engine);
  ASSERT_TRUE(local->update_weights(1, update).ok());
  std::vector<GroupRequest> groups = {group(2, 2, 6, 0.7f)};
  auto a = client_->generate_all(groups);
  auto b = local->generate_all(groups);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)[0].policy_version, 1);
  EXPECT_EQ((*a)[0].tokens, (*b)[0].tokens);
  EXPECT_EQ((*a)[1].logprobs, (*b)[1].logprobs);

  // Errors change nothing.
  EXPECT_EQ(client_->update_weights(1, update).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(client_->update_weights(2, {{"model.no_such.weight", head}}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->update_weights(2, {{"lm_head.weight", head.slice(0, 0, 3).clone()}}).code(),
            absl::StatusCode::kInvalidArgument);
  core::Tensor nan = head.clone();
  nan.f32()[5] = std::nanf("");
  EXPECT_EQ(client_->update_weights(2, {{"lm_head.weight", nan}}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->health()->policy_version, 1);
  auto again = client_->generate_all(groups);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)[0].tokens, (*a)[0].tokens);
  // A version bump without tensors (weights already in place).
  ASSERT_TRUE(client_->update_weights(2, {}).ok());
  EXPECT_EQ(client_->health()->policy_version, 2);
}

TEST_F(ServiceTest, LargeTensorsArriveInChunks) {
  // 1 MiB of embedding in 64 KiB chunks, interleaved with another tensor's single chunk.
  core::Tensor emb = served_->params().get("model.embed_tokens.weight").clone();
  emb.f32()[0] += 1.0f;
  emb.f32()[emb.numel() - 1] -= 1.0f;
  core::Tensor norm = served_->params().get("model.norm.weight").clone();
  auto chunky = make_grpc_client(target_, 64 << 10);
  ASSERT_TRUE(chunky->update_weights(1, {{"model.embed_tokens.weight", emb}, {"model.norm.weight", norm}}).ok());
  core::Tensor now = be_->download(served_->params().get("model.embed_tokens.weight"));
  EXPECT_EQ(now.f32()[0], emb.f32()[0]);
  EXPECT_EQ(now.f32()[emb.numel() - 1], emb.f32()[emb.numel() - 1]);
}

// Every weight path a trainer can take: the engine's own model (nothing moves), another model on the
// same backend (one copy), a model elsewhere (host tensors), a gRPC worker (streamed; a weight group is
// refused on the CPU and publishing falls back).
TEST_F(ServiceTest, PublishWeightsTakesTheFastestPathAndEveryPathDelivers) {
  auto policy = load();
  core::Tensor head = policy->params().get("lm_head.weight");
  core::Tensor scaled = be_->download(head);
  for (int64_t i = 0; i < scaled.numel(); ++i) scaled.f32()[i] *= 2.0f;
  be_->upload(scaled, head);
  auto head_of = [&](const model::Model& m) { return m.backend().download(m.params().get("lm_head.weight")); };
  auto same = [](const core::Tensor& a, const core::Tensor& b) {
    return a.numel() == b.numel() && std::memcmp(a.raw(), b.raw(), a.numel() * sizeof(float)) == 0;
  };

  EngineOptions eo;
  eo.num_blocks = 64;
  Engine own(*policy, eo);
  auto shared = make_local_client(own);
  EXPECT_EQ(shared->weight_path(*policy), "shared");
  ASSERT_TRUE(shared->publish_weights(1, *policy).ok());
  EXPECT_EQ(shared->health()->policy_version, 1);
  EXPECT_EQ(shared->publish_weights(1, *policy).code(), absl::StatusCode::kFailedPrecondition);

  auto sibling = load();
  Engine beside(*sibling, eo);
  auto copied = make_local_client(beside);
  EXPECT_EQ(copied->weight_path(*policy), "copy");
  EXPECT_FALSE(same(head_of(*sibling), scaled));
  ASSERT_TRUE(copied->publish_weights(1, *policy).ok());
  EXPECT_TRUE(same(head_of(*sibling), scaled));

  auto other_be = core::make_cpu_backend();
  auto elsewhere = model::Model::load(testing::fixtures_dir() + "/tiny_a", *other_be);
  ASSERT_TRUE(elsewhere.ok());
  Engine far(**elsewhere, eo);
  auto hosted = make_local_client(far);
  EXPECT_EQ(hosted->weight_path(*policy), "host");
  ASSERT_TRUE(hosted->publish_weights(3, *policy).ok());
  EXPECT_TRUE(same(head_of(**elsewhere), scaled));
  EXPECT_EQ(hosted->join_weight_group(*policy).code(), absl::StatusCode::kFailedPrecondition);

  // A worker: no weight group from the CPU, and the gRPC stream delivers instead.
  const absl::Status joined = client_->join_weight_group(*policy);
  EXPECT_EQ(joined.code(), absl::StatusCode::kFailedPrecondition) << joined;
  EXPECT_EQ(client_->weight_path(*policy), "grpc");
  ASSERT_TRUE(client_->publish_weights(4, *policy).ok());
  EXPECT_EQ(client_->health()->policy_version, 4);
  EXPECT_TRUE(same(head_of(*served_), scaled));
}

// The weight-group calls on a CPU worker: malformed requests and calls out of order get clear errors,
// and the worker keeps serving.
TEST_F(ServiceTest, WeightGroupCallsFailCleanlyWhereNoGroupCanBe) {
  auto stub = v1::Rollout::NewStub(grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()));
  const auto join = [&](const std::string& id, int rank, grpc::StatusCode want) {
    grpc::ClientContext ctx;
    v1::JoinWeightGroupRequest req;
    req.set_group_id(id);
    req.set_rank(rank);
    req.set_world_size(2);
    req.set_timeout_seconds(5);
    v1::JoinWeightGroupResponse resp;
    const grpc::Status st = stub->JoinWeightGroup(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), want) << st.error_message();
  };
  join("", 0, grpc::StatusCode::INVALID_ARGUMENT);                           // rank 0 is the trainer's
  join(std::string(128, 'x'), 1, grpc::StatusCode::FAILED_PRECONDITION);  // a CPU worker
  {
    grpc::ClientContext ctx;
    v1::BroadcastWeightsRequest req;
    req.set_version(1);
    req.set_layout(served_->params().fingerprint());
    req.set_dtype(v1::DTYPE_F32);
    req.set_numel(served_->params().numel());
    auto reader = stub->BroadcastWeights(&ctx, req);
    v1::BroadcastWeightsResponse resp;
    EXPECT_FALSE(reader->Read(&resp));
    const grpc::Status st = reader->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
    EXPECT_NE(st.error_message().find("JoinWeightGroup"), std::string::npos) << st.error_message();
  }
  EXPECT_EQ(client_->health()->policy_version, 0);
  auto c = client_->generate_all({group(3, 1, 4)});
  ASSERT_TRUE(c.ok()) << c.status();
}

TEST(ParameterSetTest, FingerprintNamesTheLayout) {
  auto be = core::make_cpu_backend();
  auto a = model::ModelConfig::from_file(testing::fixtures_dir() + "/tiny_a/config.json");
  ASSERT_TRUE(a.ok());
  model::ModelConfig b = *a;
  b.num_hidden_layers += 1;
  const model::ParameterSet pa(*a, *be), pa2(*a, *be), pb(b, *be);
  EXPECT_EQ(pa.fingerprint(), pa2.fingerprint());
  EXPECT_NE(pa.fingerprint(), pb.fingerprint());
  EXPECT_EQ(pa.fingerprint().substr(0, pa.fingerprint().find(':')), std::to_string(pa.infos().size()));
}

}  // namespace
}  // namespace r1lab::rollout
