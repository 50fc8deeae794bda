// The fused path's forward kernels: one sweep over the trace per step, the activation of a step,
// and the update alone over several steps (H_T, and the backward's recomputed segments).
// Thread mapping and traffic: docs/cuda.md ("The fused kernels"). Device code only.
#pragma once

#include "fused_common.cuh"

namespace plastic_ops {
namespace fused {

// The sweep of step t. Thread (j, tile of kTile episodes from b0, split z) walks i in
// [z * chunk, z * chunk + chunk): it reads H_{t-1}[b,i,j] from src, applies the update of step t-1
// (UPDATE; at t = 0 src is H_0 and nothing is applied), writes H_t to dst (the slot where it is kept;
// at t = 0 the copy of H_0 into checkpoint 0, or nothing when dst is null), and adds
// p_t[b,i] * w[i,j] + p_t[b,i] * (alpha[i,j] * H_t[b,i,j]) to its sum of a_t. w and alpha are read
// once per i for the whole tile; the next row's trace values are loaded before this row's are
// stored. The partial sums go to part[z, b, j]; the activation adds the splits in a fixed order.
// src and dst may be the same buffer (each element is read, then written, by one thread).
// STEPS: f_prev and f_cur are the flag rows (B bytes) of steps t-1 and t, read once per episode of the
// tile. The update of step t-1 goes through stepped_traces (RESET, SKIP); dst gets H_t as carried into
// step t, before its RESET; then a RESET of step t zeroes H_t (and p_t when zero_pre) in a_t, and a
// SKIP of step t leaves the episode out of the sum (the activation writes y_t = 0).
// ADD, ELIG: the neuromodulation options (docs/op_spec.md, "Neuromodulation"), through stepped_traces.
// e_prev holds the rates r_{t-1} (the activation's output with self-generated modulation). With ELIG,
// src and dst hold two planes, H and E (E at an offset of B * N_in * N_out): E_{t-1} is read next to
// H_{t-1}, updated with q = *q_rate and written next to H_t; a_t reads H_t only.
template <typename scalar_t, typename trace_t, bool OJA, bool UPDATE, bool STEPS, bool ADD = false,
          bool ELIG = false>
__global__ void __launch_bounds__(kThreads)
    fused_forward_sweep_kernel(const trace_t* src, trace_t* dst, const scalar_t* __restrict__ p_prev,
                               const scalar_t* __restrict__ y_prev, const scalar_t* __restrict__ e_prev,
                               const scalar_t* __restrict__ p_cur, const scalar_t* __restrict__ w,
                               const scalar_t* __restrict__ alpha, acc_type<scalar_t>* __restrict__ part, int64_t B,
                               int64_t n_in, int64_t n_out, int64_t chunk, bool has_clip, acc_type<scalar_t> clip,
                               const uint8_t* __restrict__ f_prev, const uint8_t* __restrict__ f_cur, bool zero_pre,
                               const scalar_t* __restrict__ q_rate) {
  using acc_t = acc_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n_out) return;  // no cooperation between threads below
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int nb = static_cast<int>(B - b0 < kTile ? B - b0 : kTile);
  const int64_t i0 = static_cast<int64_t>(blockIdx.z) * chunk;
  const int64_t i1 = i0 + chunk < n_in ? i0 + chunk : n_in;
  const int64_t plane = n_in * n_out;
  const int64_t eo = B * plane;  // offset of the E plane
  const acc_t q = ELIG && UPDATE ? static_cast<acc_t>(*q_rate) : acc_t(0);
  acc_t yv[kTile], ev[kTile], acc[kTile];
  trace_t next[kTile], enext[kTile];
  uint8_t fp[kTile], fc[kTile];
#pragma unroll
  for (int k = 0; k < kTile; ++k) {
    acc[k] = acc_t(0);
    yv[k] = ev[k] = acc_t(0);
    next[k] = enext[k] = trace_t(0);
    fp[k] = fc[k] = 0;
    if (k < nb) {
      if (STEPS) {
        if (UPDATE) fp[k] = f_prev[b0 + k];
        fc[k] = f_cur[b0 + k];
      }
      if (UPDATE) {
        yv[k] = static_cast<acc_t>(y_prev[(b0 + k) * n_out + j]);
        ev[k] = static_cast<acc_t>(e_prev[(b0 + k) * n_out + j]);
      }
      if (i0 < i1) {
        next[k] = src[(b0 + k) * plane + i0 * n_out + j];
        if (ELIG) enext[k] = src[eo + (b0 + k) * plane + i0 * n_out + j];
      }
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    trace_t cur[kTile], ecur[kTile];
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      cur[k] = next[k];
      ecur[k] = enext[k];
      if (k < nb && i + 1 < i1) {
        next[k] = src[(b0 + k) * plane + (i + 1) * n_out + j];
        if (ELIG) enext[k] = src[eo + (b0 + k) * plane + (i + 1) * n_out + j];
      }
    }
    const acc_t wv = static_cast<acc_t>(w[i * n_out + j]);
    const acc_t av = static_cast<acc_t>(alpha[i * n_out + j]);
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      if (k >= nb) continue;
      const int64_t r = (b0 + k) * n_in + i;  // row (b, i) of p and of the trace
      acc_t h = static_cast<acc_t>(cur[k]);
      acc_t el = static_cast<acc_t>(ecur[k]);
      if (UPDATE)
        stepped_traces<OJA, STEPS, ADD, ELIG, trace_t>(h, el, static_cast<acc_t>(p_prev[r]), yv[k], ev[k], q, fp[k],
                                                       zero_pre, has_clip, clip);
      if (dst != nullptr) {
        dst[r * n_out + j] = static_cast<trace_t>(h);
        if (ELIG) dst[eo + r * n_out + j] = static_cast<trace_t>(el);
      }
      if (STEPS && (fc[k] & kSkip)) continue;
      acc_t pc = static_cast<acc_t>(p_cur[r]);
      if (STEPS && (fc[k] & kReset)) {
        h = acc_t(0);
        if (zero_pre) pc = acc_t(0);
      }
      // p*w and p*(alpha*h) as two terms, as in the reference (docs/op_spec.md, "NaN and inf")
      acc[k] += pc * wv + pc * (av * h);
    }
  }
#pragma unroll
  for (int k = 0; k < kTile; ++k)
    if (k < nb) part[(static_cast<int64_t>(blockIdx.z) * B + b0 + k) * n_out + j] = acc[k];
}

// y_t[b, :] = act(drive_t[b, :] + sum_z part[z, b, :]), the splits added in the order z = 0 .. S-1.
// One block per row b. Softmax keeps a_t in part[0, b, :] (in acc_t) until the row's max and sum are
// known; each thread rewrites only the entries it has read. STEPS: a row whose flags f_t[b] have SKIP
// gets y_t[b, :] = 0.
// MOD (self-generated modulation): then the rates of step t from the stored y_t[b, :],
// r_t[b, :] = e_t[b, :] * M_t[b, :] (modulated_rates), zeros on a skipped row. round_y (kRound*): y_t
// rounded to the 16-bit dtype of the inputs that the launcher copied to float32 (round_stored).
template <typename scalar_t, bool STEPS, bool MOD = false>
__global__ void fused_activation_forward_kernel(acc_type<scalar_t>* __restrict__ part, int64_t n_split,
                                                const scalar_t* __restrict__ drive_t, scalar_t* __restrict__ y_t,
                                                int64_t B, int64_t n_out, int act, const uint8_t* __restrict__ f_t,
                                                const scalar_t* __restrict__ e_t, const scalar_t* __restrict__ mod,
                                                scalar_t* __restrict__ r_t, int round_y) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t shm[32];
  const int64_t b = blockIdx.x;
  if (STEPS && (f_t[b] & kSkip)) {  // uniform over the block
    for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
      y_t[b * n_out + j] = scalar_t(0);
      if (MOD) r_t[b * n_out + j] = scalar_t(0);
    }
    return;
  }
  const bool softmax = static_cast<Act>(act) == Act::Softmax;
  acc_t mx = static_cast<acc_t>(-INFINITY);
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
    const int64_t r = b * n_out + j;
    acc_t a = static_cast<acc_t>(drive_t[r]);
    for (int64_t z = 0; z < n_split; ++z) a += part[z * B * n_out + r];
    if (softmax) {
      part[r] = a;
      mx = a > mx ? a : mx;
    } else {
      y_t[r] = static_cast<scalar_t>(round_stored(act_elementwise(a, act), round_y));
    }
  }
  if (softmax) {  // uniform over the block
    mx = block_all_reduce<true>(mx, shm);
    acc_t sum = 0;
    for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
      const acc_t ex = dev_exp(part[b * n_out + j] - mx);
      part[b * n_out + j] = ex;
      sum += ex;
    }
    sum = block_all_reduce<false>(sum, shm);
    for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x)
      y_t[b * n_out + j] = static_cast<scalar_t>(round_stored(part[b * n_out + j] / sum, round_y));
  }
  // each thread reads back the y_t[b, j] it has written
  if (MOD) modulated_rates(y_t + b * n_out, e_t + b * n_out, mod, r_t + b * n_out, n_out, shm);
}

// The backward's rates of self-generated modulation: block (t, b) = (blockIdx.x / B, blockIdx.x % B)
// recomputes r_t[b, :] from the stored y_t[b, :] with modulated_rates, in blocks of the forward
// activation's size, so they are the forward's bit for bit; it also keeps s_t[b] for the gradients.
// STEPS: a skipped row gets r = 0 and s = 0, as in the forward.
template <typename scalar_t, bool STEPS>
__global__ void fused_mod_rates_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ e,
                                       const scalar_t* __restrict__ mod, scalar_t* __restrict__ r,
                                       acc_type<scalar_t>* __restrict__ s, int64_t B, int64_t n_out,
                                       const uint8_t* __restrict__ flags) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t shm[32];
  const int64_t tb = blockIdx.x;  // t * B + b
  const int64_t o = tb * n_out;
  if (STEPS && (flags[tb] & kSkip)) {  // uniform over the block
    for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) r[o + j] = scalar_t(0);
    if (threadIdx.x == 0) s[tb] = acc_t(0);
    return;
  }
  const acc_t sv = modulated_rates(y + o, e + o, mod, r + o, n_out, shm);
  if (threadIdx.x == 0) s[tb] = sv;
}

// The update alone over `steps` steps from step t0: thread j of trace row r = b * N_in + i reads
// H_{t0}[r, j] from src once, then writes H_{t0+1+l}[r, j] to dst + l * dst_stride for l = 0 ..
// steps-1, keeping the trace in a register between steps. Used for H_T after the forward's last
// step (steps = 1, dst may be src) and for the backward's recomputed segments. A grid-stride loop
// over rows. STEPS: each step goes through stepped_traces with the row's flags flags[t, b] (read once
// per row and step), as in the forward sweep, so the traces are the forward's, bit for bit.
// ADD, ELIG: as in the sweep; e holds the rates r_t. With ELIG, src and each dst slot hold two planes
// (E at an offset of B * N_in * N_out), and E is carried in a register next to H.
template <typename scalar_t, typename trace_t, bool OJA, bool STEPS, bool ADD = false, bool ELIG = false>
__global__ void fused_update_steps_kernel(const trace_t* src, trace_t* dst, int64_t dst_stride, int64_t t0,
                                          int64_t steps, PreRows<scalar_t> P, const scalar_t* __restrict__ y,
                                          const scalar_t* __restrict__ e, bool has_clip, acc_type<scalar_t> clip,
                                          const uint8_t* __restrict__ flags, const scalar_t* __restrict__ q_rate) {
  using acc_t = acc_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_in = P.n_in, n_out = P.n_out, bo = P.B * n_out;
  if (j >= n_out) return;
  const int64_t rows = P.B * n_in;
  const int64_t eo = rows * n_out;  // offset of the E plane
  const acc_t q = ELIG ? static_cast<acc_t>(*q_rate) : acc_t(0);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t b = r / n_in;
    acc_t h = static_cast<acc_t>(src[r * n_out + j]);
    acc_t el = ELIG ? static_cast<acc_t>(src[eo + r * n_out + j]) : acc_t(0);
    for (int64_t l = 0; l < steps; ++l) {
      const int64_t t = t0 + l;
      const int64_t c = t * bo + b * n_out + j;
      const uint8_t f = STEPS ? flags[t * P.B + b] : uint8_t(0);
      stepped_traces<OJA, STEPS, ADD, ELIG, trace_t>(h, el, static_cast<acc_t>(P.at(t)[r]), static_cast<acc_t>(y[c]),
                                                     static_cast<acc_t>(e[c]), q, f, P.recurrent, has_clip, clip);
      dst[l * dst_stride + r * n_out + j] = static_cast<trace_t>(h);
      if (ELIG) dst[l * dst_stride + eo + r * n_out + j] = static_cast<trace_t>(el);
    }
  }
}

}  // namespace fused
}  // namespace plastic_ops
