// Publishing a new policy version to a rollout worker (RolloutClient::publish_weights), by every path
// there is, for the benchmark model:
//  - in process, the engine over the trainer's own model (colocated: nothing moves);
//  - in process, another model on the same backend (one device copy);
//  - through host tensors: the trainer's weights to the host, then to an in-process engine, or over
//    gRPC on loopback to a worker in this process (what `r1lab run` does with its child);
//  - by NCCL broadcast to a worker on another GPU (a gRPC worker in this process on --worker-device,
//    joined to the trainer's weight group), where the machine has a second GPU.
// Beside two floors measured in the same run: a host memcpy of the same bytes and a device-to-device
// copy of the parameter buffer. Best of --repeat.
// Usage: weight_sync [--config CONFIG.json] [--device cpu|cuda] [--worker-device cuda:1] [--repeat 3] [--chunk-mb 4]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/device.h"
#include "model/model.h"
#include "rollout/client.h"
#include "rollout/service.h"

namespace {

using r1lab::model::Model;
using r1lab::rollout::RolloutClient;

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int fail(const absl::Status& s) {
  std::fprintf(stderr, "weight_sync: %s\n", std::string(s.message()).c_str());
  return 1;
}

// Best time of `repeat` runs of f (an error ends the run).
absl::StatusOr<double> best_of(int repeat, const std::function<absl::Status()>& f) {
  double best = 1e30;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    if (absl::Status s = f(); !s.ok()) return s;
    best = std::min(best, seconds(t0));
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config = "../shared/bench/bench_moe_mla_0.5b.json", device = "cpu", worker_device = "cuda:1";
  int repeat = 3;
  size_t chunk_mb = 4;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--config"))
      config = argv[i + 1];
    else if (!std::strcmp(argv[i], "--device"))
      device = argv[i + 1];
    else if (!std::strcmp(argv[i], "--worker-device"))
      worker_device = argv[i + 1];
    else if (!std::strcmp(argv[i], "--repeat"))
      repeat = std::max(1, std::atoi(argv[i + 1]));
    else if (!std::strcmp(argv[i], "--chunk-mb"))
      chunk_mb = static_cast<size_t>(std::max(1, std::atoi(argv[i + 1])));
    else
      return fail(absl::InvalidArgumentError(std::string("unknown flag ") + argv[i]));
  }
  auto cfg = r1lab::model::ModelConfig::from_file(config);
  if (!cfg.ok()) return fail(cfg.status());
  auto be_trainer = r1lab::core::make_backend(device, "f32");
  if (!be_trainer.ok()) return fail(be_trainer.status());
  auto be_worker = r1lab::core::make_backend(device, "f32");
  if (!be_worker.ok()) return fail(be_worker.status());
  Model policy(*cfg, **be_trainer), served(*cfg, **be_worker), sibling(*cfg, **be_trainer);
  policy.init_random(1, 0.02f);
  const double bytes = static_cast<double>(policy.params().buffer().numel()) * 4;

  struct Row {
    std::string name;
    double t = -1;  // < 0: not measured (why)
    std::string why;
    bool moves = true;  // false: nothing is copied (no bandwidth to show)
  };
  std::vector<Row> rows;
  auto measure = [&](const std::string& name, const std::function<absl::Status()>& f) {
    auto t = best_of(repeat, f);
    rows.push_back({name, t.ok() ? *t : -1, t.ok() ? "" : std::string(t.status().message())});
  };
  int64_t version = 0;

  std::vector<char> src(static_cast<size_t>(bytes)), dst(static_cast<size_t>(bytes));
  std::memset(src.data(), 1, src.size());
  std::memset(dst.data(), 2, dst.size());
  measure("memcpy of the same bytes, host (floor)", [&] {
    std::memcpy(dst.data(), src.data(), src.size());
    return absl::OkStatus();
  });
  const double t_copy = rows.back().t;
  if (device != "cpu") {
    measure("copy of the parameter buffer, device (floor)", [&] {
      r1lab::core::Tensor to = sibling.params().buffer();
      policy.backend().copy(policy.params().buffer(), to);
      policy.backend().synchronize();
      return absl::OkStatus();
    });
  }

  // In process.
  r1lab::rollout::EngineOptions eo;
  eo.cache_bytes = 16 << 20;
  r1lab::rollout::Engine colocated(policy, eo), beside(sibling, eo), other(served, eo);
  auto shared = r1lab::rollout::make_local_client(colocated);
  auto copied = r1lab::rollout::make_local_client(beside);
  auto hosted = r1lab::rollout::make_local_client(other);
  measure("in process, the engine over the trainer's model (" + shared->weight_path(policy) + ")",
          [&] { return shared->publish_weights(++version, policy); });
  rows.back().moves = false;
  measure("in process, another model on the trainer's backend (" + copied->weight_path(policy) + ")", [&] {
    if (absl::Status s = copied->publish_weights(++version, policy); !s.ok()) return s;
    sibling.backend().synchronize();
    return absl::OkStatus();
  });
  std::vector<r1lab::rollout::NamedTensor> tensors;
  measure("trainer weights to host tensors", [&] {
    tensors = r1lab::rollout::weight_tensors(policy);
    return absl::OkStatus();
  });
  measure("host tensors to an in-process engine on another backend", [&] {
    if (absl::Status s = hosted->update_weights(++version, tensors); !s.ok()) return s;
    served.backend().synchronize();
    return absl::OkStatus();
  });

  // A gRPC worker on loopback (in this process), on the trainer's device.
  r1lab::rollout::ServerOptions so;
  so.port = 0;
  so.engine.cache_bytes = 16 << 20;
  {
    auto server = r1lab::rollout::start_rollout_server(served, nullptr, "", so);
    if (!server.ok()) return fail(server.status());
    auto grpc = r1lab::rollout::make_grpc_client("127.0.0.1:" + std::to_string((*server)->port()), chunk_mb << 20);
    const int64_t base = 1000;
    version = base;
    measure("gRPC worker on loopback: host tensors streamed (" + grpc->weight_path(policy) + ", whole publish)",
            [&] { return grpc->publish_weights(++version, policy); });
    (*server)->shutdown();
  }

  // A gRPC worker on a second GPU, weights by NCCL.
  if (device != "cpu") {
    auto be_far = r1lab::core::make_backend(worker_device, "f32");
    if (!be_far.ok()) {
      rows.push_back({"NCCL broadcast to a worker on " + worker_device, -1, std::string(be_far.status().message())});
    } else {
      Model far(*cfg, **be_far);
      auto server = r1lab::rollout::start_rollout_server(far, nullptr, "", so);
      if (!server.ok()) return fail(server.status());
      auto grpc = r1lab::rollout::make_grpc_client("127.0.0.1:" + std::to_string((*server)->port()), chunk_mb << 20);
      version = 2000;
      const auto t0 = std::chrono::steady_clock::now();
      absl::Status joined = grpc->join_weight_group(policy);
      const double t_join = seconds(t0);
      if (!joined.ok()) {
        rows.push_back({"NCCL broadcast to a worker on " + worker_device, -1, std::string(joined.message())});
      } else {
        std::printf("weight group: joined in %.0f ms (once per worker)\n", 1e3 * t_join);
        measure("gRPC worker on " + worker_device + ": NCCL broadcast (" + grpc->weight_path(policy) + ")",
                [&] { return grpc->publish_weights(++version, policy); });
        // What arrived is what was sent: the worker's buffer, bit for bit.
        const r1lab::core::Tensor a = policy.backend().download(policy.params().buffer());
        const r1lab::core::Tensor b = far.backend().download(far.params().buffer());
        if (std::memcmp(a.raw(), b.raw(), static_cast<size_t>(bytes)) != 0)
          return fail(absl::DataLossError("the worker's weights differ from the trainer's after the broadcast"));
        std::printf("weight group: the worker's %.0f MB equal the trainer's, bit for bit\n", bytes / 1e6);
      }
      (*server)->shutdown();
    }
  }

  std::printf("weights: %s, %.1f M parameters, %.1f MB f32, trainer on %s, best of %d\n\n", config.c_str(), bytes / 4e6,
              bytes / 1e6, policy.backend().name().c_str(), repeat);
  std::printf("| %-78s | %10s | %8s | %10s |\n", "path", "ms", "GB/s", "x memcpy");
  std::printf("|%s|%s|%s|%s|\n", std::string(80, '-').c_str(), std::string(12, '-').c_str(),
              std::string(10, '-').c_str(), std::string(12, '-').c_str());
  for (const Row& r : rows) {
    if (r.t < 0) {
      std::printf("| %-78s | %10s | %8s | %10s |\n", r.name.c_str(), "n/a", "", "");
      std::printf("|   (%s)\n", r.why.c_str());
    } else {
      char gbs[32] = "-";
      if (r.moves) std::snprintf(gbs, sizeof gbs, "%.1f", bytes / std::max(r.t, 1e-9) / 1e9);
      std::printf("| %-78s | %10.3f | %8s | %10.4f |\n", r.name.c_str(), 1e3 * r.t, gbs, r.t / t_copy);
    }
  }
  return 0;
}
