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

// 16-bit inputs run on the fused kernels from float32 copies; with neuromodulation, y_t is rounded to
// their dtype as soon as it is computed (docs/op_spec.md, "Dtypes"), so that the rates computed from it
// in the forward and from the returned y in the backward are the same. round_y: kRoundNone (every
// other call: y_t is stored as computed), kRoundBFloat16 or kRoundHalf.
constexpr int kRoundNone = 0, kRoundBFloat16 = 1, kRoundHalf = 2;

template <typename acc_t>
__device__ __forceinline__ acc_t round_stored(acc_t v, int round_y) {
  if (round_y == kRoundBFloat16) return static_cast<acc_t>(static_cast<c10::BFloat16>(v));
  if (round_y == kRoundHalf) return static_cast<acc_t>(static_cast<c10::Half>(v));
  return v;
}

// Hpre_t from H_{t-1} with the neuromodulation options (docs/op_spec.md, "Neuromodulation"): ADD, the
// additive rule (no decay); ELIG, the increment is the eligibility trace el = E_{t-1} instead of p y.
// r is the rate r_{t-1} (e, or e * M with self-generated modulation). Without either option this is
// updated_trace itself.
template <bool OJA, bool ADD, bool ELIG, typename acc_t>
__device__ __forceinline__ acc_t neuro_trace(acc_t h, acc_t p, acc_t y, acc_t r, acc_t el) {
  if constexpr (!ADD && !ELIG) {
    (void)el;
    return updated_trace<OJA>(h, p, y, r);
  } else {
    static_assert(!OJA, "Oja's rule has no additive or eligibility form");
    const acc_t inc = ELIG ? mul_rn(r, el) : mul_rn(mul_rn(r, p), y);
    if (ADD) return add_rn(h, inc);
    return add_rn(mul_rn(acc_t(1) - r, h), inc);
  }
}

// E_t from E_{t-1}: (1 - q) E + q (p y), not clipped; the caller rounds it to the trace's storage type.
template <typename acc_t>
__device__ __forceinline__ acc_t updated_eligibility(acc_t el, acc_t p, acc_t y, acc_t q) {
  return add_rn(mul_rn(acc_t(1) - q, el), mul_rn(q, mul_rn(p, y)));
}

// Per-row step flags, steps[t, b] of the op's optional (T, B) uint8 tensor, with the bits kReset and
// kSkip of ../plastic_common.h (docs/op_spec.md, "Episode resets and lengths"). Every kernel that reads
// them has a template parameter STEPS: without it the flags are never read and the code is the same as
// without the argument.

// The traces carried out of step t from those carried into it: h (H) and, with ELIG, el (E). RESET
// zeroes both (and p when zero_pre: the recurrent form), SKIP passes them on, else the update and the
// clamp of H and the update of E, each stored (rounded to trace_t). The forward sweep and every
// recomputation go through this, so they apply the flags and the rules bit for bit alike.
template <bool OJA, bool STEPS, bool ADD, bool ELIG, typename trace_t, typename acc_t>
__device__ __forceinline__ void stepped_traces(acc_t& h, acc_t& el, acc_t p, acc_t y, acc_t r, acc_t q,
                                               uint8_t flags, bool zero_pre, bool has_clip, acc_t clip) {
  if (STEPS && (flags & kReset)) {
    h = acc_t(0);
    if (ELIG) el = acc_t(0);
    if (zero_pre) p = acc_t(0);
  }
  if (STEPS && (flags & kSkip)) return;
  const acc_t hn = stored_trace<trace_t>(neuro_trace<OJA, ADD, ELIG>(h, p, y, r, el), has_clip, clip);
  if (ELIG) el = static_cast<acc_t>(static_cast<trace_t>(updated_eligibility(el, p, y, q)));
  h = hn;
}

// M[j] = mod_fanout_weight[j] * s + mod_fanout_bias[j], in one order wherever it is computed.
template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> modulation_factor(const scalar_t* __restrict__ mod, int64_t n_out,
                                                                int64_t j, acc_type<scalar_t> s) {
  using acc_t = acc_type<scalar_t>;
  return add_rn(mul_rn(static_cast<acc_t>(mod[n_out + j]), s), static_cast<acc_t>(mod[2 * n_out + j]));
}

// Self-generated modulation (docs/op_spec.md, "Neuromodulation") of one row (t, b), by a whole block
// (every thread must call it): s = tanh(sum_k y[k] mod_weight[k] + mod_bias), then
// r[j] = e[j] * (mod_fanout_weight[j] * s + mod_fanout_bias[j]) for the thread's j. mod is the (4, N_out)
// canonical tensor (mod_bias at [3, 0]). The sum over k has one fixed order for a given block size:
// each thread adds its j = threadIdx.x + n blockDim.x in order, then block_all_reduce. The forward's
// activation kernel and the backward's recompute call this with blocks of kRowThreads threads on the
// stored y, so the backward's rates are the forward's, bit for bit. Returns s.
template <typename scalar_t>
__device__ acc_type<scalar_t> modulated_rates(const scalar_t* __restrict__ y, const scalar_t* __restrict__ e,
                                              const scalar_t* __restrict__ mod, scalar_t* __restrict__ r,
                                              int64_t n_out, acc_type<scalar_t>* shm) {
  using acc_t = acc_type<scalar_t>;
  acc_t dot = 0;
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x)
    dot = add_rn(dot, mul_rn(static_cast<acc_t>(y[j]), static_cast<acc_t>(mod[j])));
  dot = block_all_reduce<false>(dot, shm);
  const acc_t s = dev_tanh(add_rn(dot, static_cast<acc_t>(mod[3 * n_out])));
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x)
    r[j] = static_cast<scalar_t>(mul_rn(static_cast<acc_t>(e[j]), modulation_factor(mod, n_out, j, s)));
  return s;
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
