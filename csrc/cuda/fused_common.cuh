// What the fused CUDA kernels (fused_forward.cuh, fused_backward.cuh) share: the thread tile,
// the element types, the presynaptic rows of a step, the trace update as stored, and a warp sum
// of several values at once. Layout, thread mapping and traffic: docs/cuda.md; math:
// docs/op_spec.md.
//
// Included by plastic_cuda.cu after its device helpers (clamp_trace, act_*, dev_exp,
// block_all_reduce), which these kernels call: the clamp and the activations are the same functions
// as in the previous kernels. Device code only: no launches here.
#pragma once

#include <ATen/OpMathType.h>

#include <stdint.h>

namespace plastic_ops {
namespace fused {

constexpr int kThreads = 128;  // threads per block along j (a multiple of 32)
constexpr int kTile = 4;       // episodes b per thread: w[i,j] and alpha[i,j] are read once per tile
constexpr int kRowThreads = 256;  // threads per block of the per-row kernels

// Inputs, outputs and parameters are stored as scalar_t; the trace (H, checkpoints, G) as trace_t;
// every sum and product is computed in acc_t.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// p_t as a (B, N_in) row block: x_t (linear) or y_{t-1} with y_{-1} = y0 (recurrent).
template <typename scalar_t>
struct PreRows {
  const scalar_t* pre;  // x (T, B, N_in) or y0 (B, N)
  const scalar_t* y;    // y (T, B, N_out)
  bool recurrent;
  int64_t B, n_in, n_out;
  __host__ __device__ const scalar_t* at(int64_t t) const {
    if (!recurrent) return pre + t * B * n_in;
    return t == 0 ? pre : y + (t - 1) * B * n_out;
  }
};

// Products and sums that the compiler may not contract into fused multiply-adds: the forward and
// the backward's recomputation must round the update identically, wherever it is inlined.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
template <typename acc_t>
__device__ __forceinline__ acc_t mul_rn(acc_t a, acc_t b) { return a * b; }
template <typename acc_t>
__device__ __forceinline__ acc_t add_rn(acc_t a, acc_t b) { return a + b; }
#endif

// Hpre_t from H_{t-1} (docs/op_spec.md, Forward), in the operations and the order of rule_update.
template <bool OJA, typename acc_t>
__device__ __forceinline__ acc_t updated_trace(acc_t h, acc_t p, acc_t y, acc_t e) {
  if (OJA) return add_rn(h, mul_rn(mul_rn(e, y), add_rn(p, -mul_rn(h, y))));
  return add_rn(mul_rn(acc_t(1) - e, h), mul_rn(mul_rn(e, p), y));
}

// H_t from Hpre_t: the clamp, then the rounding to the trace's storage type. The forward and every
// recomputation in the backward go through updated_trace and this, so a recomputed trace and its
// clamp mask are the forward's, bit for bit, whatever trace_t is.
template <typename trace_t, typename acc_t>
__device__ __forceinline__ acc_t stored_trace(acc_t hpre, bool has_clip, acc_t clip) {
  const acc_t h = has_clip ? clamp_trace(hpre, clip) : hpre;
  return static_cast<acc_t>(static_cast<trace_t>(h));
}

// Per-row step flags, steps[t, b] of the op's optional (T, B) uint8 tensor, with the bits kReset and
// kSkip of ../plastic_common.h (docs/op_spec.md, "Episode resets and lengths"). Every kernel that reads
// them has a template parameter STEPS: without it the flags are never read and the code is the same as
// without the argument.

// The trace carried out of step t from the trace h carried into it: RESET zeroes h (and p when
// zero_pre: the recurrent form), SKIP passes it on, else the update and the clamp, stored. The
// forward sweep and every recomputation go through this, so they apply the flags bit for bit alike.
template <bool OJA, bool STEPS, typename trace_t, typename acc_t>
__device__ __forceinline__ acc_t stepped_trace(acc_t h, acc_t p, acc_t y, acc_t e, uint8_t flags, bool zero_pre,
                                               bool has_clip, acc_t clip) {
  if (STEPS && (flags & kReset)) {
    h = acc_t(0);
    if (zero_pre) p = acc_t(0);
  }
  if (STEPS && (flags & kSkip)) return h;
  return stored_trace<trace_t>(updated_trace<OJA>(h, p, y, e), has_clip, clip);
}

// Sums each of NV values (NV a power of 2, <= 32) over the 32 lanes of a warp, with NV - 1 +
// log2(32 / NV) shuffles instead of 5 NV. In each of the first log2(NV) butterfly steps a lane keeps
// half of its values, adds its partner's copy of that half, and the partner does the same with the
// other half. Lane l ends with the full sum of value l / (32 / NV) and returns it. Every lane of the
// warp must call it (threads past N_out pass zeros). The order of the additions is fixed.
template <int NV, typename acc_t>
__device__ __forceinline__ acc_t warp_sum_many(acc_t (&v)[NV]) {
  static_assert(NV >= 1 && NV <= 32 && (NV & (NV - 1)) == 0, "NV must be a power of 2 <= 32");
  const int lane = threadIdx.x & 31;
  int off = 16;
#pragma unroll
  for (int n = NV; n > 1; n >>= 1) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int q = 0; q < n / 2; ++q) {
      const acc_t keep = upper ? v[n / 2 + q] : v[q];
      const acc_t send = upper ? v[q] : v[n / 2 + q];
      v[q] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
    off >>= 1;
  }
  acc_t r = v[0];
#pragma unroll
  for (; off > 0; off >>= 1) r += __shfl_xor_sync(0xffffffffu, r, off);
  return r;
}

}  // namespace fused
}  // namespace plastic_ops
