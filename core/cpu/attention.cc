// Causal softmax attention of the CPU backend: the textbook O(T·S) form, forward and backward.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/latent_rows.h"

namespace r1lab::core::cpu {
namespace {

// Element (i0, i1, i2, i3) of a 4-D strided f32 tensor.
struct View4 {
  float* p;
  int64_t s0, s1, s2;
  explicit View4(const Tensor& t) : p(t.f32()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {
    CHECK_EQ(t.dim(), 4);
    CHECK_EQ(t.stride(3), 1);
  }
  float* at(int64_t a, int64_t b, int64_t c) const { return p + a * s0 + b * s1 + c * s2; }
};

// One query over keys/values 0..last: o = Σ_s softmax_s(scale · q·k[s]) v[s]; returns log Σ_s exp(...).
// key(s), value(s) give row pointers; p is scratch. The same arithmetic, in the same order, for the dense
// and the paged attention.
template <typename KeyAt, typename ValueAt>
float attend_one(const float* q, int64_t d, int64_t dv, int64_t last, float scale, KeyAt key, ValueAt value,
                 std::vector<float>& p, float* o) {
  p.resize(static_cast<size_t>(last + 1));
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s <= last; ++s) {
    const float* kv = key(s);
    float acc = 0;
    for (int64_t i = 0; i < d; ++i) acc += q[i] * kv[i];
    p[s] = acc * scale;
    mx = std::max(mx, p[s]);
  }
  double sum = 0;
  for (int64_t s = 0; s <= last; ++s) {
    p[s] = std::exp(p[s] - mx);
    sum += p[s];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < dv; ++i) o[i] = 0;
  for (int64_t s = 0; s <= last; ++s) {
    const float w = p[s] * inv;
    const float* vv = value(s);
    for (int64_t i = 0; i < dv; ++i) o[i] += w * vv[i];
  }
  return mx + static_cast<float>(std::log(sum));
}

}  // namespace

// p[t, s] = softmax_s(scale · q[t]·k[s]) over s ≤ S - T + t;  out[t] = Σ_s p[t, s] v[s];
// lse[t] = log Σ_s exp(scale · q[t]·k[s]).
void CpuBackend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Tensor& out,
                                   Tensor& lse, const Tensor* k_tail) {
  if (k_tail != nullptr) {
    attention_forward(q, joined_keys(k, *k_tail), v, scale, out, lse);
    return;
  }
  const int64_t b = q.size(0), t_len = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t s_len = k.size(1), hk = k.size(2), dv = v.size(3);
  CHECK_EQ(k.size(3), d);
  CHECK_EQ(hq % hk, 0);
  CHECK_GE(s_len, t_len);
  CHECK(out.size(3) == dv && lse.is_contiguous());
  if (out.dtype() == DType::kBF16) {  // the f32 result, rounded once
    Tensor o32 = Tensor::zeros(out.shape());
    attention_forward(q, k, v, scale, o32, lse);
    copy(o32, out);
    return;
  }
  const Tensor q32 = f32_values(q), k32 = f32_values(k), v32 = f32_values(v);
  View4 Q(q32), K(k32), V(v32), O(out);
  float* L = lse.f32();
  const int64_t group = hq / hk;
#pragma omp parallel for collapse(2)
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t h = 0; h < hq; ++h) {
      std::vector<float> p;
      const int64_t kh = h / group;
      for (int64_t t = 0; t < t_len; ++t) {
        L[(bi * hq + h) * t_len + t] = attend_one(
            Q.at(bi, t, h), d, dv, s_len - t_len + t, scale, [&](int64_t s) { return K.at(bi, s, kh); },
            [&](int64_t s) { return V.at(bi, s, kh); }, p, O.at(bi, t, h));
      }
    }
  }
}

// With p recomputed from lse: dv[s] += Σ_t p[t,s] dout[t];  dp = dout·v[s];
// ds = p (dp - Σ_s p dp) = p (dp - dout·out);  dq[t] += scale Σ_s ds k[s];  dk[s] += scale Σ_t ds q[t].
void CpuBackend::attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& out, const Tensor& lse, float scale, Tensor& dq, Tensor& dk,
                                    Tensor& dv, bool accumulate, Tensor* dq_tail, Tensor* dk_tail,
                                    const Tensor* k_tail) {
  if (k_tail != nullptr) {
    attention_backward(dout, q, joined_keys(k, *k_tail), v, out, lse, scale, dq, dk, dv, accumulate, dq_tail, dk_tail);
    return;
  }
  if (dq_tail != nullptr || dk_tail != nullptr) {
    CHECK(!accumulate) << "attention_backward: gradients in parts are overwritten, not added to";
    if (dq_tail != nullptr) check_parts(dq, *dq_tail, q, q.size(3), "dq");
    if (dk_tail != nullptr) check_parts(dk, *dk_tail, k, q.size(3), "dk");
    attention_backward_in_parts(dout, q, k, v, out, lse, scale, dq, dk, dv, dq_tail, dk_tail);
    return;
  }
  if (dv.dtype() == DType::kBF16) {  // the f32 result, rounded
    CHECK(!accumulate) << "attention_backward: a bf16 dv is overwritten, not added to";
    Tensor dv32 = Tensor::zeros(dv.shape());
    attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv32, false);
    copy(dv32, dv);
    return;
  }
  const int64_t b = q.size(0), t_len = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t s_len = k.size(1), hk = k.size(2), dvd = v.size(3);
  const Tensor q32 = f32_values(q), k32 = f32_values(k), v32 = f32_values(v), o32 = f32_values(out);
  View4 dO(dout), Q(q32), K(k32), V(v32), O(o32), dQ(dq), dK(dk), dV(dv);
  if (!accumulate) {  // overwrite: the sums below start from zero
    const auto clear = [](const View4& x, const Tensor& t) {
      for (int64_t i = 0; i < t.size(0); ++i)
        for (int64_t j = 0; j < t.size(1); ++j)
          for (int64_t h = 0; h < t.size(2); ++h) std::fill_n(x.at(i, j, h), t.size(3), 0.0f);
    };
    clear(dQ, dq);
    clear(dK, dk);
    clear(dV, dv);
  }
  const float* L = lse.f32();
  const int64_t group = hq / hk;
  // Parallel over batch and kv head so that dk/dv writes never collide.
#pragma omp parallel for collapse(2)
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t kh = 0; kh < hk; ++kh) {
      std::vector<float> p(static_cast<size_t>(s_len));
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
        for (int64_t t = 0; t < t_len; ++t) {
          const int64_t last = s_len - t_len + t;
          const float* qv = Q.at(bi, t, h);
          const float* go = dO.at(bi, t, h);
          const float* ov = O.at(bi, t, h);
          const float l = L[(bi * hq + h) * t_len + t];
          float row_dot = 0;
          for (int64_t i = 0; i < dvd; ++i) row_dot += go[i] * ov[i];
          float* dqv = dQ.at(bi, t, h);
          for (int64_t s = 0; s <= last; ++s) {
            const float* kv = K.at(bi, s, kh);
            const float* vv = V.at(bi, s, kh);
            float acc = 0;
            for (int64_t i = 0; i < d; ++i) acc += qv[i] * kv[i];
            const float pr = std::exp(acc * scale - l);
            float dp = 0;
            for (int64_t i = 0; i < dvd; ++i) dp += go[i] * vv[i];
            const float ds = pr * (dp - row_dot) * scale;
            float* dvv = dV.at(bi, s, kh);
            for (int64_t i = 0; i < dvd; ++i) dvv[i] += pr * go[i];
            float* dkv = dK.at(bi, s, kh);
            for (int64_t i = 0; i < d; ++i) {
              dqv[i] += ds * kv[i];
              dkv[i] += ds * qv[i];
            }
          }
        }
      }
    }
  }
}

// Per (token, head): scores over the sequence's cached rows in position order, softmax, weighted sum of
// each row's first dv values. Every query's arithmetic is independent of what else is in the batch.
void CpuBackend::paged_latent_attention(const Tensor& q, const Tensor& pool, int block_size,
                                        const Tensor& block_tables, const Tensor& seq_starts,
                                        const Tensor& context_lens, float scale, Tensor& out) {
  CHECK(q.dim() == 3 && out.dim() == 3 && q.stride(2) == 1 && out.stride(2) == 1);
  if (out.dtype() == DType::kBF16) {  // the f32 result, rounded
    Tensor o32 = Tensor::zeros(out.shape());
    paged_latent_attention(q, pool, block_size, block_tables, seq_starts, context_lens, scale, o32);
    copy(o32, out);
    return;
  }
  if (pool.dtype() == DType::kBF16 || pool.dtype() == DType::kU8) {
    // A bf16 or fp8 cache: the blocks the sequences reach, their values exactly in f32, gathered into a
    // compact pool (the tables remapped onto it), so that a step costs what it reads, not the whole cache.
    const bool fp8 = pool.dtype() == DType::kU8;
    const int64_t d = q.size(2);
    const Fp8LatentRow f{out.size(2), d - out.size(2)};
    CHECK(pool.dim() == 2 && pool.is_contiguous() && pool.size(1) == (fp8 ? f.bytes() : d))
        << "paged attention over " << (fp8 ? "fp8" : "bf16") << " rows: a pool " << shape_str(pool.shape())
        << " for rows of " << d;
    CHECK(!fp8 || Fp8LatentRow::fits(f.r, f.rd)) << "fp8 rows of a latent of " << f.r << " and a rope key of " << f.rd;
    CHECK(block_tables.dtype() == DType::kI32 && block_tables.dim() == 2 && block_tables.is_contiguous());
    CHECK(context_lens.dtype() == DType::kI32 && block_tables.size(0) == context_lens.numel());
    const int64_t n_seq = context_lens.numel(), max_blocks = block_tables.size(1);
    const int64_t pool_blocks = pool.size(0) / block_size;
    const int32_t* ctx = context_lens.data<int32_t>();
    const int32_t* in = block_tables.data<int32_t>();
    Tensor tables = Tensor::zeros(block_tables.shape(), DType::kI32);
    std::vector<int32_t> compact_of(static_cast<size_t>(pool_blocks), -1);
    std::vector<int32_t> used;  // pool blocks in compact order
    for (int64_t s = 0; s < n_seq; ++s) {
      CHECK(ctx[s] >= 0 && ctx[s] <= max_blocks * block_size) << "sequence " << s << ": context " << ctx[s];
      for (int64_t j = 0; j * block_size < ctx[s]; ++j) {
        const int32_t blk = in[s * max_blocks + j];
        CHECK(blk >= 0 && blk < pool_blocks) << "block " << blk << " outside the pool";
        if (compact_of[static_cast<size_t>(blk)] < 0) {
          compact_of[static_cast<size_t>(blk)] = static_cast<int32_t>(used.size());
          used.push_back(blk);
        }
        tables.data<int32_t>()[s * max_blocks + j] = compact_of[static_cast<size_t>(blk)];
      }
    }
    Tensor values = Tensor::zeros({static_cast<int64_t>(used.size()) * block_size, d});
#pragma omp parallel for
    for (int64_t i = 0; i < values.size(0); ++i) {
      const int64_t row = static_cast<int64_t>(used[static_cast<size_t>(i / block_size)]) * block_size + i % block_size;
      float* dst = values.f32() + i * d;
      if (fp8) {
        dequantize_fp8_latent_row(pool.data<uint8_t>() + row * f.bytes(), f, dst);
      } else {
        const uint16_t* src = pool.data<uint16_t>() + row * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = bf16_to_f32(src[c]);
      }
    }
    paged_latent_attention(q, values, block_size, tables, seq_starts, context_lens, scale, out);
    return;
  }
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2), dv = out.size(2);
  const Rows P = rows_of(pool);
  CHECK_EQ(P.cols, d);
  CHECK_LE(dv, d);
  CHECK(block_tables.dtype() == DType::kI32 && block_tables.dim() == 2 && block_tables.is_contiguous());
  CHECK(seq_starts.dtype() == DType::kI32 && context_lens.dtype() == DType::kI32);
  const int64_t n_seq = context_lens.numel(), max_blocks = block_tables.size(1);
  CHECK_EQ(seq_starts.numel(), n_seq + 1);
  CHECK_EQ(block_tables.size(0), n_seq);
  const int32_t* starts = seq_starts.data<int32_t>();
  const int32_t* ctx = context_lens.data<int32_t>();
  const int32_t* tables = block_tables.data<int32_t>();
  CHECK_EQ(starts[n_seq], n);
  // The sequence of every query row.
  std::vector<int32_t> seq_of(static_cast<size_t>(n));
  for (int64_t s = 0; s < n_seq; ++s) {
    const int64_t new_tokens = starts[s + 1] - starts[s];
    CHECK(new_tokens >= 0 && new_tokens <= ctx[s] && ctx[s] <= max_blocks * block_size)
        << "sequence " << s << ": " << new_tokens << " new tokens, context " << ctx[s];
    for (int64_t i = starts[s]; i < starts[s + 1]; ++i) seq_of[i] = static_cast<int32_t>(s);
  }
  const float* Q = q.f32();
  float* O = out.f32();
#pragma omp parallel
  {
    std::vector<float> p;
    std::vector<const float*> row;
#pragma omp for collapse(2)
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t s = seq_of[i];
        const int64_t last = ctx[s] - (starts[s + 1] - starts[s]) + (i - starts[s]);  // own position
        row.resize(static_cast<size_t>(last + 1));
        for (int64_t pos = 0; pos <= last; ++pos) {
          const int64_t block = tables[s * max_blocks + pos / block_size];
          CHECK(block >= 0 && (block + 1) * block_size <= P.rows) << "block " << block << " outside the pool";
          row[pos] = P.row(block * block_size + pos % block_size);
        }
        auto at = [&](int64_t pos) { return row[pos]; };
        attend_one(Q + i * q.stride(0) + h * q.stride(1), d, dv, last, scale, at, at, p,
                   O + i * out.stride(0) + h * out.stride(1));
      }
    }
  }
}

void CpuBackend::scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) {
  CHECK(rows.dtype() == DType::kI32 && rows.is_contiguous());
  if (dst.dtype() == DType::kBF16) {  // rounded to nearest even
    const Rows S = rows_of(src);
    CHECK(dst.dim() == 2 && dst.is_contiguous() && dst.size(1) == S.cols && rows.numel() == S.rows);
    const int32_t* r = rows.data<int32_t>();
    uint16_t* d = dst.data<uint16_t>();
    for (int64_t i = 0; i < S.rows; ++i) {
      CHECK(r[i] >= 0 && r[i] < dst.size(0)) << "row " << r[i] << " outside [0, " << dst.size(0) << ")";
      for (int64_t c = 0; c < S.cols; ++c) d[r[i] * S.cols + c] = f32_to_bf16(S.row(i)[c]);
    }
    return;
  }
  const Rows S = rows_of(src), D = rows_of(dst);
  CHECK_EQ(rows.numel(), S.rows);
  CHECK_EQ(S.cols, D.cols);
  const int32_t* r = rows.data<int32_t>();
  for (int64_t i = 0; i < S.rows; ++i) {
    CHECK(r[i] >= 0 && r[i] < D.rows) << "row " << r[i] << " outside [0, " << D.rows << ")";
    std::memcpy(D.row(r[i]), S.row(i), static_cast<size_t>(S.cols) * 4);
  }
}

void CpuBackend::scatter_fp8_latents(const Tensor& src, int64_t r, const Tensor& rows, Tensor& pool) {
  const Rows S = rows_of(src);
  const Fp8LatentRow f{r, S.cols - r};
  CHECK(Fp8LatentRow::fits(f.r, f.rd)) << "fp8 latent rows of a latent of " << f.r << " and a rope key of " << f.rd;
  CHECK(rows.dtype() == DType::kI32 && rows.is_contiguous() && rows.numel() == S.rows);
  CHECK(pool.dtype() == DType::kU8 && pool.dim() == 2 && pool.is_contiguous() && pool.size(1) == f.bytes())
      << "fp8 latent pool " << shape_str(pool.shape()) << " " << dtype_name(pool.dtype()) << " for rows of "
      << f.bytes() << " bytes";
  const int32_t* ri = rows.data<int32_t>();
  for (int64_t i = 0; i < S.rows; ++i) {
    CHECK(ri[i] >= 0 && ri[i] < pool.size(0)) << "row " << ri[i] << " outside [0, " << pool.size(0) << ")";
    quantize_fp8_latent_row(S.row(i), f, pool.data<uint8_t>() + ri[i] * f.bytes());
  }
}

}  // namespace r1lab::core::cpu
