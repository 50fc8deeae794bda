// CUDA kernels of the plastic op: forward with checkpoints, and BPTT recomputed from them.
// Math and argument meanings: docs/op_spec.md. Thread mapping, launches and determinism:
// docs/cuda.md. Schema: ../plastic_op.cpp.
//
// Layouts (all contiguous): H, G, checkpoints (.., B, N_in, N_out); p, x, y0 (.., B, N_in);
// y, e, drive (T, B, N_out); w, alpha (N_in, N_out). j (N_out) is always the fastest index,
// so a warp of consecutive j reads 32 consecutive trace elements.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <math.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>

#include "../plastic_common.h"

namespace plastic_ops {
namespace {

constexpr int kThreadsJ = 128;    // threads per block along j in the trace sweeps (a multiple of 32)
constexpr int kThreadsRow = 256;  // threads per block of the per-row kernels (a multiple of 32)
constexpr int kMinRowsPerSplit = 32;  // fewest i rows one block of a split sweep walks
constexpr int64_t kMaxGridYZ = 65535;

// ------------------------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ float dev_exp(float v) { return expf(v); }
__device__ __forceinline__ double dev_exp(double v) { return exp(v); }
__device__ __forceinline__ float dev_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double dev_tanh(double v) { return tanh(v); }

// Hpre_{t+1} from H_t (docs/op_spec.md, Forward). The forward, its final update and the
// backward's recomputation all use this one function, so the recomputed traces (and the clamp
// masks) are those of the forward.
template <bool OJA, typename scalar_t>
__device__ __forceinline__ scalar_t rule_update(scalar_t h, scalar_t p, scalar_t y, scalar_t e) {
  if (OJA) return h + e * y * (p - h * y);
  return (scalar_t(1) - e) * h + e * p * y;
}

// v rounded to the storage type T (c10::BFloat16, c10::Half) and read back; a no-op when T is v's
// own type. Where the kernels store a 16-bit trace or output (docs/op_spec.md, "Dtypes").
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t round_to(acc_t v) {
  if constexpr (std::is_same<T, acc_t>::value) {
    return v;
  } else {
    return static_cast<acc_t>(static_cast<T>(v));
  }
}

// clamp to [-c, c]; NaN stays NaN, as with torch.clamp.
template <typename scalar_t>
__device__ __forceinline__ scalar_t clamp_trace(scalar_t h, scalar_t c) {
  return h < -c ? -c : (h > c ? c : h);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_sum(scalar_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_max(scalar_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const scalar_t u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Sum (MAX = false) or max over the whole block, returned to every thread. shm holds 32
// values; the leading barrier lets a block call this several times in a row.
template <bool MAX, typename scalar_t>
__device__ scalar_t block_all_reduce(scalar_t v, scalar_t* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  scalar_t r = shm[0];
  for (int k = 1; k < n_warps; ++k) r = MAX ? (shm[k] > r ? shm[k] : r) : r + shm[k];
  return r;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t act_elementwise(scalar_t a, int act) {
  switch (static_cast<Act>(act)) {
    case Act::Tanh: return dev_tanh(a);
    case Act::Sigmoid: return scalar_t(1) / (scalar_t(1) + dev_exp(-a));
    case Act::Relu: return a < scalar_t(0) ? scalar_t(0) : a;  // NaN passes, as with torch.relu
    default: return a;  // identity (softmax is handled per row)
  }
}

// act'(g) expressed with y = act(a), for the elementwise activations.
template <typename scalar_t>
__device__ __forceinline__ scalar_t act_backward_elementwise(scalar_t g, scalar_t y, int act) {
  switch (static_cast<Act>(act)) {
    case Act::Tanh: return g * (scalar_t(1) - y * y);
    case Act::Sigmoid: return g * y * (scalar_t(1) - y);
    case Act::Relu: return y <= scalar_t(0) ? scalar_t(0) : g;  // torch's mask (NaN y keeps g)
    default: return g;  // identity
  }
}

// ------------------------------------------------------------------------------------------
// Forward.

// The fused sweep of step t. Thread (b, j) walks i in [z*chunk, z*chunk + chunk): it reads
// H_{t-1}[b,i,j] (from src), applies the update of step t-1 (UPDATE; at t = 0 src is H_0 and
// nothing is applied), clamps, writes H_t to dst (and to the checkpoint when there is one), and
// accumulates p_t[b,i] * (w[i,j] + alpha[i,j] * H_t[b,i,j]). Its partial sum of a_t goes to
// part[z, b, j]; the activation kernel adds the splits in a fixed order (no atomics).
// scalar_t: the accumulation type; trace_t: the trace's storage type (H_t is rounded to it when stored,
// and the rounded value is the one used, as the backward reads it back).
template <typename scalar_t, typename trace_t, bool OJA, bool UPDATE>
__global__ void forward_sweep_kernel(const trace_t* src, trace_t* dst, trace_t* ckpt,
                                     const scalar_t* __restrict__ p_prev, const scalar_t* __restrict__ y_prev,
                                     const scalar_t* __restrict__ e_prev, const scalar_t* __restrict__ p_cur,
                                     const scalar_t* __restrict__ w, const scalar_t* __restrict__ alpha,
                                     scalar_t* __restrict__ part, int64_t B, int64_t n_in, int64_t n_out,
                                     int64_t chunk, bool has_clip, scalar_t clip) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n_out) return;  // no block-wide cooperation below
  const int64_t b = blockIdx.y, z = blockIdx.z;
  const int64_t i0 = z * chunk;
  const int64_t i1 = (i0 + chunk < n_in) ? i0 + chunk : n_in;
  scalar_t yv = 0, ev = 0;
  const scalar_t* pp = nullptr;
  if (UPDATE) {
    yv = y_prev[b * n_out + j];
    ev = e_prev[b * n_out + j];
    pp = p_prev + b * n_in;
  }
  const scalar_t* pc = p_cur + b * n_in;
  const int64_t base = b * n_in * n_out + j;
  scalar_t acc = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t o = base + i * n_out;
    scalar_t h = static_cast<scalar_t>(src[o]);
    if (UPDATE) {
      h = rule_update<OJA>(h, pp[i], yv, ev);
      if (has_clip) h = clamp_trace(h, clip);
      h = round_to<trace_t>(h);
    }
    dst[o] = static_cast<trace_t>(h);
    if (ckpt != nullptr) ckpt[o] = static_cast<trace_t>(h);
    const int64_t wo = i * n_out + j;
    // p*w and p*(alpha*h) as two terms, as in the reference: an infinite p meets w and
    // alpha*h separately, so inf/NaN come out where the reference has them
    acc += pc[i] * w[wo] + pc[i] * (alpha[wo] * h);
  }
  part[(z * B + b) * n_out + j] = acc;
}

// y_t[b, :] = act(drive_t[b, :] + sum_z part[z, b, :]), rounded to out_t (the inputs' dtype: the next
// steps read y_t as stored). One block per row b.
template <typename scalar_t, typename out_t>
__global__ void activation_forward_kernel(const scalar_t* __restrict__ part, int64_t n_split,
                                          const scalar_t* __restrict__ drive_t, scalar_t* __restrict__ y_t,
                                          int64_t B, int64_t n_out, int act) {
  __shared__ scalar_t shm[32];
  const int64_t b = blockIdx.x;
  const scalar_t* d = drive_t + b * n_out;
  scalar_t* yr = y_t + b * n_out;
  const bool softmax = static_cast<Act>(act) == Act::Softmax;
  scalar_t mx = static_cast<scalar_t>(-INFINITY);
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
    scalar_t a = d[j];
    for (int64_t z = 0; z < n_split; ++z) a += part[(z * B + b) * n_out + j];
    if (softmax) {
      yr[j] = a;  // kept here until the row's max and sum are known
      mx = a > mx ? a : mx;
    } else {
      yr[j] = round_to<out_t>(act_elementwise(a, act));
    }
  }
  if (!softmax) return;  // uniform over the block
  mx = block_all_reduce<true>(mx, shm);
  scalar_t sum = 0;
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
    const scalar_t ex = dev_exp(yr[j] - mx);
    yr[j] = ex;
    sum += ex;
  }
  sum = block_all_reduce<false>(sum, shm);
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) yr[j] = round_to<out_t>(yr[j] / sum);
}

// dst = clamp(update(src)) for one step, elementwise: the forward's update after its last step
// and the backward's recomputation of a segment. Thread j of row r = b * N_in + i.
template <typename scalar_t, typename trace_t, bool OJA>
__global__ void update_kernel(const trace_t* src, trace_t* dst, const scalar_t* __restrict__ p,
                              const scalar_t* __restrict__ y, const scalar_t* __restrict__ e, int64_t B,
                              int64_t n_in, int64_t n_out, bool has_clip, scalar_t clip) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n_out) return;
  const int64_t rows = B * n_in;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t b = r / n_in;
    const int64_t o = r * n_out + j;
    scalar_t h = rule_update<OJA>(static_cast<scalar_t>(src[o]), p[r], y[b * n_out + j], e[b * n_out + j]);
    if (has_clip) h = clamp_trace(h, clip);
    dst[o] = static_cast<trace_t>(h);
  }
}

// ------------------------------------------------------------------------------------------
// Backward.

// Sweep A of step t (steps 1-2 of the spec): through the clamp and the update. Thread (b, j)
// walks i in its split of [0, N_in): it reads H_t and G = dL/dH_{t+1}, writes G back as the
// partial dL/dH_t (Gp times dHpre/dh), sums dL/de_t[b,j] and the update's dL/dy_t[b,j] into
// de_part/dy_part[z, b, j], and, per i, sums Gp * e * y over the warp's 32 j: lane 0 stores it
// in dp_part[b, j / 32, i] (each slot written by exactly one warp, no atomics).
template <typename scalar_t, typename trace_t, bool OJA>
__global__ void backward_sweep_a_kernel(const trace_t* __restrict__ H, scalar_t* __restrict__ G,
                                        const scalar_t* __restrict__ p, const scalar_t* __restrict__ y,
                                        const scalar_t* __restrict__ e, scalar_t* __restrict__ de_part,
                                        scalar_t* __restrict__ dy_part, scalar_t* __restrict__ dp_part, int64_t B,
                                        int64_t n_in, int64_t n_out, int64_t n_warps_j, int64_t chunk,
                                        bool has_clip, scalar_t clip) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = j < n_out;  // threads past N_out stay for the warp sums
  const int64_t jw = j >> 5;
  const bool writes_dp = (threadIdx.x & 31) == 0 && jw < n_warps_j;
  const int64_t b = blockIdx.y, z = blockIdx.z;
  const int64_t i0 = z * chunk;
  const int64_t i1 = (i0 + chunk < n_in) ? i0 + chunk : n_in;
  const scalar_t yv = valid ? y[b * n_out + j] : scalar_t(0);
  const scalar_t ev = valid ? e[b * n_out + j] : scalar_t(0);
  const scalar_t ey = ev * yv;
  const scalar_t keep = scalar_t(1) - ev;  // dHpre/dh of the hebb rule
  const scalar_t* pb = p + b * n_in;
  const int64_t base = b * n_in * n_out + j;
  scalar_t* dp_row = dp_part + (b * n_warps_j + jw) * n_in;
  scalar_t de = 0, dy = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t pv = pb[i];
    scalar_t contrib = 0;
    if (valid) {
      const int64_t o = base + i * n_out;
      const scalar_t h = static_cast<scalar_t>(H[o]);
      scalar_t g = G[o];
      if (has_clip) {
        const scalar_t hp = rule_update<OJA>(h, pv, yv, ev);
        if (!(hp >= -clip && hp <= clip)) g = scalar_t(0);
      }
      // Terms kept apart as autograd keeps them on the reference (no factoring), so an
      // infinite g gives inf - inf = NaN exactly where the reference does.
      if (OJA) {
        const scalar_t gey = g * ev * yv;
        de += g * yv * (pv - h * yv);
        dy += g * ev * (pv - h * yv) - gey * h;
        G[o] = g - gey * yv;
      } else {
        de += g * (pv * yv) - g * h;
        dy += g * ev * pv;
        G[o] = g * keep;
      }
      contrib = g * ey;
    }
    contrib = warp_sum(contrib);
    if (writes_dp) dp_row[i] = contrib;
  }
  if (valid) {
    de_part[(z * B + b) * n_out + j] = de;
    dy_part[(z * B + b) * n_out + j] = dy;
  }
}

// Step 3, one block per row b: the total dL/dy_t = grad_y_t + (recurrent: dL/dp_{t+1}, in
// carry) + the update's part; dL/de_t; ga_t = act'(dL/dy_t), which is also dL/d(drive_t).
template <typename scalar_t>
__global__ void activation_backward_kernel(const scalar_t* __restrict__ dy_part,
                                           const scalar_t* __restrict__ de_part, int64_t n_split,
                                           const scalar_t* __restrict__ grad_y_t, const scalar_t* __restrict__ carry,
                                           const scalar_t* __restrict__ y_t, scalar_t* __restrict__ ga_t,
                                           scalar_t* __restrict__ ge_t, int64_t B, int64_t n_out, int act) {
  __shared__ scalar_t shm[32];
  const int64_t b = blockIdx.x;
  const bool softmax = static_cast<Act>(act) == Act::Softmax;
  scalar_t dot = 0;
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
    const int64_t r = b * n_out + j;
    scalar_t g = grad_y_t[r];
    if (carry != nullptr) g += carry[r];
    scalar_t de = 0;
    for (int64_t z = 0; z < n_split; ++z) {
      g += dy_part[z * B * n_out + r];
      de += de_part[z * B * n_out + r];
    }
    ge_t[r] = de;
    const scalar_t yv = y_t[r];
    if (softmax) {
      ga_t[r] = g;  // finished below, once sum_k g_k y_k is known
      dot += g * yv;
    } else {
      ga_t[r] = act_backward_elementwise(g, yv, act);
    }
  }
  if (!softmax) return;  // uniform over the block
  dot = block_all_reduce<false>(dot, shm);
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
    const int64_t r = b * n_out + j;
    ga_t[r] = y_t[r] * (ga_t[r] - dot);
  }
}

// Sweep B of step t (step 4 of the spec): through a_t. Thread (i, j) for i in its block's rows
// walks all b: G[b,i,j] += alpha * p * ga; dalpha[i,j] += sum_b p * ga * H_t (this thread owns
// (i, j), so a plain read-modify-write); per (b, i) the warp sums ga * (w + alpha * H_t) over
// its 32 j and lane 0 adds it to dp_part[b, j / 32, i] (the slot sweep A wrote; one owner).
template <typename scalar_t, typename trace_t>
__global__ void backward_sweep_b_kernel(const trace_t* __restrict__ H, scalar_t* __restrict__ G,
                                        const scalar_t* __restrict__ p, const scalar_t* __restrict__ ga,
                                        const scalar_t* __restrict__ w, const scalar_t* __restrict__ alpha,
                                        scalar_t* __restrict__ dalpha, scalar_t* __restrict__ dp_part, int64_t B,
                                        int64_t n_in, int64_t n_out, int64_t n_warps_j, int64_t rows_per_block) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = j < n_out;
  const int64_t jw = j >> 5;
  const bool writes_dp = (threadIdx.x & 31) == 0 && jw < n_warps_j;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t i1 = (i0 + rows_per_block < n_in) ? i0 + rows_per_block : n_in;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t wo = i * n_out + j;
    const scalar_t wv = valid ? w[wo] : scalar_t(0);
    const scalar_t av = valid ? alpha[wo] : scalar_t(0);
    scalar_t da = 0;
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t pv = p[b * n_in + i];
      scalar_t contrib = 0;
      if (valid) {
        const int64_t o = (b * n_in + i) * n_out + j;
        const scalar_t h = static_cast<scalar_t>(H[o]);
        const scalar_t gav = ga[b * n_out + j];
        const scalar_t pg = pv * gav;
        G[o] += pg * av;  // products in the reference's order (see forward_sweep_kernel)
        da += pg * h;
        contrib = gav * wv + gav * (av * h);
      }
      contrib = warp_sum(contrib);
      if (writes_dp) dp_part[(b * n_warps_j + jw) * n_in + i] += contrib;
    }
    if (valid) dalpha[wo] += da;
  }
}

// dL/dp_t[b, i] = sum over the warp slots of dp_part[b, :, i], in a fixed order.
template <typename scalar_t>
__global__ void dp_reduce_kernel(const scalar_t* __restrict__ dp_part, scalar_t* __restrict__ out, int64_t B,
                                 int64_t n_in, int64_t n_warps_j) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= B * n_in) return;
  const int64_t b = r / n_in, i = r - b * n_in;
  const scalar_t* src = dp_part + b * n_warps_j * n_in + i;
  scalar_t s = 0;
  for (int64_t k = 0; k < n_warps_j; ++k) s += src[k * n_in];
  out[r] = s;
}

// ------------------------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits of the i range for the (b, j)-thread sweeps, so that small batches still fill the GPU:
// aim at about 16 blocks of kThreadsJ threads per SM, each walking at least kMinRowsPerSplit
// rows. Returns {n_split, chunk}; every split has at least one row when N_in > 0.
std::pair<int64_t, int64_t> split_rows(int64_t B, int64_t n_in, int64_t n_out) {
  if (n_in == 0) return {1, 1};
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks_xy = ceil_div(n_out, kThreadsJ) * B;
  int64_t n_split = ceil_div(16 * sms, blocks_xy);
  n_split = std::max<int64_t>(1, std::min<int64_t>({n_split, ceil_div(n_in, kMinRowsPerSplit), kMaxGridYZ}));
  const int64_t chunk = ceil_div(n_in, n_split);
  return {ceil_div(n_in, chunk), chunk};
}

template <typename scalar_t, typename trace_t>
void launch_update(bool oja, const trace_t* src, trace_t* dst, const scalar_t* p, const scalar_t* y,
                   const scalar_t* e, const Dims& d, bool has_clip, scalar_t clip, cudaStream_t stream) {
  const int64_t rows = d.B * d.n_in;
  if (rows == 0 || d.n_out == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(d.n_out, kThreadsJ)),
                  static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridYZ)));
  if (oja) {
    update_kernel<scalar_t, trace_t, true><<<grid, kThreadsJ, 0, stream>>>(src, dst, p, y, e, d.B, d.n_in, d.n_out,
                                                                  has_clip, clip);
  } else {
    update_kernel<scalar_t, trace_t, false><<<grid, kThreadsJ, 0, stream>>>(src, dst, p, y, e, d.B, d.n_in, d.n_out,
                                                                   has_clip, clip);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// p_t as a (B, N_in) row block: x_t (linear) or y_{t-1} with y_{-1} = y0 (recurrent).
template <typename scalar_t>
struct PreRows {
  const scalar_t* pre;  // x (T, B, N_in) or y0 (B, N)
  const scalar_t* y;    // y (T, B, N_out)
  bool recurrent;
  int64_t B, n_in, n_out;
  const scalar_t* at(int64_t t) const {
    if (!recurrent) return pre + t * B * n_in;
    return t == 0 ? pre : y + (t - 1) * B * n_out;
  }
};

// scalar_t: the accumulation type of every tensor but the trace (trace_t) and y's rounding (out_t).
template <typename scalar_t, typename trace_t, typename out_t>
void forward_impl(bool recurrent, const at::Tensor& pre, const at::Tensor& drive, const at::Tensor& w,
                  const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& h0, Rule rule, Act act,
                  c10::optional<double> clip, const Dims& d, at::Tensor& y, at::Tensor& hT, at::Tensor& ckpts) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool oja = rule == Rule::Oja;
  const bool has_clip = clip.has_value();
  const scalar_t c = has_clip ? static_cast<scalar_t>(*clip) : scalar_t(0);
  const int64_t hs = d.B * d.n_in * d.n_out, bo = d.B * d.n_out;
  const auto split = split_rows(d.B, d.n_in, d.n_out);
  const int64_t n_split = split.first, chunk = split.second;
  at::Tensor part = at::empty({n_split, d.B, d.n_out}, drive.options());

  scalar_t* yp = y.data_ptr<scalar_t>();
  trace_t* hp = hT.data_ptr<trace_t>();
  trace_t* cp = d.K > 0 ? ckpts.data_ptr<trace_t>() : nullptr;
  const trace_t* h0p = h0.data_ptr<trace_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* ap = alpha.data_ptr<scalar_t>();
  const scalar_t* ep = e.data_ptr<scalar_t>();
  const scalar_t* dp = drive.data_ptr<scalar_t>();
  scalar_t* partp = part.data_ptr<scalar_t>();
  const PreRows<scalar_t> P{pre.data_ptr<scalar_t>(), yp, recurrent, d.B, d.n_in, d.n_out};

  const dim3 sweep_grid(static_cast<unsigned>(ceil_div(d.n_out, kThreadsJ)), static_cast<unsigned>(d.B),
                        static_cast<unsigned>(n_split));
  for (int64_t t = 0; t < d.T; ++t) {
    trace_t* ck = (d.K > 0 && t % d.K == 0) ? cp + (t / d.K) * hs : nullptr;
    if (t == 0) {
      if (oja) {
        forward_sweep_kernel<scalar_t, trace_t, true, false><<<sweep_grid, kThreadsJ, 0, stream>>>(
            h0p, hp, ck, nullptr, nullptr, nullptr, P.at(0), wp, ap, partp, d.B, d.n_in, d.n_out, chunk, has_clip, c);
      } else {
        forward_sweep_kernel<scalar_t, trace_t, false, false><<<sweep_grid, kThreadsJ, 0, stream>>>(
            h0p, hp, ck, nullptr, nullptr, nullptr, P.at(0), wp, ap, partp, d.B, d.n_in, d.n_out, chunk, has_clip, c);
      }
    } else {
      const scalar_t* yprev = yp + (t - 1) * bo;
      const scalar_t* eprev = ep + (t - 1) * bo;
      if (oja) {
        forward_sweep_kernel<scalar_t, trace_t, true, true><<<sweep_grid, kThreadsJ, 0, stream>>>(
            hp, hp, ck, P.at(t - 1), yprev, eprev, P.at(t), wp, ap, partp, d.B, d.n_in, d.n_out, chunk, has_clip, c);
      } else {
        forward_sweep_kernel<scalar_t, trace_t, false, true><<<sweep_grid, kThreadsJ, 0, stream>>>(
            hp, hp, ck, P.at(t - 1), yprev, eprev, P.at(t), wp, ap, partp, d.B, d.n_in, d.n_out, chunk, has_clip, c);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    activation_forward_kernel<scalar_t, out_t><<<static_cast<unsigned>(d.B), kThreadsRow, 0, stream>>>(
        partp, n_split, dp + t * bo, yp + t * bo, d.B, d.n_out, static_cast<int>(act));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // H_T: the update of the last step.
  launch_update<scalar_t, trace_t>(oja, hp, hp, P.at(d.T - 1), yp + (d.T - 1) * bo, ep + (d.T - 1) * bo, d, has_clip, c,
                          stream);
}

// scalar_t: the accumulation type of every tensor but the checkpoints (trace_t).
template <typename scalar_t, typename trace_t>
void backward_impl(bool recurrent, const at::Tensor& grad_y, const at::Tensor& pre, const at::Tensor& w,
                   const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y, const at::Tensor& ckpts,
                   Rule rule, Act act, c10::optional<double> clip, const Dims& d, at::Tensor& G, at::Tensor& g_pre,
                   at::Tensor& g_drive, at::Tensor& g_alpha, at::Tensor& g_e) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool oja = rule == Rule::Oja;
  const bool has_clip = clip.has_value();
  const scalar_t c = has_clip ? static_cast<scalar_t>(*clip) : scalar_t(0);
  const int64_t hs = d.B * d.n_in * d.n_out, bo = d.B * d.n_out, bi = d.B * d.n_in;
  const auto split = split_rows(d.B, d.n_in, d.n_out);
  const int64_t n_split = split.first, chunk = split.second;
  const int64_t n_warps_j = ceil_div(d.n_out, 32);
  int64_t rows_per_block = 4;  // sweep B: i rows per block
  while (ceil_div(d.n_in, rows_per_block) > kMaxGridYZ) rows_per_block *= 2;

  const auto opts = G.options();
  at::Tensor de_part = at::empty({n_split, d.B, d.n_out}, opts);
  at::Tensor dy_part = at::empty({n_split, d.B, d.n_out}, opts);
  at::Tensor dp_part = at::empty({d.B, n_warps_j, d.n_in}, opts);
  at::Tensor carry = recurrent ? at::zeros({d.B, d.n_out}, opts) : at::Tensor();
  const int64_t seg_max = std::min(d.K, d.T);
  at::Tensor seg = at::empty({seg_max - 1, d.B, d.n_in, d.n_out}, ckpts.options());  // H_{cK+1} .. of one segment

  scalar_t* Gp = G.data_ptr<scalar_t>();
  scalar_t* gpre = g_pre.data_ptr<scalar_t>();
  scalar_t* gdrive = g_drive.data_ptr<scalar_t>();
  scalar_t* galpha = g_alpha.data_ptr<scalar_t>();
  scalar_t* ge = g_e.data_ptr<scalar_t>();
  scalar_t* dep = de_part.data_ptr<scalar_t>();
  scalar_t* dyp = dy_part.data_ptr<scalar_t>();
  scalar_t* dpp = dp_part.data_ptr<scalar_t>();
  scalar_t* carryp = recurrent ? carry.data_ptr<scalar_t>() : nullptr;
  trace_t* segp = seg.data_ptr<trace_t>();
  const trace_t* ckp = ckpts.data_ptr<trace_t>();
  const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* ep = e.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* ap = alpha.data_ptr<scalar_t>();
  const PreRows<scalar_t> P{pre.data_ptr<scalar_t>(), yp, recurrent, d.B, d.n_in, d.n_out};

  const dim3 grid_a(static_cast<unsigned>(ceil_div(d.n_out, kThreadsJ)), static_cast<unsigned>(d.B),
                    static_cast<unsigned>(n_split));
  const dim3 grid_b(static_cast<unsigned>(ceil_div(d.n_out, kThreadsJ)),
                    static_cast<unsigned>(ceil_div(d.n_in, rows_per_block)));
  const unsigned grid_reduce = static_cast<unsigned>(ceil_div(bi, kThreadsRow));

  for (int64_t ci = d.C - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * d.K;
    const int64_t len = std::min(d.K, d.T - t0);
    // H_{t0 + s}: the checkpoint for s = 0, the segment buffer after it.
    auto trace_at = [&](int64_t s) -> trace_t* {
      return s == 0 ? const_cast<trace_t*>(ckp) + ci * hs : segp + (s - 1) * hs;
    };
    for (int64_t s = 1; s < len; ++s) {
      const int64_t t = t0 + s - 1;
      launch_update<scalar_t, trace_t>(oja, trace_at(s - 1), trace_at(s), P.at(t), yp + t * bo, ep + t * bo, d, has_clip,
                              c, stream);
    }
    for (int64_t s = len - 1; s >= 0; --s) {
      const int64_t t = t0 + s;
      const trace_t* Ht = trace_at(s);
      const scalar_t* pt = P.at(t);
      if (oja) {
        backward_sweep_a_kernel<scalar_t, trace_t, true><<<grid_a, kThreadsJ, 0, stream>>>(
            Ht, Gp, pt, yp + t * bo, ep + t * bo, dep, dyp, dpp, d.B, d.n_in, d.n_out, n_warps_j, chunk, has_clip, c);
      } else {
        backward_sweep_a_kernel<scalar_t, trace_t, false><<<grid_a, kThreadsJ, 0, stream>>>(
            Ht, Gp, pt, yp + t * bo, ep + t * bo, dep, dyp, dpp, d.B, d.n_in, d.n_out, n_warps_j, chunk, has_clip, c);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      activation_backward_kernel<scalar_t><<<static_cast<unsigned>(d.B), kThreadsRow, 0, stream>>>(
          dyp, dep, n_split, gyp + t * bo, carryp, yp + t * bo, gdrive + t * bo, ge + t * bo, d.B, d.n_out,
          static_cast<int>(act));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (d.n_in > 0) {
        backward_sweep_b_kernel<scalar_t, trace_t><<<grid_b, kThreadsJ, 0, stream>>>(
            Ht, Gp, pt, gdrive + t * bo, wp, ap, galpha, dpp, d.B, d.n_in, d.n_out, n_warps_j, rows_per_block);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // dL/dp_t: dL/dx_t (linear); dL/dy_{t-1}, carried into step t-1, or dL/dy0 (recurrent).
        scalar_t* out = recurrent ? (t > 0 ? carryp : gpre) : gpre + t * bi;
        dp_reduce_kernel<scalar_t><<<grid_reduce, kThreadsRow, 0, stream>>>(dpp, out, d.B, d.n_in, n_warps_j);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
}

}  // namespace
}  // namespace plastic_ops

// ==========================================================================================
// The fused path, the default: one pass over the trace per step in the backward (the drive half
// of step m+1 with the update half of step m), several episodes per thread, every H_t written once
// straight into the slot where it is kept. The kernels are in the headers below;
// PLASTIC_OPS_CUDA_KERNELS=v1 selects the kernels above instead (docs/cuda.md, "Two paths").
#include "fused_backward.cuh"
#include "fused_forward.cuh"

namespace plastic_ops {
namespace {

// Launched by name (unqualified) below.
using fused::fused_activation_forward_kernel;
using fused::fused_backward_pass_kernel;
using fused::fused_dalpha_reduce_kernel;
using fused::fused_forward_sweep_kernel;
using fused::fused_mod_rates_kernel;
using fused::fused_step_finish_kernel;
using fused::fused_update_steps_kernel;

// Which kernels run: PLASTIC_OPS_CUDA_KERNELS, read at each call; unset or "v2": the fused ones.
bool use_fused_kernels() {
  const char* v = std::getenv("PLASTIC_OPS_CUDA_KERNELS");
  const std::string s = v == nullptr ? "" : v;
  if (s.empty() || s == "v2") return true;
  TORCH_CHECK_VALUE(s == "v1", "plastic_ops: PLASTIC_OPS_CUDA_KERNELS must be 'v2' (the fused kernels, the default) "
                    "or 'v1' (the previous kernels), got '", s, "'");
  return false;
}

// Blocks of a kernel resident on one SM, from the occupancy calculator; a whole SM's worth of
// threads when it cannot tell.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads) {
#if defined(__CUDACC__)
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) == cudaSuccess && n > 0) return n;
  (void)cudaGetLastError();  // a failed query leaves no error behind for the next launch check
#else
  (void)kernel;
#endif
  return std::max(1, 2048 / threads);
}

struct FusedGrid {
  dim3 grid;  // (ceil(N_out / kThreads), ceil(B / kTile), S)
  int64_t n_split, chunk;
};

// The i range is split into S parts when the (j, tile) blocks alone do not fill one wave of resident
// blocks (SMs times resident_blocks): S = the number of whole copies of them that fit in the wave,
// each walking at least kMinRowsPerSplit rows.
FusedGrid fused_grid(int64_t B, int64_t n_in, int64_t n_out, int per_sm) {
  const int64_t gx = ceil_div(n_out, fused::kThreads), gy = ceil_div(B, fused::kTile);
  if (n_in == 0) return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), 1, 1};
  const int64_t wave = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * per_sm;
  int64_t n_split = std::max<int64_t>(1, std::min<int64_t>({wave / (gx * gy), ceil_div(n_in, kMinRowsPerSplit),
                                                            kMaxGridYZ}));
  const int64_t chunk = ceil_div(n_in, n_split);
  n_split = ceil_div(n_in, chunk);
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(n_split)), n_split, chunk};
}

// Grid of fused_update_steps_kernel: thread j of a row, a grid-stride loop over the B * N_in rows.
dim3 update_steps_grid(const Dims& d) {
  return dim3(static_cast<unsigned>(ceil_div(d.n_out, fused::kThreads)),
              static_cast<unsigned>(std::min<int64_t>(d.B * d.n_in, kMaxGridYZ)));
}

template <typename acc_t>
at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

// Forward: H_t lands once, straight where it is kept: checkpoint t / K when K divides t (H_0 copied
// by the sweep of step 0), else the output trace, updated in place, which ends as H_T.
// STEPS: sp is the (T, B) flags; the kernels of step t get its rows for t-1 and t (docs/cuda.md,
// "Episode resets and lengths"). What is kept is always the trace carried into a step, before its RESET.
// ADD, ELIG: the rule "add" and eligibility traces (docs/cuda.md, "Neuromodulation"): with ELIG every
// trace (h0, H_T, each checkpoint) is a pair of planes (H, E), q at q_rate. mod (not null: self-generated
// modulation): the activation of step t also writes the rates r_t into a (T, B, N_out) buffer, which
// the trace kernels read in place of e.
template <typename scalar_t, typename trace_t, bool OJA, bool STEPS, bool ADD, bool ELIG>
void fused_forward_impl(bool recurrent, const at::Tensor& pre, const at::Tensor& drive, const at::Tensor& w,
                        const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& h0, Act act,
                        c10::optional<double> clip, const Dims& d, at::Tensor& y, at::Tensor& hT,
                        at::Tensor& ckpts, const uint8_t* sp, const scalar_t* mod, const scalar_t* q_rate,
                        int round_y) {
  using acc_t = fused::acc_type<scalar_t>;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool has_clip = clip.has_value();
  const acc_t c = has_clip ? static_cast<acc_t>(*clip) : acc_t(0);
  const int64_t hs = d.B * d.n_in * d.n_out, bo = d.B * d.n_out;
  const int64_t ts = ELIG ? 2 * hs : hs;  // elements of one kept trace (H, or H and E)
  const FusedGrid g = fused_grid(
      d.B, d.n_in, d.n_out,
      resident_blocks(fused_forward_sweep_kernel<scalar_t, trace_t, OJA, true, STEPS, ADD, ELIG>, fused::kThreads));
  at::Tensor part = at::empty({g.n_split, d.B, d.n_out}, acc_options<acc_t>(drive));
  // with self-generated modulation, the rates r_t = e_t * M_t, written by the activation of step t
  at::Tensor rates = mod != nullptr ? at::empty({d.T, d.B, d.n_out}, drive.options()) : at::Tensor();

  scalar_t* yp = y.data_ptr<scalar_t>();
  trace_t* hp = hT.data_ptr<trace_t>();
  trace_t* cp = d.K > 0 ? ckpts.data_ptr<trace_t>() : nullptr;
  const trace_t* h0p = h0.data_ptr<trace_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* ap = alpha.data_ptr<scalar_t>();
  const scalar_t* ep = e.data_ptr<scalar_t>();
  scalar_t* rp = mod != nullptr ? rates.data_ptr<scalar_t>() : nullptr;
  const scalar_t* up = mod != nullptr ? rp : ep;  // the rates the updates use
  const scalar_t* dp = drive.data_ptr<scalar_t>();
  acc_t* partp = part.data_ptr<acc_t>();
  const fused::PreRows<scalar_t> P{pre.data_ptr<scalar_t>(), yp, recurrent, d.B, d.n_in, d.n_out};
  auto slot = [&](int64_t t) -> trace_t* { return d.K > 0 && t % d.K == 0 ? cp + (t / d.K) * ts : hp; };
  auto flags = [&](int64_t t) -> const uint8_t* { return STEPS ? sp + t * d.B : nullptr; };  // row of step t

  const trace_t* cur = h0p;  // holds H_t
  for (int64_t t = 0; t < d.T; ++t) {
    if (t == 0) {
      fused_forward_sweep_kernel<scalar_t, trace_t, OJA, false, STEPS, ADD, ELIG>
          <<<g.grid, fused::kThreads, 0, stream>>>(h0p, cp, nullptr, nullptr, nullptr, P.at(0), wp, ap, partp, d.B,
                                                   d.n_in, d.n_out, g.chunk, has_clip, c, nullptr, flags(0),
                                                   recurrent, q_rate);
    } else {
      trace_t* next = slot(t);
      fused_forward_sweep_kernel<scalar_t, trace_t, OJA, true, STEPS, ADD, ELIG>
          <<<g.grid, fused::kThreads, 0, stream>>>(cur, next, P.at(t - 1), yp + (t - 1) * bo, up + (t - 1) * bo,
                                                   P.at(t), wp, ap, partp, d.B, d.n_in, d.n_out, g.chunk, has_clip, c,
                                                   flags(t - 1), flags(t), recurrent, q_rate);
      cur = next;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (mod != nullptr) {
      fused_activation_forward_kernel<scalar_t, STEPS, true>
          <<<static_cast<unsigned>(d.B), fused::kRowThreads, 0, stream>>>(
              partp, g.n_split, dp + t * bo, yp + t * bo, d.B, d.n_out, static_cast<int>(act), flags(t), ep + t * bo,
              mod, rp + t * bo, round_y);
    } else {
      fused_activation_forward_kernel<scalar_t, STEPS><<<static_cast<unsigned>(d.B), fused::kRowThreads, 0, stream>>>(
          partp, g.n_split, dp + t * bo, yp + t * bo, d.B, d.n_out, static_cast<int>(act), flags(t), nullptr, nullptr,
          nullptr, round_y);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (d.n_in > 0) {  // H_T (and E_T): the update of the last step
    fused_update_steps_kernel<scalar_t, trace_t, OJA, STEPS, ADD, ELIG>
        <<<update_steps_grid(d), fused::kThreads, 0, stream>>>(cur, hp, 0, d.T - 1, 1, P, yp, up, has_clip, c, sp,
                                                               q_rate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Backward: m = T-1 .. 0, one pass per m (the drive half of step m+1 with the update half of step m),
// then the drive half of step 0 alone (docs/op_spec.md, "Backward"). H_m comes from its checkpoint
// when K divides m, else from the segment recomputed on entering it. Without dL/dH_T (has_grad_hT
// false) the update half of step T-1 is skipped and the first pass writes G without reading it.
// STEPS: sp is the (T, B) flags; each pass gets the rows of its two steps, the segment recompute all.
// ADD, ELIG, mod: as in the forward (docs/cuda.md, "Neuromodulation"). With ELIG, G holds (dL/dH, dL/dE)
// and g_q gets dL/dq; with mod, the rates are recomputed from y first and g_mod gets dL/dmod.
template <typename scalar_t, typename trace_t, bool OJA, bool STEPS, bool ADD, bool ELIG>
void fused_backward_impl(bool recurrent, const at::Tensor& grad_y, const at::Tensor& grad_hT, bool has_grad_hT,
                         const at::Tensor& pre, const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& e,
                         const at::Tensor& y, const at::Tensor& ckpts, Act act, c10::optional<double> clip,
                         const Dims& d, at::Tensor& G, at::Tensor& g_pre, at::Tensor& g_drive, at::Tensor& g_alpha,
                         at::Tensor& g_e, const uint8_t* sp, const scalar_t* mod, const scalar_t* q_rate,
                         at::Tensor& g_mod, at::Tensor& g_q) {
  using acc_t = fused::acc_type<scalar_t>;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool has_clip = clip.has_value();
  const acc_t c = has_clip ? static_cast<acc_t>(*clip) : acc_t(0);
  const int64_t hs = d.B * d.n_in * d.n_out, bo = d.B * d.n_out, bi = d.B * d.n_in;
  const int64_t ts = ELIG ? 2 * hs : hs;  // elements of one kept trace (H, or H and E)
  const FusedGrid g = fused_grid(
      d.B, d.n_in, d.n_out,
      resident_blocks(fused_backward_pass_kernel<scalar_t, trace_t, OJA, true, true, STEPS, ADD, ELIG>,
                      fused::kThreads));
  const int64_t n_warps_j = ceil_div(d.n_out, 32);
  const int64_t n_tiles = ceil_div(d.B, fused::kTile);
  const int64_t slot_numel = d.B * n_warps_j * d.n_in;

  const auto acc_opts = acc_options<acc_t>(grad_y);
  at::Tensor de_part = at::empty({g.n_split, d.B, d.n_out}, acc_opts);
  at::Tensor dy_part = at::empty({g.n_split, d.B, d.n_out}, acc_opts);
  at::Tensor dp_slots = at::empty({2, d.B, n_warps_j, d.n_in}, acc_opts);  // dL/dp_t per warp, t even / odd
  at::Tensor dalpha_part = at::zeros({n_tiles, d.n_in, d.n_out}, acc_opts);
  const int64_t seg_max = std::min(d.K, d.T);
  // H_{cK+1} .. of a segment (with ELIG: H and E)
  at::Tensor seg = ELIG ? at::empty({seg_max - 1, 2, d.B, d.n_in, d.n_out}, ckpts.options())
                        : at::empty({seg_max - 1, d.B, d.n_in, d.n_out}, ckpts.options());
  // ELIG: dL/dq per (split, tile, j), each slot owned by one thread of every pass
  at::Tensor dq_part = ELIG ? at::zeros({g.n_split, n_tiles, d.n_out}, acc_opts) : at::Tensor();
  acc_t* dqp = ELIG ? dq_part.data_ptr<acc_t>() : nullptr;
  // self-generated modulation: the rates r_t and s_t recomputed from y, and dL/dM_t, dz_t per step
  at::Tensor rates, s_mod, dM, dz;
  if (mod != nullptr) {
    rates = at::empty({d.T, d.B, d.n_out}, grad_y.options());
    s_mod = at::empty({d.T, d.B}, acc_opts);
    dM = at::empty({d.T, d.B, d.n_out}, acc_opts);
    dz = at::empty({d.T, d.B}, acc_opts);
  }

  acc_t* Gp = G.data_ptr<acc_t>();
  scalar_t* gpre = g_pre.data_ptr<scalar_t>();
  scalar_t* gdrive = g_drive.data_ptr<scalar_t>();
  scalar_t* ge = g_e.data_ptr<scalar_t>();
  acc_t* dep = de_part.data_ptr<acc_t>();
  acc_t* dyp = dy_part.data_ptr<acc_t>();
  acc_t* slotp = dp_slots.data_ptr<acc_t>();
  acc_t* dap = dalpha_part.data_ptr<acc_t>();
  trace_t* segp = seg.data_ptr<trace_t>();
  const trace_t* ckp = ckpts.data_ptr<trace_t>();
  const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* ep = e.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* ap = alpha.data_ptr<scalar_t>();
  const fused::PreRows<scalar_t> P{pre.data_ptr<scalar_t>(), yp, recurrent, d.B, d.n_in, d.n_out};

  auto H_at = [&](int64_t m) -> const trace_t* {
    return m % d.K == 0 ? ckp + (m / d.K) * ts : segp + (m % d.K - 1) * ts;
  };
  auto slots = [&](int64_t t) -> acc_t* { return slotp + (t % 2) * slot_numel; };
  auto flags = [&](int64_t t) -> const uint8_t* { return STEPS ? sp + t * d.B : nullptr; };  // row of step t

  // the rates of every step, as the forward computed them (fused_mod_rates_kernel)
  const scalar_t* up = ep;
  if (mod != nullptr) {
    fused_mod_rates_kernel<scalar_t, STEPS><<<static_cast<unsigned>(d.T * d.B), fused::kRowThreads, 0, stream>>>(
        yp, ep, mod, rates.data_ptr<scalar_t>(), s_mod.data_ptr<acc_t>(), d.B, d.n_out, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    up = rates.data_ptr<scalar_t>();
  }
  // The end of step m (act_step) and/or dL/dp written out from the slots of step t_dp.
  auto finish = [&](int64_t m, int64_t t_dp, scalar_t* dp_out, bool carry, bool act_step, bool has_update) {
    if (mod != nullptr) {
      fused_step_finish_kernel<scalar_t, STEPS, true><<<static_cast<unsigned>(d.B), fused::kRowThreads, 0, stream>>>(
          slots(t_dp), n_warps_j, d.n_in, dp_out, carry, act_step, dyp, dep, g.n_split, has_update, gyp + m * bo,
          yp + m * bo, gdrive + m * bo, ge + m * bo, d.B, d.n_out, static_cast<int>(act), flags(m), ep + m * bo,
          s_mod.data_ptr<acc_t>() + m * d.B, mod, dM.data_ptr<acc_t>() + m * bo, dz.data_ptr<acc_t>() + m * d.B);
    } else {
      fused_step_finish_kernel<scalar_t, STEPS><<<static_cast<unsigned>(d.B), fused::kRowThreads, 0, stream>>>(
          slots(t_dp), n_warps_j, d.n_in, dp_out, carry, act_step, dyp, dep, g.n_split, has_update, gyp + m * bo,
          yp + m * bo, gdrive + m * bo, ge + m * bo, d.B, d.n_out, static_cast<int>(act), flags(m), nullptr, nullptr,
          nullptr, nullptr, nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  bool g_zero = !has_grad_hT;
  const acc_t* Gin = has_grad_hT ? grad_hT.data_ptr<acc_t>() : Gp;
  bool update_ran_next = false;  // the update half of step m+1 ran and set the slots of dL/dp_{m+1}
  for (int64_t m = d.T - 1; m >= 0; --m) {
    const int64_t s = m - m % d.K;
    if (m % d.K != 0 && (m == d.T - 1 || m % d.K == d.K - 1) && bi > 0) {  // entering segment [s, m]
      fused_update_steps_kernel<scalar_t, trace_t, OJA, STEPS, ADD, ELIG>
          <<<update_steps_grid(d), fused::kThreads, 0, stream>>>(H_at(s), segp, ts, s, m - s, P, yp, up, has_clip, c,
                                                                 sp, q_rate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const bool drive = m + 1 < d.T;
    if (!drive && g_zero) {  // the update half of step T-1 against a zero G: every term is zero
      finish(m, m + 1, nullptr, false, true, false);
      update_ran_next = false;
      continue;
    }
    const scalar_t* ga_next = drive ? gdrive + (m + 1) * bo : nullptr;
    const scalar_t* p_next = drive ? P.at(m + 1) : nullptr;
    acc_t* dp_next = drive ? slots(m + 1) : nullptr;
    if (drive) {
      fused_backward_pass_kernel<scalar_t, trace_t, OJA, true, true, STEPS, ADD, ELIG>
          <<<g.grid, fused::kThreads, 0, stream>>>(H_at(m), Gin, Gp, g_zero, P.at(m), yp + m * bo, up + m * bo, dep,
                                                   dyp, slots(m), p_next, ga_next, wp, ap, dap, dp_next,
                                                   update_ran_next, d.B, d.n_in, d.n_out, n_warps_j, g.chunk, has_clip,
                                                   c, flags(m), flags(m + 1), recurrent, q_rate, dqp);
    } else {
      fused_backward_pass_kernel<scalar_t, trace_t, OJA, false, true, STEPS, ADD, ELIG>
          <<<g.grid, fused::kThreads, 0, stream>>>(H_at(m), Gin, Gp, g_zero, P.at(m), yp + m * bo, up + m * bo, dep,
                                                   dyp, slots(m), nullptr, nullptr, wp, ap, dap, nullptr, false, d.B,
                                                   d.n_in, d.n_out, n_warps_j, g.chunk, has_clip, c, flags(m), nullptr,
                                                   recurrent, q_rate, dqp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    g_zero = false;
    Gin = Gp;
    // dL/dp_{m+1} is complete: dL/dx_{m+1} (linear) or, recurrent, a part of dL/dy_m
    finish(m, m + 1, drive && !recurrent ? gpre + (m + 1) * bi : nullptr, drive && recurrent, true, true);
    update_ran_next = true;
  }
  // the drive half of step 0, then dL/dp_0: dL/dx_0 (linear) or dL/dy0 (recurrent)
  fused_backward_pass_kernel<scalar_t, trace_t, OJA, true, false, STEPS, ADD, ELIG>
      <<<g.grid, fused::kThreads, 0, stream>>>(H_at(0), Gin, Gp, g_zero, nullptr, nullptr, nullptr, dep, dyp, nullptr,
                                               P.at(0), gdrive, wp, ap, dap, slots(0), update_ran_next, d.B, d.n_in,
                                               d.n_out, n_warps_j, g.chunk, has_clip, c, nullptr, flags(0), recurrent,
                                               nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish(0, 0, gpre, false, false, false);
  const int64_t a_numel = d.n_in * d.n_out;
  if (a_numel > 0) {
    fused_dalpha_reduce_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(a_numel, fused::kRowThreads)), fused::kRowThreads, 0, stream>>>(
            dap, n_tiles, a_numel, g_alpha.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The parameters of the options, from the per-step buffers: ATen reductions over fixed shapes (no
  // atomics), in the accumulation type.
  if (ELIG) g_q = dq_part.sum();
  if (mod != nullptr) {
    const at::Tensor y_acc = y.to(acc_opts.dtype());
    const std::vector<int64_t> tb{0, 1};
    const at::Tensor g_mw = (dz.unsqueeze(-1) * y_acc).sum(tb);
    const at::Tensor g_fw = (dM * s_mod.unsqueeze(-1)).sum(tb);
    const at::Tensor g_fb = dM.sum(tb);
    const at::Tensor g_mb = at::cat({dz.sum().reshape({1}), at::zeros({d.n_out - 1}, acc_opts)});
    g_mod = at::stack({g_mw, g_fw, g_fb, g_mb});
  }
}

// Calls f(trace_t{}, steps_tag): trace_t is scalar_t, or c10::BFloat16 for float inputs with a bfloat16
// trace, which takes the fused kernels only with step flags or neuromodulation (fused_handles);
// steps_tag is std::true_type when there are step flags (sp not null), else std::false_type: the
// kernels' STEPS policy. Without flags the kernels run as if the argument did not exist.
template <typename scalar_t, typename F>
void dispatch_fused_trace(at::ScalarType trace, const uint8_t* sp, F&& f) {
  auto with_steps = [&](auto trace_tag) {
    if (sp == nullptr) {
      f(trace_tag, std::false_type{});
    } else {
      f(trace_tag, std::true_type{});
    }
  };
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (trace == at::kBFloat16) {
      with_steps(c10::BFloat16{});
      return;
    }
  }
  with_steps(scalar_t{});
}

// Calls f(oja, add, elig), std::integral_constant<bool> tags: the trace kernels' OJA, ADD and ELIG
// policies (docs/op_spec.md, "Neuromodulation"; Oja's rule has no eligibility form, check_neuro).
// Without neuromodulation (rule hebb or oja, no eligibility) ADD and ELIG are false and the kernels
// are those of a call without the options.
template <typename F>
void dispatch_rule(Rule rule, bool eligible, F&& f) {
  using Y = std::true_type;
  using N = std::false_type;
  if (rule == Rule::Oja) {
    f(Y{}, N{}, N{});
  } else if (rule == Rule::Add) {
    if (eligible) f(N{}, Y{}, Y{}); else f(N{}, Y{}, N{});
  } else {
    if (eligible) f(N{}, N{}, Y{}); else f(N{}, N{}, N{});
  }
}

// mod, elig_rate: undefined when None (docs/op_spec.md, "Neuromodulation"); with elig_rate, h0 and
// H_T are (2, B, N_in, N_out) and the checkpoints (C, 2, B, N_in, N_out).
ForwardResult fused_forward(bool recurrent, const at::Tensor& pre, const at::Tensor& drive, const at::Tensor& w,
                            const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& h0, Rule rule, Act act,
                            c10::optional<double> clip, const Dims& d, const uint8_t* sp, const at::Tensor& mod,
                            const at::Tensor& elig_rate, int round_y = fused::kRoundNone) {
  const bool eligible = elig_rate.defined();
  at::Tensor y = at::empty({d.T, d.B, d.n_out}, drive.options());
  at::Tensor hT = at::empty_like(h0);
  std::vector<int64_t> ckpt_sizes{d.C};
  ckpt_sizes.insert(ckpt_sizes.end(), h0.sizes().begin(), h0.sizes().end());
  at::Tensor ckpts = at::empty(ckpt_sizes, h0.options());
  if (d.B == 0 || d.n_out == 0) {  // nothing to compute: y and the traces are empty
    hT.copy_(h0);
    return std::make_tuple(y, hT, ckpts);
  }
  AT_DISPATCH_FLOATING_TYPES(drive.scalar_type(), "plastic_forward_cuda_fused", [&] {
    const scalar_t* modp = mod.defined() ? mod.data_ptr<scalar_t>() : nullptr;
    const scalar_t* qp = eligible ? elig_rate.data_ptr<scalar_t>() : nullptr;
    dispatch_fused_trace<scalar_t>(h0.scalar_type(), sp, [&](auto trace_tag, auto steps_tag) {
      dispatch_rule(rule, eligible, [&](auto oja, auto add, auto elig) {
        fused_forward_impl<scalar_t, decltype(trace_tag), decltype(oja)::value, decltype(steps_tag)::value,
                           decltype(add)::value, decltype(elig)::value>(recurrent, pre, drive, w, alpha, e, h0, act,
                                                                        clip, d, y, hT, ckpts, sp, modp, qp,
                                                                        round_y);
      });
    });
  });
  return std::make_tuple(y, hT, ckpts);
}

// The gradients of (pre, drive, w, alpha, e, h0, mod, elig_rate); the last two are empty (0,) tensors
// when mod and elig_rate are None (undefined here).
BackwardResult fused_backward(bool recurrent, const at::Tensor& grad_y, const at::Tensor& grad_hT,
                              const at::Tensor& pre, const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& e,
                              const at::Tensor& y, const at::Tensor& ckpts, Rule rule, Act act,
                              c10::optional<double> clip, const Dims& d, const c10::optional<at::Tensor>& steps,
                              const uint8_t* sp, const at::Tensor& mod, const at::Tensor& elig_rate) {
  const auto opts = grad_y.options();
  const bool eligible = elig_rate.defined();
  // dL/dh0 has the shape of one checkpoint: (B, N_in, N_out), or (2, B, N_in, N_out) with eligibility
  const at::IntArrayRef trace_sizes = ckpts.sizes().slice(1);
  // two distinct empty tensors when None: outputs of an op must not alias
  at::Tensor g_mod = mod.defined() ? at::zeros(mod.sizes(), opts) : at::empty({0}, opts);
  at::Tensor g_q = eligible ? at::zeros(std::vector<int64_t>{}, opts) : at::empty({0}, opts);
  if (d.B == 0 || d.n_out == 0) {
    return std::make_tuple(at::zeros_like(pre), at::zeros({d.T, d.B, d.n_out}, opts), at::zeros_like(w),
                           at::zeros({d.n_in, d.n_out}, opts), at::zeros({d.T, d.B, d.n_out}, opts),
                           at::zeros(trace_sizes, ckpts.options()), g_mod, g_q);
  }
  const bool has_grad_hT = !is_zero_grad_marker(grad_hT);  // else no trace of zeros is built or read
  // G = dL/dH (and dL/dE) in the accumulation type (a bfloat16 trace's dL/dH_T is read as float once, and
  // dL/dH_0 rounded to bfloat16 at the end); every element of these is written by the kernels
  const auto acc = at::toOpMathType(grad_y.scalar_type());
  const at::Tensor grad_hT_acc = has_grad_hT && grad_hT.scalar_type() != acc ? grad_hT.to(acc) : grad_hT;
  at::Tensor G = at::empty(trace_sizes, ckpts.options().dtype(acc));
  at::Tensor g_pre = at::empty_like(pre);
  at::Tensor g_drive = at::empty({d.T, d.B, d.n_out}, opts);
  at::Tensor g_alpha = at::empty({d.n_in, d.n_out}, opts);
  at::Tensor g_e = at::empty({d.T, d.B, d.n_out}, opts);
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "plastic_backward_cuda_fused", [&] {
    const scalar_t* modp = mod.defined() ? mod.data_ptr<scalar_t>() : nullptr;
    const scalar_t* qp = eligible ? elig_rate.data_ptr<scalar_t>() : nullptr;
    dispatch_fused_trace<scalar_t>(ckpts.scalar_type(), sp, [&](auto trace_tag, auto steps_tag) {
      dispatch_rule(rule, eligible, [&](auto oja, auto add, auto elig) {
        fused_backward_impl<scalar_t, decltype(trace_tag), decltype(oja)::value, decltype(steps_tag)::value,
                            decltype(add)::value, decltype(elig)::value>(
            recurrent, grad_y, grad_hT_acc, has_grad_hT, pre, w, alpha, e, y, ckpts, act, clip, d, G, g_pre, g_drive,
            g_alpha, g_e, sp, modp, qp, g_mod, g_q);
      });
    });
  });
  // dL/dw = sum_t p_t^T ga_t: one GEMM over all steps. With flags, the rows of P that the forward did
  // not read are zeroed (a select, not a product): a skipped step's (its ga is 0, its input may be NaN
  // padding) and, in the recurrent form, a reset step's (p_t was the constant 0).
  at::Tensor P = recurrent ? at::cat({pre.unsqueeze(0), y.narrow(0, 0, d.T - 1)}, 0) : pre;
  if (sp != nullptr) {
    const int64_t unread = recurrent ? (kReset | kSkip) : kSkip;
    P = P.masked_fill(at::bitwise_and(*steps, unread).ne(0).unsqueeze(-1), 0);
  }
  at::Tensor g_w = at::mm(P.reshape({d.T * d.B, d.n_in}).t(), g_drive.view({d.T * d.B, d.n_out}));
  return std::make_tuple(g_pre, g_drive, g_w, g_alpha, g_e, G.to(ckpts.scalar_type()),  // a no-op but for bfloat16
                         g_mod.to(grad_y.scalar_type()), g_q.to(grad_y.scalar_type()));
}

// ------------------------------------------------------------------------------------------
// Op entry points.

// The fused kernels take float32 or float64 with a trace of the same dtype, and, with step flags or
// neuromodulation (with_options), float32 inputs with a bfloat16 trace; with these options, 16-bit
// inputs run on them from float32 copies (is_16bit below). Without them, 16-bit inputs and a bfloat16
// trace run on the previous kernels until the fused ones are instantiated for them.
bool fused_handles(at::ScalarType io, at::ScalarType trace, bool with_options) {
  if (io == trace && (io == at::kFloat || io == at::kDouble)) return true;
  return with_options && io == at::kFloat && trace == at::kBFloat16;
}

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// 16-bit inputs with step flags: the fused kernels on float32 copies. Unlike the other paths, y_t stays
// in float32 through the recurrence and is rounded once, when returned; the backward reads that rounded
// y, so its gradients are those of the other paths to about a unit of the 16-bit dtype (docs/cuda.md,
// "Step flags"). With neuromodulation the kernels round each y_t as they store it, as the other paths
// do (the rates of self-generated modulation, recomputed from y in the backward, must be the
// forward's). The gradients come back in each input's dtype.
at::Tensor as_float(const at::Tensor& t) { return is_16bit(t.scalar_type()) ? t.to(at::kFloat) : t; }

// as_float for an optional argument: an undefined tensor (None) stays undefined.
at::Tensor as_float_opt(const at::Tensor& t) { return t.defined() ? as_float(t) : t; }

// Neuromodulation (docs/op_spec.md, "Neuromodulation"): the rule "add", self-generated modulation
// (mod) and eligibility traces (elig_rate). Only the fused kernels implement them, as compile-time
// policies; the previous kernels (v1) refuse them, as they refuse the step flags. Returns whether any
// of them is asked for.
bool neuro_for_fused(Rule rule, const Neuro& n, at::ScalarType io, at::ScalarType trace) {
  if (!n.mod && !n.eligible && rule != Rule::Add) return false;
  std::string what;  // the options asked for
  auto name = [&](const char* s) { what += (what.empty() ? "" : ", ") + std::string(s); };
  if (rule == Rule::Add) name("rule 'add'");
  if (n.mod) name("mod: self-generated modulation");
  if (n.eligible) name("elig_rate: eligibility traces");
  TORCH_CHECK(use_fused_kernels(), "plastic_ops: neuromodulation (", what, ") needs the fused CUDA kernels (v2); "
              "unset PLASTIC_OPS_CUDA_KERNELS=v1");
  TORCH_CHECK(fused_handles(is_16bit(io) ? at::kFloat : io, trace, true),
              "plastic_ops: neuromodulation (", what, ") on CUDA needs the fused kernels, which take float32 or "
              "float64 inputs (and a trace of their dtype, or bfloat16 for float32); got ", io, " inputs with a ",
              trace, " trace");
  return true;
}

// The per-row step flags (docs/op_spec.md, "Episode resets and lengths"): None, or a contiguous (T, B)
// uint8 tensor on the op's device. Returns its data, or null without flags. Only the fused kernels
// take them: the previous kernels (v1) get no new features and refuse them. The flags are never read
// on the host (a call stays capturable in a CUDA graph), so other bits are not checked here.
const uint8_t* steps_for_fused(const c10::optional<at::Tensor>& steps, const Dims& d, const at::Tensor& like,
                               at::ScalarType io, at::ScalarType trace) {
  if (!check_steps(steps, d, like.device())) return nullptr;
  TORCH_CHECK(use_fused_kernels(), "plastic_ops: episode resets and lengths (steps) need the fused CUDA kernels "
              "(v2); unset PLASTIC_OPS_CUDA_KERNELS=v1");
  TORCH_CHECK(fused_handles(is_16bit(io) ? at::kFloat : io, trace, true),
              "plastic_ops: episode resets and lengths (steps) on CUDA need the "
              "fused kernels, which take float32 or float64 inputs (and a trace of their dtype, or bfloat16 for "
              "float32); got ", io, " inputs with a ", trace, " trace");
  return steps->data_ptr<uint8_t>();
}

void check_cuda(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "plastic_ops: the CUDA kernels got a tensor on ", t.device());
}

ForwardResult forward_cuda(bool recurrent, const at::Tensor& pre, const at::Tensor& drive, const at::Tensor& w,
                           const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& h0, c10::string_view rule_s,
                           c10::string_view act_s, c10::optional<double> clip, int64_t K,
                           const c10::optional<at::Tensor>& steps, const c10::optional<at::Tensor>& mod,
                           const c10::optional<at::Tensor>& elig_rate) {
  const Rule rule = parse_rule(to_string(rule_s));
  const Act act = parse_activation(to_string(act_s));
  const Neuro neuro = check_neuro(mod, elig_rate, rule, w.dim() == 2 ? w.size(1) : 0, drive, &h0);
  const Dims d = check_canonical(pre, drive, w, alpha, e, trace_plane(h0, neuro.eligible), clip, K, recurrent);
  check_cuda(drive);
  TORCH_CHECK(d.B <= kMaxGridYZ, "plastic_ops: the CUDA kernels support B <= ", kMaxGridYZ, ", got ", d.B);
  const c10::cuda::CUDAGuard guard(drive.device());
  const bool neuromod = neuro_for_fused(rule, neuro, drive.scalar_type(), h0.scalar_type());
  const at::Tensor mod_t = neuro.mod ? *mod : at::Tensor(), q_t = neuro.eligible ? *elig_rate : at::Tensor();
  const uint8_t* sp = steps_for_fused(steps, d, drive, drive.scalar_type(), h0.scalar_type());
  if ((sp != nullptr || neuromod) && is_16bit(drive.scalar_type())) {
    // with neuromodulation each y_t is rounded to the inputs' dtype in the kernels (round_stored); with
    // step flags alone it is rounded once, at the end
    const int round_y = !neuromod ? fused::kRoundNone
                        : drive.scalar_type() == at::kBFloat16 ? fused::kRoundBFloat16 : fused::kRoundHalf;
    auto out = fused_forward(recurrent, as_float(pre), as_float(drive), as_float(w), as_float(alpha), as_float(e), h0,
                             rule, act, clip, d, sp, as_float_opt(mod_t), as_float_opt(q_t), round_y);
    return std::make_tuple(std::get<0>(out).to(drive.scalar_type()), std::get<1>(out), std::get<2>(out));
  }
  if (sp != nullptr || neuromod ||
      (use_fused_kernels() && fused_handles(drive.scalar_type(), h0.scalar_type(), false))) {
    return fused_forward(recurrent, pre, drive, w, alpha, e, h0, rule, act, clip, d, sp, mod_t, q_t);
  }
  at::Tensor y = at::empty({d.T, d.B, d.n_out}, drive.options());
  at::Tensor hT = at::empty_like(h0);
  at::Tensor ckpts = at::empty({d.C, d.B, d.n_in, d.n_out}, h0.options());
  if (d.B == 0 || d.n_out == 0) {  // nothing to compute: y and the traces are empty
    hT.copy_(h0);
    return std::make_tuple(y, hT, ckpts);
  }
  // 16-bit inputs: computed from float copies, y in a float buffer (each y_t rounded to their dtype)
  const auto acc = at::toOpMathType(drive.scalar_type());
  at::Tensor y_acc = acc == y.scalar_type() ? y : at::empty(y.sizes(), y.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, drive.scalar_type(), "plastic_forward_cuda", [&] {
    dispatch_trace<scalar_t>(h0.scalar_type(), [&](auto trace_tag) {
      forward_impl<at::opmath_type<scalar_t>, decltype(trace_tag), scalar_t>(
          recurrent, pre.to(acc), drive.to(acc), w.to(acc), alpha.to(acc), e.to(acc), h0, rule, act, clip, d, y_acc,
          hT, ckpts);
    });
  });
  if (!y_acc.is_same(y)) y.copy_(y_acc);
  return std::make_tuple(y, hT, ckpts);
}

// The gradients of (pre, drive, w, alpha, e, h0) of the previous kernels; backward_cuda adds those of
// mod and elig_rate (empty: they refuse neuromodulation).
using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BackwardResult backward_cuda(bool recurrent, const at::Tensor& grad_y, const at::Tensor& grad_hT,
                             const at::Tensor& pre, const at::Tensor& w, const at::Tensor& alpha,
                             const at::Tensor& e, const at::Tensor& y, const at::Tensor& ckpts,
                             c10::string_view rule_s, c10::string_view act_s, c10::optional<double> clip,
                             int64_t K, const c10::optional<at::Tensor>& steps,
                             const c10::optional<at::Tensor>& mod, const c10::optional<at::Tensor>& elig_rate) {
  const Rule rule = parse_rule(to_string(rule_s));
  const Act act = parse_activation(to_string(act_s));
  const Neuro neuro = check_neuro(mod, elig_rate, rule, w.dim() == 2 ? w.size(1) : 0, grad_y, nullptr);
  const Dims d = check_backward(grad_y, grad_hT, pre, w, alpha, e, y, ckpts, clip, K, recurrent, neuro.eligible);
  check_cuda(grad_y);
  TORCH_CHECK(d.B <= kMaxGridYZ, "plastic_ops: the CUDA kernels support B <= ", kMaxGridYZ, ", got ", d.B);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const NoAutocast no_autocast;
  // the gradients of mod and elig_rate: empty when they are None
  auto with_none = [&](Grads6 g) {
    // two distinct empty tensors: outputs of an op must not alias
    return std::tuple_cat(std::move(g), std::make_tuple(at::empty({0}, grad_y.options()),
                                                        at::empty({0}, grad_y.options())));
  };
  const bool neuromod = neuro_for_fused(rule, neuro, grad_y.scalar_type(), ckpts.scalar_type());
  const at::Tensor mod_t = neuro.mod ? *mod : at::Tensor(), q_t = neuro.eligible ? *elig_rate : at::Tensor();
  const uint8_t* sp = steps_for_fused(steps, d, grad_y, grad_y.scalar_type(), ckpts.scalar_type());
  if ((sp != nullptr || neuromod) && is_16bit(grad_y.scalar_type())) {
    auto g = fused_backward(recurrent, as_float(grad_y), grad_hT, as_float(pre), as_float(w), as_float(alpha),
                            as_float(e), as_float(y), ckpts, rule, act, clip, d, steps, sp, as_float_opt(mod_t),
                            as_float_opt(q_t));
    const auto io = grad_y.scalar_type();  // the dtype of mod and elig_rate too
    return std::make_tuple(std::get<0>(g).to(pre.scalar_type()), std::get<1>(g).to(io),
                           std::get<2>(g).to(w.scalar_type()), std::get<3>(g).to(alpha.scalar_type()),
                           std::get<4>(g).to(e.scalar_type()), std::get<5>(g), std::get<6>(g).to(io),
                           std::get<7>(g).to(io));
  }
  if (sp != nullptr || neuromod ||
      (use_fused_kernels() && fused_handles(grad_y.scalar_type(), ckpts.scalar_type(), false))) {
    return fused_backward(recurrent, grad_y, grad_hT, pre, w, alpha, e, y, ckpts, rule, act, clip, d, steps, sp, mod_t,
                          q_t);
  }
  // Every gradient, dL/dH too, is accumulated in the inputs' accumulation type and returned in its
  // input's dtype (a no-op for float32 and float64 inputs with a trace of their dtype).
  const auto acc = at::toOpMathType(grad_y.scalar_type());
  const auto opts = grad_y.options().dtype(acc);
  auto out = [&](const at::Tensor& g_pre, const at::Tensor& g_drive, const at::Tensor& g_w, const at::Tensor& g_alpha,
                 const at::Tensor& g_e, const at::Tensor& G) {
    return with_none(std::make_tuple(g_pre.to(pre.scalar_type()), g_drive.to(grad_y.scalar_type()),
                                     g_w.to(w.scalar_type()), g_alpha.to(alpha.scalar_type()), g_e.to(e.scalar_type()),
                                     G.to(ckpts.scalar_type())));
  };

  // dL/dH_T, walked back to dL/dH_0 (zeros for the zero marker: the CUDA sweeps always read G)
  at::Tensor G = is_zero_grad_marker(grad_hT) ? at::zeros(ckpts.select(0, 0).sizes(), opts)
                                              : grad_hT.to(acc, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor g_pre = at::zeros(pre.sizes(), opts);
  at::Tensor g_drive = at::zeros({d.T, d.B, d.n_out}, opts);
  at::Tensor g_alpha = at::zeros({d.n_in, d.n_out}, opts);
  at::Tensor g_e = at::zeros({d.T, d.B, d.n_out}, opts);
  if (d.B == 0 || d.n_out == 0) {
    return out(g_pre, g_drive, at::zeros(w.sizes(), opts), g_alpha, g_e, G);
  }
  const at::Tensor pre_a = pre.to(acc), y_a = y.to(acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), "plastic_backward_cuda", [&] {
    dispatch_trace<scalar_t>(ckpts.scalar_type(), [&](auto trace_tag) {
      backward_impl<at::opmath_type<scalar_t>, decltype(trace_tag)>(
          recurrent, grad_y.to(acc), pre_a, w.to(acc), alpha.to(acc), e.to(acc), y_a, ckpts, rule, act, clip, d, G,
          g_pre, g_drive, g_alpha, g_e);
    });
  });
  // dL/dw = sum_t p_t^T ga_t: one GEMM over all steps.
  at::Tensor P = recurrent ? at::cat({pre_a.unsqueeze(0), y_a.narrow(0, 0, d.T - 1)}, 0) : pre_a;
  at::Tensor g_w = at::mm(P.reshape({d.T * d.B, d.n_in}).t(), g_drive.view({d.T * d.B, d.n_out}));
  return out(g_pre, g_drive, g_w, g_alpha, g_e, G);
}

}  // namespace
}  // namespace plastic_ops

TORCH_LIBRARY_IMPL(plastic_ops, CUDA, m) {
  plastic_ops::register_kernels<plastic_ops::forward_cuda, plastic_ops::backward_cuda>(m);
}
