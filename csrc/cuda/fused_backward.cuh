// The fused path's backward kernels: one pass over the trace per step (the drive half of step m+1
// and the update half of step m), the per-row finish of a step, and the last sum of dL/dalpha.
// Walk, thread mapping and traffic: docs/op_spec.md ("Backward") and docs/cuda.md ("The fused
// kernels"). Device code only.
#pragma once

#include "fused_common.cuh"

namespace plastic_ops {
namespace fused {

// One pass over (H_m, G). Thread (j, tile of kTile episodes from b0, split z) walks i in its split
// and, for each element of its tile, runs in registers:
//   UPDATE: Hpre_{m+1} = update(H_m) and H_{m+1} = stored_trace(Hpre_{m+1}), exactly as the forward.
//   DRIVE (step tb = m+1 with UPDATE, else tb = m and H_tb = H_m): G += alpha p_tb ga_tb (completing
//     dL/dH_tb); the tile's sum of p_tb ga_tb H_tb goes to dalpha_part[tile, i, j] (this thread's own
//     slot, over all steps); ga (w + alpha H_tb) is summed over j into dp_b (dL/dp_tb).
//   UPDATE: through the clamp and the update of step m: G becomes the trace path of dL/dH_m; sums
//     over i of dL/de_m and of the update's dL/dy_m go to de_part/dy_part[z, b, j]; G e y is summed
//     over j into dp_a (dL/dp_m).
// Sums over j: per i, the warp adds its 32 lanes with warp_sum_many and one lane writes slot
// [b, warp, i] of dp_a (set) or dp_b (set, or added to the update's part when dp_b_add): every slot
// has one writer per pass, and dp_a and dp_b are different buffers. G = dL/dH is kept in acc_t (trace_t
// itself for a float or double trace; float for a bfloat16 one, rounded once at the end). Gin may be
// Gout (in place, the next row loaded before this row is stored); g_zero: G is zero and Gin is not read.
// STEPS: f_a and f_b are the flag rows (B bytes) of steps m and tb, read once per episode of the tile.
// H_m in memory is the trace carried into step m (before its RESET), as the forward keeps it. A RESET
// of step m runs its update half on H = 0 (and p_m = 0 when zero_pre: the recurrent form); a SKIP of
// step m passes G through with no other term. The drive half of step tb uses H = 0 (and p_tb = 0 when
// zero_pre) under a RESET of tb and adds nothing under its SKIP; after it a RESET of tb zeroes G (the
// old trace was overwritten). The sums toward dL/dp of a step that is skipped, or reset in the
// recurrent form, are zero (its pre was the constant 0 there).
// ADD, ELIG: the neuromodulation options (docs/op_spec.md, "Neuromodulation"); e_a holds the rates r_m.
// ADD: the update half has no decay (G passes through the update unchanged). ELIG: Hm and Gin/Gout hold
// two planes at an offset of B * N_in * N_out, (H_m, E_m) and (G, F = dL/dE); the update half takes
// the increment E_m and runs the eligibility update backward: F becomes dL/dE_m = Gp r + F (1 - q),
// F q p is summed over i into dy_part and F q y over j toward dL/dp_m, and the sum over i of
// F p y - F E_m (dL/dq) is added to this thread's own slot dq_part[z, tile, j] (over all passes). A
// RESET of tb zeroes F with G; a SKIP of m passes both; the drive half alone passes F on.
template <typename scalar_t, typename trace_t, bool OJA, bool DRIVE, bool UPDATE, bool STEPS, bool ADD = false,
          bool ELIG = false>
__global__ void __launch_bounds__(kThreads) fused_backward_pass_kernel(
    const trace_t* __restrict__ Hm, const acc_type<scalar_t>* Gin, acc_type<scalar_t>* Gout, bool g_zero,
    const scalar_t* __restrict__ p_a, const scalar_t* __restrict__ y_a, const scalar_t* __restrict__ e_a,
    acc_type<scalar_t>* __restrict__ de_part, acc_type<scalar_t>* __restrict__ dy_part,
    acc_type<scalar_t>* __restrict__ dp_a, const scalar_t* __restrict__ p_b, const scalar_t* __restrict__ ga_b,
    const scalar_t* __restrict__ w, const scalar_t* __restrict__ alpha, acc_type<scalar_t>* __restrict__ dalpha_part,
    acc_type<scalar_t>* __restrict__ dp_b, bool dp_b_add, int64_t B, int64_t n_in, int64_t n_out, int64_t n_warps_j,
    int64_t chunk, bool has_clip, acc_type<scalar_t> clip, const uint8_t* __restrict__ f_a,
    const uint8_t* __restrict__ f_b, bool zero_pre, const scalar_t* __restrict__ q_rate,
    acc_type<scalar_t>* __restrict__ dq_part) {
  using acc_t = acc_type<scalar_t>;
  constexpr int NV = (DRIVE ? kTile : 0) + (UPDATE ? kTile : 0);  // values summed over j per i
  constexpr int kLanesPerValue = 32 / NV;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = j < n_out;  // threads past N_out stay for the warp sums
  const int64_t jw = j >> 5;
  const int lane = threadIdx.x & 31;
  // the lane that ends with the sum of value `mine` writes it (warps wholly past N_out write nothing)
  const int mine = lane / kLanesPerValue;
  const bool writes = lane % kLanesPerValue == 0 && jw < n_warps_j;
  const int64_t tile = blockIdx.y;
  const int64_t b0 = tile * kTile;
  const int nb = static_cast<int>(B - b0 < kTile ? B - b0 : kTile);
  const int64_t z = blockIdx.z;
  const int64_t i0 = z * chunk;
  const int64_t i1 = i0 + chunk < n_in ? i0 + chunk : n_in;
  const int64_t plane = n_in * n_out;
  const int64_t eo = B * plane;  // offset of the E and F planes
  const acc_t q = ELIG && UPDATE ? static_cast<acc_t>(*q_rate) : acc_t(0);
  acc_t dq = 0;

  acc_t ya[kTile], ea[kTile], gab[kTile], de[kTile], dy[kTile];
  trace_t h_next[kTile], e_next[kTile];
  acc_t g_next[kTile], f_next[kTile];
  uint8_t fa[kTile], fb[kTile];
#pragma unroll
  for (int k = 0; k < kTile; ++k) {
    ya[k] = ea[k] = gab[k] = de[k] = dy[k] = acc_t(0);
    h_next[k] = e_next[k] = trace_t(0);
    g_next[k] = f_next[k] = acc_t(0);
    fa[k] = fb[k] = 0;
    if (valid && k < nb) {
      if (STEPS) {
        if (UPDATE) fa[k] = f_a[b0 + k];
        if (DRIVE) fb[k] = f_b[b0 + k];
      }
      const int64_t c = (b0 + k) * n_out + j;
      if (UPDATE) {
        ya[k] = static_cast<acc_t>(y_a[c]);
        ea[k] = static_cast<acc_t>(e_a[c]);
      }
      if (DRIVE) gab[k] = static_cast<acc_t>(ga_b[c]);
      if (i0 < i1) {
        const int64_t o = (b0 + k) * plane + i0 * n_out + j;
        h_next[k] = Hm[o];
        if (!g_zero) g_next[k] = Gin[o];
        if (ELIG) {
          if (UPDATE) e_next[k] = Hm[eo + o];
          if (!g_zero) f_next[k] = Gin[eo + o];
        }
      }
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    trace_t h_cur[kTile], e_cur[kTile];
    acc_t g_cur[kTile], f_cur[kTile];
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      h_cur[k] = h_next[k];
      g_cur[k] = g_next[k];
      e_cur[k] = e_next[k];
      f_cur[k] = f_next[k];
      if (valid && k < nb && i + 1 < i1) {
        const int64_t o = (b0 + k) * plane + (i + 1) * n_out + j;
        h_next[k] = Hm[o];
        if (!g_zero) g_next[k] = Gin[o];
        if (ELIG) {
          if (UPDATE) e_next[k] = Hm[eo + o];
          if (!g_zero) f_next[k] = Gin[eo + o];
        }
      }
    }
    const int64_t wo = i * n_out + j;
    const acc_t wv = DRIVE && valid ? static_cast<acc_t>(w[wo]) : acc_t(0);
    const acc_t av = DRIVE && valid ? static_cast<acc_t>(alpha[wo]) : acc_t(0);
    acc_t sums[NV];
    acc_t da = 0;
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      acc_t sb = 0, sa = 0;
      if (valid && k < nb) {
        const int64_t r = (b0 + k) * n_in + i;
        acc_t h = static_cast<acc_t>(h_cur[k]);
        acc_t g = g_zero ? acc_t(0) : g_cur[k];
        acc_t el = ELIG ? static_cast<acc_t>(e_cur[k]) : acc_t(0);
        acc_t f = ELIG && !g_zero ? f_cur[k] : acc_t(0);
        acc_t pa = UPDATE ? static_cast<acc_t>(p_a[r]) : acc_t(0);
        if (STEPS && UPDATE && (fa[k] & kReset)) {  // step m ran on H = 0, E = 0 (and p = 0)
          h = acc_t(0);
          el = acc_t(0);
          if (zero_pre) pa = acc_t(0);
        }
        const bool skip_a = STEPS && UPDATE && (fa[k] & kSkip);
        const acc_t hpre = UPDATE ? neuro_trace<OJA, ADD, ELIG>(h, pa, ya[k], ea[k], el) : h;
        // H_tb, as the forward had it
        const acc_t hb = UPDATE ? (skip_a ? h : stored_trace<trace_t>(hpre, has_clip, clip)) : h;
        if (DRIVE && !(STEPS && (fb[k] & kSkip))) {
          acc_t hd = hb, pb = static_cast<acc_t>(p_b[r]);
          if (STEPS && (fb[k] & kReset)) {
            hd = acc_t(0);
            if (zero_pre) pb = acc_t(0);
          }
          const acc_t pg = pb * gab[k];
          g += pg * av;  // products in the reference's order (see fused_forward_sweep_kernel)
          da += pg * hd;
          sb = gab[k] * wv + gab[k] * (av * hd);
          if (STEPS && zero_pre && (fb[k] & kReset)) sb = acc_t(0);
        }
        if (STEPS && DRIVE && (fb[k] & kReset)) {  // nothing flows into the traces before tb
          g = acc_t(0);
          f = acc_t(0);
        }
        if (UPDATE && !skip_a) {
          if (has_clip && !(hpre >= -clip && hpre <= clip)) g = acc_t(0);
          const acc_t yv = ya[k], ev = ea[k];
          // Terms kept apart as autograd keeps them on the reference (no factoring), so an infinite
          // g gives inf - inf = NaN exactly where the reference does.
          if (ELIG) {
            // H: Hpre = h + r E (ADD) or (1 - r) h + r E; E_{m+1} = (1 - q) E + q p y
            de[k] += ADD ? g * el : g * el - g * h;
            dq += f * (pa * yv) - f * el;
            dy[k] += f * q * pa;
            sa = f * q * yv;
            f = g * ev + f * (acc_t(1) - q);
            if (!ADD) g = g * (acc_t(1) - ev);
          } else if (ADD) {
            de[k] += g * (pa * yv);
            dy[k] += g * ev * pa;
            sa = g * ev * yv;
          } else if (OJA) {
            const acc_t gey = g * ev * yv;
            de[k] += g * yv * (pa - h * yv);
            dy[k] += g * ev * (pa - h * yv) - gey * h;
            sa = g * ev * yv;
            g = g - gey * yv;
          } else {
            de[k] += g * (pa * yv) - g * h;
            dy[k] += g * ev * pa;
            sa = g * ev * yv;
            g = g * (acc_t(1) - ev);
          }
          if (STEPS && zero_pre && (fa[k] & kReset)) sa = acc_t(0);
        }
        Gout[(b0 + k) * plane + wo] = g;
        if (ELIG) Gout[eo + (b0 + k) * plane + wo] = f;
      }
      if (DRIVE) sums[k] = sb;
      if (UPDATE) sums[(DRIVE ? kTile : 0) + k] = sa;
    }
    const acc_t total = warp_sum_many<NV>(sums);
    if (writes) {
      const int k = DRIVE && mine >= kTile ? mine - kTile : mine;
      const bool is_drive = DRIVE && mine < kTile;
      if (k < nb) {
        const int64_t slot = ((b0 + k) * n_warps_j + jw) * n_in + i;
        if (is_drive) {
          dp_b[slot] = dp_b_add ? dp_b[slot] + total : total;
        } else {
          dp_a[slot] = total;
        }
      }
    }
    if (DRIVE && valid) dalpha_part[tile * plane + wo] += da;
  }
  if (UPDATE && valid) {
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      if (k >= nb) continue;
      const int64_t c = (z * B + b0 + k) * n_out + j;
      de_part[c] = de[k];
      dy_part[c] = dy[k];
    }
    if (ELIG) dq_part[(z * gridDim.y + tile) * n_out + j] += dq;
  }
}

// The end of a step, one block per row b:
//   dp_out (when not null): dL/dp[b, i] = sum over the warp slots of dp_slots[b, :, i], in order
//     (the linear form's dL/dx_t, or dL/dy0 at the end of the recurrent form);
//   with act_step, step m's activation: the total dL/dy_m = grad_y_m + (carry: the recurrent form's
//     dL/dp_{m+1}, summed from dp_slots[b, :, j]) + (has_update: the update's part, the S splits of
//     dy_part in order); dL/de_m from de_part; ga_m = act'(dL/dy_m), which is dL/d(drive_m).
// Softmax keeps the total dL/dy_m in dy_part[0, b, :] (in acc_t) until sum_k g_k y_k is known; each
// thread rewrites only the entries it has read. STEPS: a row whose flags f_m[b] have SKIP had the
// constant y_m = 0: ga_m and dL/de_m are zero there, grad_y_m is ignored.
// MOD (self-generated modulation, docs/op_spec.md, "Neuromodulation"): the sum of de_part is dL/dr_m;
// with s = s_m[b] and M = modulation_factor(s), dL/dM = dL/dr_m e_m goes to dM_m, dL/de_m = dL/dr_m M,
// dz = (sum_j dL/dM[j] mod_fanout_weight[j]) (1 - s^2) (a block sum) goes to dz_m[b], and
// dz mod_weight[j] joins the total dL/dy_m before act'. A skipped row gets dM = 0 and dz = 0.
template <typename scalar_t, bool STEPS, bool MOD = false>
__global__ void fused_step_finish_kernel(const acc_type<scalar_t>* __restrict__ dp_slots, int64_t n_warps_j,
                                         int64_t n_in, scalar_t* __restrict__ dp_out, bool carry, bool act_step,
                                         acc_type<scalar_t>* __restrict__ dy_part,
                                         const acc_type<scalar_t>* __restrict__ de_part, int64_t n_split,
                                         bool has_update, const scalar_t* __restrict__ grad_y_m,
                                         const scalar_t* __restrict__ y_m, scalar_t* __restrict__ ga_m,
                                         scalar_t* __restrict__ ge_m, int64_t B, int64_t n_out, int act,
                                         const uint8_t* __restrict__ f_m, const scalar_t* __restrict__ e_m,
                                         const acc_type<scalar_t>* __restrict__ s_m,
                                         const scalar_t* __restrict__ mod, acc_type<scalar_t>* __restrict__ dM_m,
                                         acc_type<scalar_t>* __restrict__ dz_m) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t shm[32];
  const int64_t b = blockIdx.x;
  const acc_t* slots = dp_slots + b * n_warps_j * n_in;
  if (dp_out != nullptr) {
    for (int64_t i = threadIdx.x; i < n_in; i += blockDim.x) {
      acc_t s = 0;
      for (int64_t k = 0; k < n_warps_j; ++k) s += slots[k * n_in + i];
      dp_out[b * n_in + i] = static_cast<scalar_t>(s);
    }
  }
  if (!act_step) return;  // uniform over the block
  if (STEPS && (f_m[b] & kSkip)) {  // uniform over the block
    for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
      ga_m[b * n_out + j] = scalar_t(0);
      ge_m[b * n_out + j] = scalar_t(0);
      if (MOD) dM_m[b * n_out + j] = acc_t(0);
    }
    if (MOD && threadIdx.x == 0) dz_m[b] = acc_t(0);
    return;
  }
  acc_t dz = 0;
  if (MOD) {
    const acc_t sv = s_m[b];
    acc_t ds = 0;
    for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
      const int64_t r = b * n_out + j;
      acc_t dr = 0, dM = 0, ge = 0;
      if (has_update) {  // else dL/dr_m is zero (no gradient reached step m's update)
        for (int64_t z = 0; z < n_split; ++z) dr += de_part[z * B * n_out + r];
        dM = dr * static_cast<acc_t>(e_m[r]);
        ge = dr * modulation_factor(mod, n_out, j, sv);
      }
      ge_m[r] = static_cast<scalar_t>(ge);
      dM_m[r] = dM;
      ds += dM * static_cast<acc_t>(mod[n_out + j]);
    }
    ds = block_all_reduce<false>(ds, shm);
    dz = ds * (acc_t(1) - sv * sv);
    if (threadIdx.x == 0) dz_m[b] = dz;
  }
  const bool softmax = static_cast<Act>(act) == Act::Softmax;
  acc_t dot = 0;
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
    const int64_t r = b * n_out + j;
    acc_t g = static_cast<acc_t>(grad_y_m[r]);
    if (carry) {
      acc_t s = 0;
      for (int64_t k = 0; k < n_warps_j; ++k) s += slots[k * n_in + j];
      g += s;
    }
    acc_t se = 0;
    if (has_update) {
      for (int64_t z = 0; z < n_split; ++z) {
        g += dy_part[z * B * n_out + r];
        if (!MOD) se += de_part[z * B * n_out + r];
      }
    }
    if (MOD) {
      g += dz * static_cast<acc_t>(mod[j]);  // the modulation's own dL/dy_m
    } else {
      ge_m[r] = static_cast<scalar_t>(se);
    }
    const acc_t yv = static_cast<acc_t>(y_m[r]);
    if (softmax) {
      dy_part[r] = g;
      dot += g * yv;
    } else {
      ga_m[r] = static_cast<scalar_t>(act_backward_elementwise(g, yv, act));
    }
  }
  if (!softmax) return;  // uniform over the block
  dot = block_all_reduce<false>(dot, shm);
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) {
    const int64_t r = b * n_out + j;
    ga_m[r] = static_cast<scalar_t>(static_cast<acc_t>(y_m[r]) * (dy_part[r] - dot));
  }
}

// dL/dalpha[i, j] = sum over the episode tiles of dalpha_part[tile, i, j], in tile order.
template <typename scalar_t>
__global__ void fused_dalpha_reduce_kernel(const acc_type<scalar_t>* __restrict__ dalpha_part, int64_t n_tiles,
                                           int64_t numel, scalar_t* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= numel) return;
  acc_type<scalar_t> s = 0;
  for (int64_t k = 0; k < n_tiles; ++k) s += dalpha_part[k * numel + r];
  out[r] = static_cast<scalar_t>(s);
}

}  // namespace fused
}  // namespace plastic_ops
