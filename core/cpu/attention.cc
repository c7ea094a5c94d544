// Causal softmax attention of the CPU backend: the textbook O(T·S) form, forward and backward.
#include <cmath>
#include <limits>
#include <vector>

#include "core/cpu/cpu_backend.h"

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

}  // namespace

// p[t, s] = softmax_s(scale · q[t]·k[s]) over s ≤ S - T + t;  out[t] = Σ_s p[t, s] v[s];
// lse[t] = log Σ_s exp(scale · q[t]·k[s]).
void CpuBackend::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Tensor& out,
                                   Tensor& lse) {
  const int64_t b = q.size(0), t_len = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t s_len = k.size(1), hk = k.size(2), dv = v.size(3);
  CHECK_EQ(k.size(3), d);
  CHECK_EQ(hq % hk, 0);
  CHECK_GE(s_len, t_len);
  CHECK(out.size(3) == dv && lse.is_contiguous());
  View4 Q(q), K(k), V(v), O(out);
  float* L = lse.f32();
  const int64_t group = hq / hk;
#pragma omp parallel for collapse(2)
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t h = 0; h < hq; ++h) {
      std::vector<float> p(static_cast<size_t>(s_len));
      const int64_t kh = h / group;
      for (int64_t t = 0; t < t_len; ++t) {
        const int64_t last = s_len - t_len + t;
        const float* qv = Q.at(bi, t, h);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s <= last; ++s) {
          const float* kv = K.at(bi, s, kh);
          float acc = 0;
          for (int64_t i = 0; i < d; ++i) acc += qv[i] * kv[i];
          p[s] = acc * scale;
          mx = std::max(mx, p[s]);
        }
        double sum = 0;
        for (int64_t s = 0; s <= last; ++s) {
          p[s] = std::exp(p[s] - mx);
          sum += p[s];
        }
        const float inv = static_cast<float>(1.0 / sum);
        float* o = O.at(bi, t, h);
        for (int64_t i = 0; i < dv; ++i) o[i] = 0;
        for (int64_t s = 0; s <= last; ++s) {
          const float w = p[s] * inv;
          const float* vv = V.at(bi, s, kh);
          for (int64_t i = 0; i < dv; ++i) o[i] += w * vv[i];
        }
        L[(bi * hq + h) * t_len + t] = mx + static_cast<float>(std::log(sum));
      }
    }
  }
}

// With p recomputed from lse: dv[s] += Σ_t p[t,s] dout[t];  dp = dout·v[s];
// ds = p (dp - Σ_s p dp) = p (dp - dout·out);  dq[t] += scale Σ_s ds k[s];  dk[s] += scale Σ_t ds q[t].
void CpuBackend::attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& out, const Tensor& lse, float scale, Tensor& dq, Tensor& dk,
                                    Tensor& dv) {
  const int64_t b = q.size(0), t_len = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t s_len = k.size(1), hk = k.size(2), dvd = v.size(3);
  View4 dO(dout), Q(q), K(k), V(v), O(out), dQ(dq), dK(dk), dV(dv);
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

}  // namespace r1lab::core::cpu
