// What a kernel costs in a decode step's CUDA graph. First, how fast blocks stream an MoE layer's expert
// weights (64 MB) into shared memory by each way of loading them (bench/small_products_kernels.cu): the
// ceiling for the experts' products. Then chains of a small elementwise kernel, alone
// and between cuBLAS products, with and without programmatic dependent launch (PDL): the price of a
// kernel boundary. Then the step's dense products (few rows, a bf16 weight each): cublasGemmEx's default
// choice, the same with k split in 2 or 4 parts as one strided batch (partial sums a plane each, which
// the kernel after the product would add), and every algorithm cuBLASLt's heuristic offers for the
// shape (the heuristic's first, the
// fastest, its split-k and waves), each timed in a graph of back-to-back calls that cycle through enough
// copies of the weight to miss L2, as a decode step reads each weight once. Shapes from the model
// config, at the rows given.
// Usage: small_products --config CONFIG.json [--rows 64,256] [--candidates 24] [--streams] [--products]
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "core/cuda/cuda.h"
#include "core/cuda/cuda_backend.h"  // CUDA_CHECK, CUBLAS_CHECK
#include "model/config.h"

ABSL_FLAG(std::string, config, "", "a Hugging Face DeepseekV3 config.json");
ABSL_FLAG(std::vector<std::string>, rows, std::vector<std::string>({"64", "256"}), "rows (tokens) of the products");
ABSL_FLAG(int, candidates, 24, "cuBLASLt heuristic results to time");
ABSL_FLAG(bool, streams, true, "time the ways a block streams weights into shared memory");
ABSL_FLAG(bool, products, true, "time the kernel chains and the dense products");

namespace {

struct Shape {
  std::string name;
  int64_t n, k;
};

// Milliseconds a call of `run(i)` (i: the weight copy), as the mean over a graph of `calls` calls
// replayed `reps` times.
template <typename F>
double time_graph(cudaStream_t s, int calls, F&& run) {
  cudaGraph_t g;
  cudaGraphExec_t e;
  CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) run(i);
  CUDA_CHECK(cudaStreamEndCapture(s, &g));
  CUDA_CHECK(cudaGraphInstantiate(&e, g, 0));
  CUDA_CHECK(cudaGraphLaunch(e, s));  // warm
  CUDA_CHECK(cudaStreamSynchronize(s));
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  constexpr int kReps = 10;
  CUDA_CHECK(cudaEventRecord(a, s));
  for (int r = 0; r < kReps; ++r) CUDA_CHECK(cudaGraphLaunch(e, s));
  CUDA_CHECK(cudaEventRecord(b, s));
  CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  cudaGraphExecDestroy(e);
  cudaGraphDestroy(g);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / (kReps * calls);
}

}  // namespace

// bench/small_products_kernels.cu
void launch_bump(cudaStream_t s, bool pdl, const float* x, float* y, int n);
int stream_variants();
void launch_stream_variant(int v, cudaStream_t s, const unsigned char* w, int64_t rows, unsigned* out,
                           const char** name);

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::string why;
  if (!r1lab::core::cuda::available(&why)) {
    std::printf("small_products: no GPU (%s)\n", why.c_str());
    return 0;
  }
  const auto cfg_or = r1lab::model::ModelConfig::from_file(absl::GetFlag(FLAGS_config));
  if (!cfg_or.ok()) {
    std::fprintf(stderr, "%s\n", std::string(cfg_or.status().message()).c_str());
    return 1;
  }
  const auto& cfg = *cfg_or;
  const int64_t h = cfg.hidden_size, heads = cfg.num_attention_heads;
  std::vector<Shape> shapes = {
      {"q + kv_a", heads * cfg.qk_head_dim() + cfg.kv_lora_rank + cfg.qk_rope_head_dim, h},
      {"o_proj", h, heads * cfg.v_head_dim},
      {"shared gate_up", 2 * cfg.moe_intermediate_size * cfg.n_shared_experts, h},
      {"shared down", h, cfg.moe_intermediate_size * cfg.n_shared_experts},
      {"dense gate_up", 2 * cfg.intermediate_size, h},
      {"dense down", h, cfg.intermediate_size},
      {"router", cfg.n_routed_experts, h},
      {"lm head", cfg.vocab_size, h},
  };
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cublasHandle_t blas;
  cublasLtHandle_t lt;
  CUBLAS_CHECK(cublasCreate(&blas));
  CUBLAS_CHECK(cublasSetStream(blas, s));
  CUBLAS_CHECK(cublasLtCreate(&lt));
  constexpr size_t kWorkspace = 32 << 20;
  void* ws;
  CUDA_CHECK(cudaMalloc(&ws, kWorkspace));
  CUBLAS_CHECK(cublasSetWorkspace(blas, ws, kWorkspace));
  CUBLAS_CHECK(cublasSetAtomicsMode(blas, CUBLAS_ATOMICS_NOT_ALLOWED));
  std::printf(
      "small products on %s (%d SMs), bf16 operands, f32 out; us a call (graph of calls over weight "
      "copies that miss L2)\n\n",
      prop.name, prop.multiProcessorCount);
  if (absl::GetFlag(FLAGS_streams)) {
    // Streaming 64 MB of weights (an MoE layer's experts' gate/up in the benchmark model) into shared
    // memory, four copies cycled so that each call misses L2.
    constexpr int64_t kRows = 32768, kBytes = kRows * 2048;
    constexpr int kCopies = 4;
    unsigned char* w;
    unsigned* out;
    CUDA_CHECK(cudaMalloc(&w, kCopies * kBytes));
    CUDA_CHECK(cudaMemset(w, 1, kCopies * kBytes));
    CUDA_CHECK(cudaMalloc(&out, 4096 * sizeof(unsigned)));
    std::printf(
        "streaming %lld MB of weights into shared memory (%lld rows of 2048 bytes, a block per 128 rows, 16 KB a "
        "step):\n\n| how | us | GB/s | vs plain loads |\n|---|---|---|---|\n",
        static_cast<long long>(kBytes >> 20), static_cast<long long>(kRows));
    double plain = 0;
    for (int v = 0; v < stream_variants(); ++v) {
      const char* name = "";
      const double t = time_graph(s, 16, [&](int i) {
        launch_stream_variant(v, s, w + static_cast<int64_t>(i % kCopies) * kBytes, kRows, out, &name);
      });
      if (v == 0) plain = t;
      std::printf("| %s | %.2f | %.0f | %.2fx |\n", name, 1e3 * t, kBytes / (t * 1e-3) / 1e9, plain / t);
      std::fflush(stdout);
    }
    std::printf("\n");
    cudaFree(w);
    cudaFree(out);
  }
  if (!absl::GetFlag(FLAGS_products)) return 0;
  {
    // Chains of small kernels in one graph: the cost of a kernel boundary, with and without PDL, alone
    // and between cuBLAS products (as a decode step alternates them).
    std::printf(
        "kernel chains in a graph, us a kernel (bump: y = x + 1 over n floats; gemm: 64 x 1024 x 1024 "
        "bf16):\n\n| chain | n | plain | PDL | PDL vs plain |\n|---|---|---|---|---|\n");
    constexpr int kN = 1 << 20;
    float *x, *y;
    CUDA_CHECK(cudaMalloc(&x, kN * 4));
    CUDA_CHECK(cudaMalloc(&y, kN * 4));
    CUDA_CHECK(cudaMemset(x, 0, kN * 4));
    __nv_bfloat16 *wa, *wb;
    float* wc;
    CUDA_CHECK(cudaMalloc(&wa, 1024 * 1024 * 2));
    CUDA_CHECK(cudaMalloc(&wb, 64 * 1024 * 2));
    CUDA_CHECK(cudaMalloc(&wc, 64 * 1024 * 4));
    CUDA_CHECK(cudaMemset(wa, 0, 1024 * 1024 * 2));
    CUDA_CHECK(cudaMemset(wb, 0, 64 * 1024 * 2));
    const float one = 1, zero = 0;
    for (int n : {1024, 64 * 1024, kN}) {
      double t[2], g[2];
      for (int pdl = 0; pdl < 2; ++pdl) {
        t[pdl] = time_graph(s, 64, [&](int i) { launch_bump(s, pdl, i % 2 ? y : x, i % 2 ? x : y, n); });
        g[pdl] = time_graph(s, 64, [&](int i) {
          if (i % 2) {
            CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, 1024, 64, 1024, &one, wa, CUDA_R_16BF, 1024, wb,
                                      CUDA_R_16BF, 1024, &zero, wc, CUDA_R_32F, 1024, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
          } else {
            launch_bump(s, pdl, x, y, n);
          }
        });
      }
      std::printf("| bump, bump, ... | %d | %.2f | %.2f | %.2fx |\n", n, 1e3 * t[0], 1e3 * t[1], t[0] / t[1]);
      std::printf("| bump, gemm, ... | %d | %.2f | %.2f | %.2fx |\n", n, 1e3 * g[0], 1e3 * g[1], g[0] / g[1]);
    }
    std::printf("\n");
    cudaFree(x);
    cudaFree(y);
    cudaFree(wa);
    cudaFree(wb);
    cudaFree(wc);
  }
  std::printf(
      "| rows | product | n x k | default us | k in 2 / 4 us | heuristic #0 us | best us | best: #, split-k, waves | "
      "best vs default | weight GB/s (best) |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& rs : absl::GetFlag(FLAGS_rows)) {
    const int64_t m = std::stoll(rs);
    for (const Shape& sh : shapes) {
      const int64_t n = sh.n, k = sh.k;
      const size_t wbytes = static_cast<size_t>(n * k) * 2;
      const int copies = static_cast<int>(std::max<size_t>(2, (256u << 20) / wbytes));
      const int calls = std::min(copies, 64);
      std::vector<__nv_bfloat16*> w(static_cast<size_t>(copies));
      for (auto& p : w) {
        CUDA_CHECK(cudaMalloc(&p, wbytes));
        CUDA_CHECK(cudaMemset(p, 0x3c, wbytes));
      }
      __nv_bfloat16* x;
      float* c;
      CUDA_CHECK(cudaMalloc(&x, static_cast<size_t>(m * k) * 2));
      CUDA_CHECK(cudaMemset(x, 0x3c, static_cast<size_t>(m * k) * 2));
      CUDA_CHECK(cudaMalloc(&c, static_cast<size_t>(4 * m * n) * 4));
      const float alpha = 1, beta = 0;
      // Row-major c[m, n] = x[m, k] · w[n, k]ᵀ is column-major cᵀ[n, m] = w[k, n]ᵀ · xᵀ[k, m].
      const double t_default = time_graph(s, calls, [&](int i) {
        CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                  static_cast<int>(k), &alpha, w[static_cast<size_t>(i % copies)], CUDA_R_16BF,
                                  static_cast<int>(k), x, CUDA_R_16BF, static_cast<int>(k), &beta, c, CUDA_R_32F,
                                  static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      });
      // k split in parts as one strided batch of products, each part's f32 sums in a plane of its own
      // (the kernel after the product would add the planes in a fixed order: deterministic, no atomics).
      double t_split[2] = {0, 0};
      for (int u = 0; u < 2; ++u) {
        const int parts = u == 0 ? 2 : 4;
        if (k % (8 * parts) != 0) continue;
        const int64_t kp = k / parts;
        t_split[u] = time_graph(s, calls, [&](int i) {
          CUBLAS_CHECK(cublasGemmStridedBatchedEx(
              blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), static_cast<int>(kp), &alpha,
              w[static_cast<size_t>(i % copies)], CUDA_R_16BF, static_cast<int>(k), kp, x, CUDA_R_16BF,
              static_cast<int>(k), kp, &beta, c, CUDA_R_32F, static_cast<int>(n), m * n, parts, CUBLAS_COMPUTE_32F,
              CUBLAS_GEMM_DEFAULT));
        });
      }
      cublasLtMatmulDesc_t op;
      CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
      CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
      cublasLtMatrixLayout_t la, lb, lc;
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k));
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, static_cast<uint64_t>(k), static_cast<uint64_t>(m), k));
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, static_cast<uint64_t>(n), static_cast<uint64_t>(m), n));
      cublasLtMatmulPreference_t pref;
      CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &kWorkspace,
                                                        sizeof(kWorkspace)));
      std::vector<cublasLtMatmulHeuristicResult_t> res(static_cast<size_t>(absl::GetFlag(FLAGS_candidates)));
      int got = 0;
      CUBLAS_CHECK(
          cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, static_cast<int>(res.size()), res.data(), &got));
      double t_first = 0, t_best = 1e30;
      int best = -1;
      for (int r = 0; r < got; ++r) {
        if (res[static_cast<size_t>(r)].state != CUBLAS_STATUS_SUCCESS) continue;
        const double t = time_graph(s, calls, [&](int i) {
          CUBLAS_CHECK(cublasLtMatmul(lt, op, &alpha, w[static_cast<size_t>(i % copies)], la, x, lb, &beta, c, lc, c,
                                      lc, &res[static_cast<size_t>(r)].algo, ws, kWorkspace, s));
        });
        int sk = 0, tile = 0, red = 0;
        CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&res[static_cast<size_t>(r)].algo,
                                                          CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk, sizeof(sk), nullptr));
        CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&res[static_cast<size_t>(r)].algo,
                                                          CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), nullptr));
        CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(
            &res[static_cast<size_t>(r)].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof(red), nullptr));
        std::fprintf(stderr, "%lld %s #%d: %.2f us, split-k %d, reduction %d, tile %d, waves %.2f, workspace %zu\n",
                     static_cast<long long>(m), sh.name.c_str(), r, 1e3 * t, sk, red, tile,
                     res[static_cast<size_t>(r)].wavesCount, res[static_cast<size_t>(r)].workspaceSize);
        if (r == 0) t_first = t;
        if (t < t_best) t_best = t, best = r;
      }
      int split = 0;
      if (best >= 0)
        CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(
            &res[static_cast<size_t>(best)].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof(split), nullptr));
      std::printf("| %lld | %s | %lld x %lld | %.2f | %.2f / %.2f | %.2f | %.2f | #%d, %d, %.2f | %.2fx | %.0f |\n",
                  static_cast<long long>(m), sh.name.c_str(), static_cast<long long>(n), static_cast<long long>(k),
                  1e3 * t_default, 1e3 * t_split[0], 1e3 * t_split[1], 1e3 * t_first, 1e3 * t_best, best, split,
                  best >= 0 ? res[static_cast<size_t>(best)].wavesCount : 0.0f, t_default / t_best,
                  wbytes / (t_best * 1e-3) / 1e9);
      std::fflush(stdout);
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatrixLayoutDestroy(la);
      cublasLtMatrixLayoutDestroy(lb);
      cublasLtMatrixLayoutDestroy(lc);
      cublasLtMatmulDescDestroy(op);
      for (auto* p : w) cudaFree(p);
      cudaFree(x);
      cudaFree(c);
    }
  }
  return 0;
}
