// One token's gradient of the clipped-ratio policy loss (Backend::clipped_ratio_grad), one definition for
// the CPU reference, the CUDA kernel and the trainer's own loss.
#pragma once

#include <cmath>

#include "core/backend.h"

#ifdef __CUDACC__
#define R1LAB_HOST_DEVICE __host__ __device__
#else
#define R1LAB_HOST_DEVICE
#endif

namespace r1lab::core {

// d loss / d lp of a token with coefficient coef (0: no gradient), as Backend::clipped_ratio_grad says.
R1LAB_HOST_DEVICE inline double clipped_ratio_token_grad(double lp, double old, double ref, double adv, double coef,
                                                         const ClippedRatioLoss& l) {
  if (coef == 0.0) return 0.0;
  const double ratio = l.ratio_one ? 1.0 : exp(lp - old);
  const double lo = 1.0 - l.eps_low, hi = 1.0 + l.eps_high;
  const double clipped = ratio < lo ? lo : ratio > hi ? hi : ratio;
  // The gradient flows through the unclipped branch where it is the minimum (or the ratio is inside
  // the clip range, where both branches agree); the clipped branch is constant outside the range.
  const bool inside = ratio >= lo && ratio <= hi;
  const double dpg = (ratio * adv <= clipped * adv || inside) ? -adv * ratio : 0.0;
  const double dkl = l.kl_beta != 0.0 ? l.kl_beta * (1.0 - exp(ref - lp)) : 0.0;
  return coef * (dpg + dkl);
}

}  // namespace r1lab::core
