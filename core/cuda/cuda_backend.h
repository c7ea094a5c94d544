// The CUDA backend's class and the helpers its .cu files share (internal to core/cuda).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/cuda/cuda.h"
#include "core/cuda/cuda_check.h"

#define CUBLAS_CHECK(call)                                                                                   \
  do {                                                                                                       \
    cublasStatus_t r1lab_st_ = (call);                                                                       \
    if (r1lab_st_ != CUBLAS_STATUS_SUCCESS) {                                                                \
      std::fprintf(stderr, "%s:%d: cuBLAS error %s in %s\n", __FILE__, __LINE__, cublasGetStatusName(r1lab_st_), \
                   #call);                                                                                   \
      std::abort();                                                                                          \
    }                                                                                                        \
  } while (0)

namespace r1lab::core::cuda {

// The device, its stream, cuBLAS handle and memory pool. Shared by the backend and by every storage it
// allocated (a tensor may outlive the backend; its memory returns to the pool on the same stream).
struct Context {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cudaMemPool_t pool = nullptr;
  void* workspace = nullptr;  // cuBLAS workspace
  // Side streams for the independent products of a grouped GEMM (one per expert is too small to fill
  // the GPU alone): each with its own cuBLAS handle and workspace; made on first use.
  struct Side {
    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    void* workspace = nullptr;
    cudaEvent_t done = nullptr;
  };
  std::vector<Side> sides;
  cudaEvent_t fork = nullptr;
  // Pinned host buffers for download_later, kept for reuse (any thread may return one).
  std::mutex pinned_mu;
  std::vector<std::pair<void*, size_t>> pinned;
  // A buffer of at least `bytes`: its address and its size (give it back with that size).
  std::pair<void*, size_t> take_pinned(size_t bytes);
  void give_pinned(void* p, size_t bytes);
  ~Context();
};

// A 2-D view of a device tensor: rows of `cols` contiguous elements, `ld` apart.
struct Rows {
  void* p;
  int64_t rows, cols, ld;
  float* f() const { return static_cast<float*>(p); }
};
Rows rows_of(const Tensor& t);
// Up to 4 dimensions, sizes and strides padded at the front (size 1, stride 0).
struct Dims4 {
  int64_t n[4], s[4];
};
Dims4 dims4(const Tensor& t);
// An operand of a matrix product: element (r, c) at p[(r / rows1) * ld0 + (r % rows1) * ld + c] (a
// matrix, or a stack of matrices of rows1 rows each), in f32 or bf16.
struct Operand {
  const void* p;
  cudaDataType_t type;
  int64_t rows, cols, ld, rows1, ld0;
};
inline unsigned blocks(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }
void check_device(const Tensor& t, DType dtype);
// Makes `device` current on the calling thread (cheap when it already is): a backend is called from
// its owner's threads (engine steps, server handlers), and one process may drive backends on several
// GPUs. Every entry point that queues work or allocates calls it.
void use_device(int device);
// Whether `device` is a Hopper GPU (compute capability 9.x) and this build has the sm_90a kernels that
// use its warpgroup products (gemm.cu); runs a probe kernel once.
bool hopper_products_built(int device);

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const Options& options);
  ~CudaBackend() override;
  Device device() const override { return Device::kCuda; }
  std::string name() const override;
  DType weight_dtype() const override {
    return opt_.gemm == Options::GemmPrecision::kBF16 ? DType::kBF16 : DType::kF32;
  }

  Tensor zeros(const Shape& shape, DType dtype) override;
  Tensor empty(const Shape& shape, DType dtype) override;
  void upload(const Tensor& host, Tensor& dst) override;
  Tensor download(const Tensor& src) override;
  std::function<Tensor()> download_later(const Tensor& src) override;
  void copy(const Tensor& src, Tensor& dst) override;
  void add(const Tensor& x, Tensor& y, float alpha) override;
  void fill(Tensor& t, float value) override;
  void sum_heads(const Tensor& x, Tensor& y) override;

  void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
            float beta) override;
  void gemm_batched(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
                    float beta) override;
  void grouped_gemm(const Tensor& a, const Tensor& w, bool trans_w, const Tensor& offsets, Tensor& c, float beta,
                    const Tensor* a_rows) override;
  void grouped_gemm_wgrad(const Tensor& dc, const Tensor& a, const Tensor& offsets, Tensor& dw, float beta,
                          const Tensor* a_rows, const Tensor* dc_rows) override;
  void gather_rows(const Tensor& x, const Tensor& index, Tensor& out) override;
  void grouped_silu_backward(const Tensor& dc, const Tensor& w, const Tensor& offsets, const Tensor& gate_up,
                             Tensor& dgu, const Tensor* dc_rows, const Tensor* scale, Tensor* dscale,
                             Tensor* scaled_act) override;
  void grouped_gate_up(const Tensor& a, const Tensor& w, const Tensor& offsets, Tensor& h, Tensor* gate_up,
                       const Tensor* a_rows) override;

  void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                       Tensor* x_rounded) override;
  void add_rmsnorm_forward(const Tensor& x, Tensor& h, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                           Tensor* h_rounded) override;
  void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                        Tensor* dx_rounded = nullptr) override;
  void silu_mul_forward(const Tensor& gu, Tensor& h) override;
  void silu_mul_backward(const Tensor& dh, const Tensor& gu, Tensor& dgu, Tensor* h) override;
  void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out) override;
  void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable) override;

  void rope(Tensor& x, const Tensor& positions, const RopeTable& table, bool interleaved,
            bool inverse) override;
  void rope_from(const Tensor& src, Tensor& x, const Tensor& positions, const RopeTable& table, bool interleaved,
                 bool inverse = false) override;
  void store_latents(const Tensor& ckv, const Tensor& w, float eps, const Tensor& positions, const RopeTable& table,
                     bool interleaved, const Tensor& slots, Tensor& pool) override;
  void mla_step_inputs(const Tensor& ckv, const Tensor& w, float eps, const Tensor& positions, const RopeTable& table,
                       bool interleaved, const Tensor& slots, Tensor& pool, const Tensor& q, Tensor& q_rot,
                       Tensor& q_nope) override;

  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Tensor& out, Tensor& lse,
                         const Tensor* k_tail = nullptr) override;
  void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse, float scale, Tensor& dq, Tensor& dk, Tensor& dv, bool accumulate = true,
                          Tensor* dq_tail = nullptr, Tensor* dk_tail = nullptr,
                          const Tensor* k_tail = nullptr) override;
  void paged_latent_attention(const Tensor& q, const Tensor& pool, int block_size, const Tensor& block_tables,
                              const Tensor& seq_starts, const Tensor& context_lens, float scale,
                              Tensor& out) override;
  void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) override;
  void scatter_fp8_latents(const Tensor& src, int64_t r, const Tensor& rows, Tensor& pool) override;

  void moe_route(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                 Tensor& weights, Tensor& scores) override;
  void moe_route_and_gate(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx,
                          Tensor& weights, Tensor& scores, const Tensor& gate_up, Tensor& act) override;
  void moe_route_backward(const Tensor& dweights, const Tensor& scores, const Tensor& idx,
                          const RouterConfig& cfg, Tensor& dlogits) override;
  void moe_dispatch(const Tensor& idx, int n_experts, Tensor& row_of, Tensor& token_of, Tensor& offsets) override;
  void moe_dispatch_backward(const Tensor& dxs, const Tensor& row_of, Tensor& dx, bool accumulate) override;
  void moe_combine(const Tensor& ys, const Tensor& weights, const Tensor& row_of, Tensor& out) override;
  void moe_combine_add_rmsnorm(const Tensor& ys, const Tensor& weights, const Tensor& row_of, const Tensor& x,
                               Tensor& h, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                               Tensor* h_rounded) override;
  void moe_combine_backward(const Tensor& dout, const Tensor& ys, const Tensor& weights, const Tensor& row_of,
                            Tensor& dys, Tensor& dweights) override;

  void logprobs_forward(const Tensor& logits, const Tensor& targets, Tensor& lp, Tensor& lse) override;
  void logprobs_backward(const Tensor& dlp, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                         Tensor& dlogits) override;
  void clipped_ratio_grad(const Tensor& lp, const Tensor& rows, const ClippedRatioLoss& loss, Tensor& dlp) override;
  void logit_stats(const Tensor& logits, const Tensor& lse, Tensor& entropy, Tensor& argmax) override;
  void sample_tokens(const Tensor& logits, const Tensor& spec, Tensor& tokens, Tensor& logprobs) override;

  double sum_squares(const Tensor& x, const std::vector<ParamSpan>& spans) override;
  void adamw_update(Tensor& w, const Tensor& g, Tensor& m, Tensor& v, const std::vector<ParamSpan>& spans,
                    const AdamWUpdate& u, Tensor* rounded = nullptr) override;
  void synchronize() override;
  // bf16 products only: the f32 and tf32 grouped products read the group offsets on the host.
  bool can_capture() const override { return !opt_.profile && opt_.gemm == Options::GemmPrecision::kBF16; }
  std::function<void()> capture(const std::function<void()>& work) override;

  cudaStream_t stream() const { return ctx_->stream; }
  int device_index() const { return ctx_->device; }
  const Options& options() const { return opt_; }
  std::vector<OpTime> profile();
  void reset_profile();
  size_t peak_memory() const;
  void reset_peak_memory();
  const MemoryHigh& memory_high() const { return mem_high_; }

  // Times the enclosing op when profiling (by name, with the useful flops and bytes it does).
  class Op {
   public:
    Op(CudaBackend* be, const char* name, double flops = 0, double bytes = 0);
    ~Op();

   private:
    CudaBackend* be_;
    cudaEvent_t start_ = nullptr;
    const char* name_;
    double flops_, bytes_;
  };

 private:
  // A device copy of spans split into chunks (for the optimizer), cached by content.
  const void* span_chunks(const std::vector<ParamSpan>& spans, int64_t* n_chunks);
  // Scratch device memory of at least `bytes` (reused; valid until the next call).
  void* scratch(size_t bytes);
  // Group offsets ([G + 1] I64 on the device) on the host, checked to ascend within [0, rows]. Waits for
  // the stream: only the f32 and tf32 grouped products (cuBLAS a group at a time) need them.
  std::vector<int64_t> host_offsets(const Tensor& offsets, int64_t rows);
  // The side streams, ready to start after the work queued so far on the main stream. join_sides
  // joins them back: the main stream's later work waits for everything queued on them.
  const std::vector<Context::Side>& fork_sides();
  void join_sides();
  // Stream-ordered pool memory, not cleared (zeros and empty start from it).
  Tensor uncleared(const Shape& shape, DType dtype);
  // A matrix-product operand (see gemm.cu): f32 rows, or their bf16 copy kept alive in `keep`.
  // dst [rows, cols] contiguous bf16 = the f32 rows (element (r, c) at p[(r / rows1) * ld0 + (r % rows1)
  // * ld + c]) rounded to nearest even: the one f32 -> bf16 conversion of products and copy.
  void to_bf16(const float* p, int64_t rows, int64_t cols, int64_t ld, int64_t rows1, int64_t ld0, void* dst);
  // Whether a product of a and b runs in bf16: bf16 products, or an operand already in bf16.
  bool bf16_products(const Tensor& a, const Tensor& b) const;
  Operand gemm_operand(const Tensor& t, bool bf16, int64_t rows, int64_t cols, int64_t ld, int64_t rows1, int64_t ld0,
                              Tensor& keep);
  // moe_route's kernel, with the shared experts' activation from gate_up into act in the same pass where
  // both are given (moe_route_and_gate has checked that the kernel takes them).
  void route_into(const Tensor& logits, const Tensor& bias, const RouterConfig& cfg, Tensor& idx, Tensor& weights,
                  Tensor& scores, const Tensor* gate_up, Tensor* act);
  // c[r] = a[r] · op(w[g]) + beta · c[r] on the tensor-core kernels (bf16 operands that tc_operand
  // takes), row tiles of tm (32, 64 or 128; 128 on the warpgroup products where hopper_): groups of rows by
  // the device bounds, or (bounds null) one dense product of `rows` rows.
  void tc_products(const Operand& a, const Operand& w, bool trans_w, int64_t groups, const int64_t* bounds,
                   int64_t rows, void* c, int64_t ldc, bool c16, int64_t n, int64_t k, float beta, int tm);
  // An attention operand [B, T, H, D] (see attention.cu) in `dtype`: t itself, or a copy (f32 rounded
  // once) when t is in the other dtype or (bf16) its rows are not 16-byte aligned.
  Tensor attention_operand(const Tensor& t, DType dtype);

  Options opt_;
  // The grouped products take the warpgroup-product kernels (Options::hopper_products, where built).
  bool hopper_ = false;
  std::shared_ptr<Context> ctx_;
  struct Pending {
    const char* name;
    cudaEvent_t start, stop;
    double flops, bytes;
  };
  std::vector<Pending> pending_;
  std::map<std::string, OpTime> times_;
  MemoryHigh mem_high_;                      // since reset_profile (Op)
  std::map<std::string, int64_t> op_calls_;  // calls by name since reset_profile
  std::set<std::string> op_names_;  // names made at run time (Options::profile_shapes), kept for Op
  std::vector<ParamSpan> cached_spans_;
  Tensor span_table_;
  int64_t span_chunks_ = 0;
  Tensor scratch_;
};

}  // namespace r1lab::core::cuda
