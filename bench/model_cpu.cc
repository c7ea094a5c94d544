// CPU reference backend figures for a model directory (default: the tiny_a fixture):
//   - forward and forward+backward time of one batch,
// Decoding speed is bench/rollout_cpu's. Usage: model_cpu [MODEL_DIR] [--batch B] [--seq T]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/backend.h"
#include "model/model.h"

namespace {

using r1lab::core::Tensor;
using r1lab::model::ModelConfig;

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <typename F>
double best_of(int n, F f) {
  double best = 1e30;
  for (int i = 0; i < n; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, seconds(t0));
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "../shared/fixtures/hf_deepseek_v3/tiny_a";
  int64_t batch = 2, seq = 24;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--batch") && i + 1 < argc) batch = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--seq") && i + 1 < argc) seq = std::atoll(argv[++i]);
    else dir = argv[i];
  }
  auto be = r1lab::core::make_cpu_backend();
  auto loaded = r1lab::model::Model::load(dir, *be);
  if (!loaded.ok()) {
    std::fprintf(stderr, "model_cpu: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  r1lab::model::Model& m = **loaded;
  const ModelConfig& c = m.config();
  Tensor ids = Tensor::zeros({batch, seq}, r1lab::core::DType::kI32);
  for (int64_t i = 0; i < batch * seq; ++i) ids.data<int32_t>()[i] = static_cast<int32_t>((i * 7919) % c.vocab_size);

  const double fwd = best_of(5, [&] { m.forward(ids); });
  const double fwd_bwd = best_of(3, [&] {
    r1lab::model::ForwardState st;
    Tensor logits = m.forward(ids, &st);
    m.zero_grads();
    m.backward(st, logits);  // any upstream gradient: the cost is the same
  });
  std::printf("model %s on %s: batch %lld x %lld tokens\n\n", dir.c_str(), be->name().c_str(),
              static_cast<long long>(batch), static_cast<long long>(seq));
  std::printf("| step | ms | tokens/s |\n|---|---|---|\n");
  std::printf("| forward | %.2f | %.0f |\n", fwd * 1e3, batch * seq / fwd);
  std::printf("| forward + backward | %.2f | %.0f |\n\n", fwd_bwd * 1e3, batch * seq / fwd_bwd);

  return 0;
}
