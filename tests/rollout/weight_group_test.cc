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

bool same_weights(const model::Model& a, const model::Model& b) {
  const core::Tensor x = a.backend().download(a.params().buffer()), y = b.backend().download(b.params().buffer());
  return x.numel() == y.numel() && std::memcmp(x.raw(), y.raw(), x.numel() * sizeof(float)) == 0;
}

TEST(WeightGroupTest, BroadcastToAWorkerOnAnotherGpu) {
  std::string why;
  auto trainer_be = backend_or_skip("cuda:0", &why);
  auto worker_be = trainer_be ? backend_or_skip("cuda:1", &why) : nullptr;
  if (!worker_be) GTEST_SKIP() << "needs NCCL and two GPUs: " << why;
  auto policy = load(*trainer_be);
  auto served = load(*worker_be);
  ASSERT_TRUE(policy && served);
  // The trainer's weights move away from the checkpoint both started from.
  core::Tensor w = trainer_be->download(policy->params().buffer());
  for (int64_t i = 0; i < w.numel(); i += 7) w.f32()[i] *= -1.5f;
  core::Tensor buf = policy->params().buffer();
  trainer_be->upload(w, buf);
  ASSERT_FALSE(same_weights(*policy, *served));

  ServerOptions so;
  so.port = 0;
  so.engine.num_blocks = 64;
  auto server = start_rollout_server(*served, nullptr, "tiny_a", so);
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = make_grpc_client("127.0.0.1:" + std::to_string((*server)->port()));
  const absl::Status joined = client->join_weight_group(*policy, 60);
  ASSERT_TRUE(joined.ok()) << joined;
  EXPECT_EQ(client->weight_path(*policy), "nccl");

  // The worker keeps sampling from another thread while versions arrive.
  std::atomic<bool> done{false};
  std::atomic<int> sampled{0};
  std::thread sampler([&] {
    auto other = make_grpc_client("127.0.0.1:" + std::to_string((*server)->port()));
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
  (*server)->shutdown();
}

TEST(WeightGroupTest, TwoMembersOnOneGpuGetAnErrorNotAHang) {
  std::string why;
  auto trainer_be = backend_or_skip("cuda:0", &why);
  auto worker_be = trainer_be ? backend_or_skip("cuda:0", &why) : nullptr;
  if (!worker_be) GTEST_SKIP() << "needs NCCL and a GPU: " << why;
  auto policy = load(*trainer_be);
  auto served = load(*worker_be);
  ASSERT_TRUE(policy && served);
  ServerOptions so;
  so.port = 0;
  so.engine.num_blocks = 64;
  auto server = start_rollout_server(*served, nullptr, "tiny_a", so);
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = make_grpc_client("127.0.0.1:" + std::to_string((*server)->port()));
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
  (*server)->shutdown();
}

}  // namespace
}  // namespace r1lab::rollout
