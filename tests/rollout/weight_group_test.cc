// Weights by NCCL broadcast from a trainer's GPU to a rollout worker's (a gRPC worker in this process on
// a second GPU): what arrives equals what was sent, bit for bit; a refused broadcast leaves the group
// usable; two members on one GPU get an error, not a hang. Skipped, with the reason, without the GPUs.
#include <chrono>
#include <cstring>
#include <thread>

#include "core/comm.h"
#include "core/cuda/cuda.h"
#include "core/device.h"
#include "gtest/gtest.h"
#include "rollout/client.h"
#include "rollout/service.h"
#include "tests/test_util.h"

namespace r1lab::rollout {
namespace {

std::unique_ptr<core::Backend> backend_or_skip(const std::string& device, std::string* why) {
  if (!core::comm_available(why)) return nullptr;
  auto be = core::make_backend(device, "f32");
  if (!be.ok()) {
    *why = std::string(be.status().message());
    return nullptr;
  }
  return std::move(*be);
}

std::unique_ptr<model::Model> load(core::Backend& be) {
  auto m = model::Model::load(testing::fixtures_dir() + "/tiny_a", be);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// A trainer's model on trainer_device and a gRPC worker in this process serving another copy on
// worker_device; ready() is false (with why) where this machine cannot have both.
struct Pair {
  Pair(const std::string& trainer_device, const std::string& worker_device) {
    trainer_be = backend_or_skip(trainer_device, &why);
    worker_be = trainer_be ? backend_or_skip(worker_device, &why) : nullptr;
    if (!worker_be) return;
    policy = load(*trainer_be);
    served = load(*worker_be);
    if (!policy || !served) return;
    so.port = 0;
    so.engine.num_blocks = 64;
    auto started = start_rollout_server(*served, nullptr, "tiny_a", so);
    EXPECT_TRUE(started.ok()) << started.status();
    if (!started.ok()) return;
    server = *std::move(started);
    target = "127.0.0.1:" + std::to_string(server->port());
    client = make_grpc_client(target);
  }
  ~Pair() {
    if (server) server->shutdown();
  }
  bool ready() const { return client != nullptr; }

  std::string why;
  std::unique_ptr<core::Backend> trainer_be, worker_be;
  std::unique_ptr<model::Model> policy, served;
  ServerOptions so;
  std::unique_ptr<RolloutServer> server;
  std::string target;
  std::unique_ptr<RolloutClient> client;
};

bool same_weights(const model::Model& a, const model::Model& b) {
  const core::Tensor x = a.backend().download(a.params().buffer()), y = b.backend().download(b.params().buffer());
  return x.numel() == y.numel() && std::memcmp(x.raw(), y.raw(), x.numel() * sizeof(float)) == 0;
}

TEST(WeightGroupTest, BroadcastToAWorkerOnAnotherGpu) {
  Pair p("cuda:0", "cuda:1");
  if (!p.worker_be) GTEST_SKIP() << "needs NCCL and two GPUs: " << p.why;
  ASSERT_TRUE(p.ready());
  auto [trainer_be, policy, served, so, client] = std::tie(p.trainer_be, p.policy, p.served, p.so, p.client);
  // The trainer's weights move away from the checkpoint both started from.
  core::Tensor w = trainer_be->download(policy->params().buffer());
  for (int64_t i = 0; i < w.numel(); i += 7) w.f32()[i] *= -1.5f;
  core::Tensor buf = policy->params().buffer();
  trainer_be->upload(w, buf);
  ASSERT_FALSE(same_weights(*policy, *served));

  const absl::Status joined = client->join_weight_group(*policy, 60);
  ASSERT_TRUE(joined.ok()) << joined;
  EXPECT_EQ(client->weight_path(*policy), "nccl");

  // The worker keeps sampling from another thread while versions arrive.
  std::atomic<bool> done{false};
  std::atomic<int> sampled{0};
  std::thread sampler([&] {
    auto other = make_grpc_client(p.target);
    while (!done) {
      GroupRequest g;
      g.prompt = {3, 17, 29};
      g.num_samples = 2;
      g.params.max_new_tokens = 8;
      if (other->generate_all({g}).ok()) ++sampled;
    }
  });
  ASSERT_TRUE(client->publish_weights(1, *policy).ok());
  EXPECT_TRUE(same_weights(*policy, *served));
  EXPECT_EQ(client->health()->policy_version, 1);

  // A refusal (the version is not newer) comes before the transfer and leaves the group usable.
  const absl::Status stale = client->publish_weights(1, *policy);
  EXPECT_EQ(stale.code(), absl::StatusCode::kFailedPrecondition) << stale;
  EXPECT_EQ(client->weight_path(*policy), "nccl");
  for (int64_t i = 0; i < w.numel(); i += 11) w.f32()[i] += 0.25f;
  trainer_be->upload(w, buf);
  ASSERT_TRUE(client->publish_weights(2, *policy).ok());
  EXPECT_TRUE(same_weights(*policy, *served));
  done = true;
  sampler.join();
  EXPECT_GT(sampled.load(), 0);

  // Completions sampled on the worker equal those of an engine over the trainer's own model.
  Engine local(*policy, so.engine);
  auto here = make_local_client(local);
  ASSERT_TRUE(here->publish_weights(2, *policy).ok());
  GroupRequest g;
  g.prompt = {5, 9, 2, 44};
  g.num_samples = 3;
  g.params.max_new_tokens = 12;
  g.params.seed = 7;
  auto a = client->generate_all({g});
  auto b = here->generate_all({g});
  ASSERT_TRUE(a.ok() && b.ok());
  for (size_t i = 0; i < a->size(); ++i) {
    EXPECT_EQ((*a)[i].tokens, (*b)[i].tokens);
    EXPECT_EQ((*a)[i].policy_version, 2);
  }
}

TEST(WeightGroupTest, TwoMembersOnOneGpuGetAnErrorNotAHang) {
  Pair p("cuda:0", "cuda:0");
  if (!p.worker_be) GTEST_SKIP() << "needs NCCL and a GPU: " << p.why;
  ASSERT_TRUE(p.ready());
  auto [policy, served, client] = std::tie(p.policy, p.served, p.client);
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status joined = client->join_weight_group(*policy, 20);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_FALSE(joined.ok());
  EXPECT_LT(took, 40) << joined;
  std::printf("two members on one GPU: %s (%.1f s)\n", std::string(joined.message()).c_str(), took);
  // Publishing still works, by gRPC.
  EXPECT_EQ(client->weight_path(*policy), "grpc");
  ASSERT_TRUE(client->publish_weights(1, *policy).ok());
  EXPECT_TRUE(same_weights(*policy, *served));
}

}  // namespace
}  // namespace r1lab::rollout
