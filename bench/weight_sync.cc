// Publishing a new policy version to a rollout worker: the trainer's weights to the host
// (run::weight_tensors), then to the worker either in process (the local client: check and copy) or over
// gRPC on loopback to a worker in this process (what `r1lab run` does with its child), beside a plain
// memcpy of the same bytes (the floor, measured in the same run). Best of --repeat.
// Usage: weight_sync [--config CONFIG.json] [--device cpu|cuda] [--repeat 3] [--chunk-mb 4]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/device.h"
#include "model/model.h"
#include "rollout/client.h"
#include "rollout/service.h"
#include "run/rl.h"

namespace {

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int fail(const absl::Status& s) {
  std::fprintf(stderr, "weight_sync: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config = "../shared/bench/bench_moe_mla_0.5b.json", device = "cpu";
  int repeat = 3;
  size_t chunk_mb = 4;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--config")) config = argv[i + 1];
    else if (!std::strcmp(argv[i], "--device")) device = argv[i + 1];
    else if (!std::strcmp(argv[i], "--repeat")) repeat = std::max(1, std::atoi(argv[i + 1]));
    else if (!std::strcmp(argv[i], "--chunk-mb")) chunk_mb = static_cast<size_t>(std::max(1, std::atoi(argv[i + 1])));
    else return fail(absl::InvalidArgumentError(std::string("unknown flag ") + argv[i]));
  }
  auto cfg = r1lab::model::ModelConfig::from_file(config);
  if (!cfg.ok()) return fail(cfg.status());
  auto be_trainer = r1lab::core::make_backend(device, "f32");
  if (!be_trainer.ok()) return fail(be_trainer.status());
  auto be_worker = r1lab::core::make_backend(device, "f32");
  if (!be_worker.ok()) return fail(be_worker.status());
  r1lab::model::Model policy(*cfg, **be_trainer), served(*cfg, **be_worker);
  policy.init_random(1, 0.02f);
  const double bytes = static_cast<double>(policy.params().buffer().numel()) * 4;

  r1lab::rollout::ServerOptions so;
  so.port = 0;
  so.engine.cache_bytes = 16 << 20;
  auto server = r1lab::rollout::start_rollout_server(served, nullptr, "", so);
  if (!server.ok()) return fail(server.status());
  auto grpc = r1lab::rollout::make_grpc_client("127.0.0.1:" + std::to_string((*server)->port()), chunk_mb << 20);
  r1lab::rollout::Engine local_engine(served, {});
  auto local = r1lab::rollout::make_local_client(local_engine);

  std::vector<char> src(static_cast<size_t>(bytes)), dst(static_cast<size_t>(bytes));
  std::memset(src.data(), 1, src.size());
  std::memset(dst.data(), 2, dst.size());
  double t_copy = 1e30, t_host = 1e30, t_local = 1e30, t_grpc = 1e30;
  int64_t version = 0;
  for (int r = 0; r < repeat; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    std::memcpy(dst.data(), src.data(), src.size());
    t_copy = std::min(t_copy, seconds(t0));
    t0 = std::chrono::steady_clock::now();
    const auto tensors = r1lab::run::weight_tensors(policy);
    t_host = std::min(t_host, seconds(t0));
    t0 = std::chrono::steady_clock::now();
    if (auto s = local->update_weights(++version, tensors); !s.ok()) return fail(s);
    t_local = std::min(t_local, seconds(t0));
    t0 = std::chrono::steady_clock::now();
    if (auto s = grpc->update_weights(version, tensors); !s.ok()) return fail(s);
    t_grpc = std::min(t_grpc, seconds(t0));
  }
  (*server)->shutdown();
  std::printf("weights: %s, %.1f M parameters, %.1f MB f32, device %s, best of %d\n\n", config.c_str(),
              bytes / 4e6, bytes / 1e6, device.c_str(), repeat);
  std::printf("| %-44s | %10s | %8s | %10s |\n", "path", "ms", "GB/s", "x memcpy");
  std::printf("|%s|%s|%s|%s|\n", std::string(46, '-').c_str(), std::string(12, '-').c_str(),
              std::string(10, '-').c_str(), std::string(12, '-').c_str());
  auto row = [&](const char* name, double t) {
    std::printf("| %-44s | %10.2f | %8.2f | %10.1f |\n", name, 1e3 * t, bytes / t / 1e9, t / t_copy);
  };
  row("memcpy of the same bytes (floor)", t_copy);
  row("trainer weights to host tensors", t_host);
  row("host tensors to the worker, in process", t_local);
  row("host tensors to the worker, gRPC on loopback", t_grpc);
  return 0;
}
