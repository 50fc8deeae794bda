// CPU kernels of the plastic op: fused forward over the whole sequence and the
// checkpointed BPTT backward. The math, the sweep structure and the parallel
// layout are described once in docs/op_spec.md; comments here say only why.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../plastic_common.h"

namespace plastic_ops {
namespace {

// Each task owns a contiguous range of presynaptic rows i, for every episode b, and
// walks whole trace rows H[b, i, :]: every access is a sequential stream. Sums over i
// (a_t, dL/de_t, dL/dy_t) go to one small (B, N_out) partial per task, added up after
// the sweep; sums over j (dL/dp_t) and over b (dL/dalpha) have a single writer.
struct Split {
  int64_t tasks, rows_per_task;
  int64_t begin(int64_t k, int64_t n) const { return std::min(n, k * rows_per_task); }
  int64_t end(int64_t k, int64_t n) const { return std::min(n, (k + 1) * rows_per_task); }
};

// Small traces run on one thread: a fork-join per sweep costs more than the sweep.
constexpr int64_t kMinElementsPerTask = 1 << 15;

Split make_split(const Dims& d) {
  const int64_t by_work = (d.B * d.n_in * d.n_out) / kMinElementsPerTask;
  const int64_t tasks = std::max<int64_t>(1, std::min({by_work, (int64_t)at::get_num_threads(), d.n_in}));
  return {tasks, (d.n_in + tasks - 1) / tasks};
}

// out[r] = base[r] + sum_k partial[k][r], over n entries (base may alias out).
template <typename scalar_t>
void add_partials(scalar_t* out, const scalar_t* base, const scalar_t* partial, int64_t tasks, int64_t n) {
  for (int64_t r = 0; r < n; ++r) {
    scalar_t v = base[r];
    for (int64_t k = 0; k < tasks; ++k) v += partial[k * n + r];
    out[r] = v;
  }
}

template <Rule R>
using RuleTag = std::integral_constant<Rule, R>;

// Calls f(RuleTag, bool_constant<clip>) so that the inner loops see both as constants.
template <typename F>
void dispatch_rule(Rule rule, bool clip, F&& f) {
  if (rule == Rule::Hebb) {
    if (clip) f(RuleTag<Rule::Hebb>{}, std::true_type{}); else f(RuleTag<Rule::Hebb>{}, std::false_type{});
  } else if (rule == Rule::Oja) {
    if (clip) f(RuleTag<Rule::Oja>{}, std::true_type{}); else f(RuleTag<Rule::Oja>{}, std::false_type{});
  } else {
    if (clip) f(RuleTag<Rule::Add>{}, std::true_type{}); else f(RuleTag<Rule::Add>{}, std::false_type{});
  }
}

// Calls f(bool_constant<flag>): the flags of `steps` are a compile-time policy, so that a call
// without them runs the same code, at the same speed, as before they existed.
template <typename F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) f(std::true_type{}); else f(std::false_type{});
}

// The row loops below are compiled twice: for the baseline x86-64 ISA and for AVX2, picked
// at run time when the CPU has it (and PLASTIC_OPS_NO_AVX2 is unset): twice the SIMD width
// where a loop is bound by compute rather than memory. AVX2 without FMA: every lane does
// the same IEEE operations as in the baseline build (no contraction), so the traces and
// their recompute are bit-identical whichever version runs.
#if defined(__GNUC__) && defined(__x86_64__)
#define PLASTIC_OPS_TARGET_AVX2 __attribute__((target("avx2")))
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("PLASTIC_OPS_NO_AVX2") == nullptr;
  return has;
}
#else
#define PLASTIC_OPS_TARGET_AVX2
inline bool cpu_has_avx2() { return false; }
#endif
#if defined(__GNUC__)
#define PLASTIC_OPS_INLINE inline __attribute__((always_inline))
#define PLASTIC_OPS_NOINLINE __attribute__((noinline))
#else
#define PLASTIC_OPS_INLINE inline
#define PLASTIC_OPS_NOINLINE
#endif

// Hpre_{t+1} from H_t (before the clamp), with the rate e = r_t. ELIG: the increment is the
// eligibility trace E_t (ev) instead of p y (docs/op_spec.md, "Neuromodulation"; no Oja form).
template <Rule R, bool ELIG = false, typename scalar_t>
PLASTIC_OPS_INLINE scalar_t updated(scalar_t h, scalar_t p, scalar_t y, scalar_t e, scalar_t ev = scalar_t(0)) {
  if constexpr (ELIG) {
    static_assert(R != Rule::Oja, "Oja's rule has no eligibility-trace form");
    if constexpr (R == Rule::Hebb) return (scalar_t(1) - e) * h + e * ev;
    else return h + e * ev;
  } else if constexpr (R == Rule::Hebb) {
    return (scalar_t(1) - e) * h + e * p * y;
  } else if constexpr (R == Rule::Add) {
    return h + e * (p * y);
  } else {
    return h + e * y * (p - h * y);
  }
}

// E_{t+1} from E_t (before rounding to the trace's dtype; never clamped).
template <typename scalar_t>
PLASTIC_OPS_INLINE scalar_t elig_updated(scalar_t ev, scalar_t p, scalar_t y, scalar_t q) {
  return (scalar_t(1) - q) * ev + q * (p * y);
}

// Policies of the options that are off in a plain call, so that such a call runs the code it ran
// before they existed: ELIG, the eligibility trace (a second trace plane E next to H).
// Oja's rule has no eligibility form (refused by check_neuro): it is never instantiated with it.
template <Rule R, typename F>
void dispatch_elig(RuleTag<R>, bool elig, F&& f) {
  if constexpr (R == Rule::Oja) {
    f(std::false_type{});
  } else {
    if (elig) f(std::true_type{}); else f(std::false_type{});
  }
}

// NaN stays NaN, as with torch.clamp (every comparison with NaN is false).
template <typename scalar_t>
PLASTIC_OPS_INLINE scalar_t clamp(scalar_t h, scalar_t c) {
  return h < -c ? -c : (h > c ? c : h);
}

// Reading and writing a stored trace value. bfloat16 is converted with plain integer operations
// (c10::BFloat16's own conversion branches on NaN, which keeps the row loops from vectorizing):
// round to nearest even, NaN to the canonical NaN, as torch's .to(torch.bfloat16).
PLASTIC_OPS_INLINE uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
PLASTIC_OPS_INLINE float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
PLASTIC_OPS_INLINE uint32_t bf16_rounded_bits(float v) {
  const uint32_t u = float_bits(v);
  return v != v ? 0x7FC00000u : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}

// g where -c <= hpre <= c, else +0 (NaN hpre included): the clamp's gradient mask. Written as an
// integer AND rather than a select of g or 0 (the same bits), which GCC leaves as a branch that keeps
// the whole row loop from vectorizing.
template <typename scalar_t>
PLASTIC_OPS_INLINE scalar_t clamp_mask(scalar_t g, scalar_t hpre, scalar_t c) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "float or double");
  const bits_t m = bits_t(0) - static_cast<bits_t>((hpre >= -c) & (hpre <= c));
  bits_t u;
  std::memcpy(&u, &g, sizeof u);
  u &= m;
  std::memcpy(&g, &u, sizeof u);
  return g;
}

template <typename acc_t, typename T>
PLASTIC_OPS_INLINE acc_t load(T v) {
  if constexpr (std::is_same<T, c10::BFloat16>::value && std::is_same<acc_t, float>::value) {
    return bits_float(static_cast<uint32_t>(v.x) << 16);
  } else {
    return static_cast<acc_t>(v);
  }
}

// v, already rounded to T (round_to), as stored.
template <typename T, typename acc_t>
PLASTIC_OPS_INLINE T store(acc_t v) {
  if constexpr (std::is_same<T, c10::BFloat16>::value && std::is_same<acc_t, float>::value) {
    return c10::BFloat16(static_cast<uint16_t>(float_bits(v) >> 16), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// v rounded to the storage type T and read back: what is stored of a 16-bit trace or output
// (docs/op_spec.md, "Dtypes"). A no-op when T is the accumulation type itself.
template <typename T, typename acc_t>
PLASTIC_OPS_INLINE acc_t round_to(acc_t v) {
  if constexpr (std::is_same<T, acc_t>::value) {
    return v;
  } else if constexpr (std::is_same<T, c10::BFloat16>::value && std::is_same<acc_t, float>::value) {
    return bits_float(bf16_rounded_bits(v));
  } else {
    return static_cast<acc_t>(static_cast<T>(v));
  }
}

// Views of the canonical tensors of one call, shared by forward and backward.
template <typename scalar_t>
struct Problem {
  Dims d;
  bool recurrent;
  const scalar_t* x;   // (T,B,N_in), linear form
  const scalar_t* y0;  // (B,N), recurrent form
  const scalar_t* w;
  const scalar_t* alpha;
  const scalar_t* e;
  const scalar_t* y;  // (T,B,N_out): outputs (written by forward, read by backward)
  scalar_t clip;
  const uint8_t* steps;  // (T,B) flags kReset / kSkip, or nullptr
  // With eligibility traces every trace buffer holds two planes, H then E: the E row of a trace
  // row H[b, i, :] is eplane elements further. q: the eligibility rate.
  int64_t eplane = 0;
  scalar_t q = 0;

  // pre is x (linear form) or y0 (recurrent form).
  static Problem make(const Dims& d, bool recurrent, const at::Tensor& pre, const at::Tensor& w,
                      const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y, c10::optional<double> clip,
                      const at::Tensor* steps) {
    return {d,
            recurrent,
            recurrent ? nullptr : pre.data_ptr<scalar_t>(),
            recurrent ? pre.data_ptr<scalar_t>() : nullptr,
            w.data_ptr<scalar_t>(),
            alpha.data_ptr<scalar_t>(),
            e.data_ptr<scalar_t>(),
            y.data_ptr<scalar_t>(),
            static_cast<scalar_t>(clip.value_or(0.0)),
            steps ? steps->data_ptr<uint8_t>() : nullptr};
  }

  // p_t: the presynaptic vector of step t, (B, N_in).
  const scalar_t* pre(int64_t t) const {
    if (!recurrent) return x + t * d.B * d.n_in;
    return t == 0 ? y0 : y + (t - 1) * d.B * d.n_out;
  }
  const scalar_t* y_at(int64_t t) const { return y + t * d.B * d.n_out; }
  const scalar_t* e_at(int64_t t) const { return e + t * d.B * d.n_out; }
  const uint8_t* flags(int64_t t) const { return steps + t * d.B; }
  // p_t[b, i] as step t reads it: a RESET zeroes the recurrent input (the linear form's x_t stays).
  scalar_t pre_of(scalar_t p, uint8_t f) const { return recurrent && (f & kReset) ? scalar_t(0) : p; }
};

// A trace row of zeros: what a RESET row reads instead of its carried trace.
template <typename trace_t>
std::vector<trace_t> zero_row(int64_t n) {
  return std::vector<trace_t>(n, store<trace_t>(at::opmath_type<trace_t>(0)));
}

template <typename scalar_t>
void activate_rows(const scalar_t* a, scalar_t* y, int64_t B, int64_t n, Act act) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* ar = a + b * n;
    scalar_t* yr = y + b * n;
    switch (act) {
      case Act::Tanh: for (int64_t j = 0; j < n; ++j) yr[j] = std::tanh(ar[j]); break;
      case Act::Sigmoid: for (int64_t j = 0; j < n; ++j) yr[j] = scalar_t(1) / (scalar_t(1) + std::exp(-ar[j])); break;
      // written so that NaN passes through, as with torch.relu
      case Act::Relu: for (int64_t j = 0; j < n; ++j) yr[j] = ar[j] < 0 ? scalar_t(0) : ar[j]; break;
      case Act::Identity: for (int64_t j = 0; j < n; ++j) yr[j] = ar[j]; break;
      case Act::Softmax: {
        scalar_t m = ar[0];
        for (int64_t j = 1; j < n; ++j) m = std::max(m, ar[j]);
        scalar_t s = 0;
        for (int64_t j = 0; j < n; ++j) { yr[j] = std::exp(ar[j] - m); s += yr[j]; }
        for (int64_t j = 0; j < n; ++j) yr[j] /= s;
        break;
      }
    }
  }
}

// ga = act'(a) * g, written from y alone (no pre-activation is kept).
template <typename scalar_t>
void activation_backward(const scalar_t* g, const scalar_t* y, scalar_t* ga, int64_t B, int64_t n, Act act) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* gr = g + b * n;
    const scalar_t* yr = y + b * n;
    scalar_t* out = ga + b * n;
    switch (act) {
      case Act::Tanh: for (int64_t j = 0; j < n; ++j) out[j] = gr[j] * (scalar_t(1) - yr[j] * yr[j]); break;
      case Act::Sigmoid: for (int64_t j = 0; j < n; ++j) out[j] = gr[j] * yr[j] * (scalar_t(1) - yr[j]); break;
      // torch's mask: zero where y <= 0, the gradient elsewhere (NaN included)
      case Act::Relu: for (int64_t j = 0; j < n; ++j) out[j] = yr[j] <= 0 ? scalar_t(0) : gr[j]; break;
      case Act::Identity: for (int64_t j = 0; j < n; ++j) out[j] = gr[j]; break;
      case Act::Softmax: {
        scalar_t dot = 0;
        for (int64_t j = 0; j < n; ++j) dot += gr[j] * yr[j];
        for (int64_t j = 0; j < n; ++j) out[j] = yr[j] * (gr[j] - dot);
        break;
      }
    }
  }
}

// Self-generated modulation of one step (docs/op_spec.md, "Neuromodulation"): from y_t (B, n),
// s_t[b] = tanh(sum_k y_t[b,k] mw[k] + mb), M_t = fw s_t + fb and the rates r_t = e_t M_t.
// mod: (4, n), rows mw, fw, fb, and mb at [3, 0]. s and M may be nullptr. One function, never
// inlined, summing over k in one fixed order: the forward and the backward, which recomputes r_t
// from the stored y_t, get the same bits (and so the same recomputed traces and clamp masks).
template <typename scalar_t>
PLASTIC_OPS_NOINLINE void self_modulation(const scalar_t* y, const scalar_t* e, const scalar_t* mod, scalar_t* s,
                                          scalar_t* M, scalar_t* r, int64_t B, int64_t n) {
  const scalar_t* mw = mod;
  const scalar_t* fw = mod + n;
  const scalar_t* fb = mod + 2 * n;
  const scalar_t mb = mod[3 * n];
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* yr = y + b * n;
    scalar_t z = 0;
    for (int64_t k = 0; k < n; ++k) z += yr[k] * mw[k];
    const scalar_t sv = std::tanh(z + mb);
    if (s != nullptr) s[b] = sv;
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t mv = fw[j] * sv + fb[j];
      if (M != nullptr) M[b * n + j] = mv;
      r[b * n + j] = e[b * n + j] * mv;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward

// H_{t+1} from Hpre_{t+1}: the forward and the backward's recompute both go through
// `updated` then `clamped`, so recomputed traces and clamp masks are bit-identical.
template <bool CLIP, typename scalar_t>
PLASTIC_OPS_INLINE scalar_t clamped(scalar_t hpre, scalar_t c) {
  if constexpr (CLIP) return clamp(hpre, c);
  return hpre;
}

// One trace row of forward_sweep: hd = H_t from hs = H_{t-1} (UPDATE), acc += terms of a_t.
// ELIG: with UPDATE, also ed = E_t from es = E_{t-1}, and H_t takes E_{t-1} as its increment.
template <typename scalar_t, typename trace_t, Rule R, bool CLIP, bool UPDATE, bool ACCUM, bool ELIG>
PLASTIC_OPS_INLINE void forward_row(const trace_t* hs, trace_t* hd, scalar_t pp, const scalar_t* yr,
                                    const scalar_t* er, scalar_t pc, const scalar_t* wr, const scalar_t* ar,
                                    scalar_t* accr, int64_t n, scalar_t c, const trace_t* es, trace_t* ed,
                                    scalar_t q) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    scalar_t h = load<scalar_t>(hs[j]);
    if constexpr (UPDATE) {
      // the stored (rounded) H_t is the one used below and recomputed by the backward
      if constexpr (ELIG) {
        const scalar_t ev = load<scalar_t>(es[j]);
        h = round_to<trace_t>(clamped<CLIP>(updated<R, true>(h, pp, yr[j], er[j], ev), c));
        ed[j] = store<trace_t>(round_to<trace_t>(elig_updated(ev, pp, yr[j], q)));
      } else {
        h = round_to<trace_t>(clamped<CLIP>(updated<R>(h, pp, yr[j], er[j]), c));
      }
      hd[j] = store<trace_t>(h);
    }
    // p*w and p*(alpha*h) as two terms, as in the reference: an infinite p meets
    // w and alpha*h separately, so inf/NaN come out where the reference has them
    if constexpr (ACCUM) accr[j] += pc * wr[j] + pc * (ar[j] * h);
  }
}

#define PLASTIC_OPS_FORWARD_ROW(NAME, TARGET)                                                                   \
  template <typename scalar_t, typename trace_t, Rule R, bool CLIP, bool UPDATE, bool ACCUM, bool ELIG = false> \
  TARGET void NAME(const trace_t* hs, trace_t* hd, scalar_t pp, const scalar_t* yr, const scalar_t* er,        \
                   scalar_t pc, const scalar_t* wr, const scalar_t* ar, scalar_t* accr, int64_t n, scalar_t c,   \
                   const trace_t* es, trace_t* ed, scalar_t q) {                                                \
    forward_row<scalar_t, trace_t, R, CLIP, UPDATE, ACCUM, ELIG>(hs, hd, pp, yr, er, pc, wr, ar, accr, n, c, es, \
                                                                 ed, q);                                        \
  }
PLASTIC_OPS_FORWARD_ROW(forward_row_base, )
PLASTIC_OPS_FORWARD_ROW(forward_row_avx2, PLASTIC_OPS_TARGET_AVX2)

// One pass over the trace for step t: with UPDATE, reads H_{t-1} from src, applies the
// update of step t-1 and writes H_t to dst (src == dst updates in place); without it,
// src already holds H_t. With ACCUM, accumulates the terms of a_t with H_t into each
// task's partial (B, N_out) sum.
// STEPS: rows flagged at step t-1 or t (docs/op_spec.md, "Episode resets and lengths") run the
// update and the a_t terms as two calls of the same row loops, with zrow (zeros) for a reset
// trace and a copy for a skipped update; every other row takes the unflagged loop.
// ELIG: src and dst hold two planes (H, E); the update also takes E_{t-1} to E_t (a_t reads H only).
template <typename scalar_t, typename trace_t, Rule R, bool CLIP, bool UPDATE, bool ACCUM, bool STEPS, bool ELIG>
void forward_sweep(const Problem<scalar_t>& P, const Split& sp, const trace_t* src, trace_t* dst, int64_t t,
                   scalar_t* partial, const trace_t* zrow) {
  const Dims d = P.d;
  const scalar_t* p_prev = UPDATE ? P.pre(t - 1) : nullptr;
  const scalar_t* y_prev = UPDATE ? P.y_at(t - 1) : nullptr;
  const scalar_t* e_prev = UPDATE ? P.e_at(t - 1) : nullptr;
  const scalar_t* p_cur = ACCUM ? P.pre(t) : nullptr;
  const scalar_t c = P.clip, q = P.q;
  const int64_t n = d.n_out;
  constexpr bool EU = ELIG && UPDATE;
  const int64_t eo = EU ? P.eplane : 0;
  const auto row = cpu_has_avx2() ? forward_row_avx2<scalar_t, trace_t, R, CLIP, UPDATE, ACCUM, EU>
                                  : forward_row_base<scalar_t, trace_t, R, CLIP, UPDATE, ACCUM, EU>;
  const auto update_row = cpu_has_avx2() ? forward_row_avx2<scalar_t, trace_t, R, CLIP, true, false, ELIG>
                                         : forward_row_base<scalar_t, trace_t, R, CLIP, true, false, ELIG>;
  const auto accum_row = cpu_has_avx2() ? forward_row_avx2<scalar_t, trace_t, R, CLIP, false, true>
                                        : forward_row_base<scalar_t, trace_t, R, CLIP, false, true>;
  const uint8_t* f_prev = STEPS && UPDATE ? P.flags(t - 1) : nullptr;
  const uint8_t* f_cur = STEPS && ACCUM ? P.flags(t) : nullptr;
  at::parallel_for(0, sp.tasks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      scalar_t* acc = ACCUM ? partial + k * d.B * n : nullptr;
      if (ACCUM) std::fill(acc, acc + d.B * n, scalar_t(0));
      for (int64_t i = sp.begin(k, d.n_in); i < sp.end(k, d.n_in); ++i) {
        const scalar_t* wr = P.w + i * n;
        const scalar_t* ar = P.alpha + i * n;
        for (int64_t b = 0; b < d.B; ++b) {
          const trace_t* hs = src + (b * d.n_in + i) * n;
          trace_t* hd = UPDATE ? dst + (b * d.n_in + i) * n : nullptr;
          const trace_t* es = EU ? hs + eo : nullptr;
          trace_t* ed = EU ? hd + eo : nullptr;
          const scalar_t pp = UPDATE ? p_prev[b * d.n_in + i] : scalar_t(0);
          const scalar_t* yr = UPDATE ? y_prev + b * n : nullptr;
          const scalar_t* er = UPDATE ? e_prev + b * n : nullptr;
          const scalar_t pc = ACCUM ? p_cur[b * d.n_in + i] : scalar_t(0);
          scalar_t* accr = ACCUM ? acc + b * n : nullptr;
          if constexpr (STEPS) {
            const uint8_t fp = UPDATE ? f_prev[b] : 0, fc = ACCUM ? f_cur[b] : 0;
            if (fp | fc) {
              const trace_t* h = hs;  // H_t as carried into step t
              if constexpr (UPDATE) {
                const trace_t* from = (fp & kReset) ? zrow : hs;
                const trace_t* efrom = EU ? ((fp & kReset) ? zrow : es) : nullptr;
                if (fp & kSkip) {
                  if (from != hd) std::copy(from, from + n, hd);
                  if (EU && efrom != ed) std::copy(efrom, efrom + n, ed);
                } else {
                  update_row(from, hd, P.pre_of(pp, fp), yr, er, scalar_t(0), nullptr, nullptr, nullptr, n, c, efrom,
                             ed, q);
                }
                h = hd;
              }
              if (ACCUM && !(fc & kSkip)) {
                accum_row((fc & kReset) ? zrow : h, nullptr, scalar_t(0), nullptr, nullptr, P.pre_of(pc, fc), wr, ar,
                          accr, n, c, nullptr, nullptr, q);
              }
              continue;
            }
          }
          row(hs, hd, pp, yr, er, pc, wr, ar, accr, n, c, es, ed, q);
        }
      }
    }
  });
}

// Every H_t lands once, straight where it is kept: in checkpoint slot t / K when K divides
// t, else in the output trace (the working buffer, updated in place), which ends as H_T.
// No copy of the trace is made except H_0 into checkpoint 0.
// scalar_t: the inputs' and y's dtype; trace_t: the trace's and checkpoints' storage type. Everything
// is computed in acc_t (float for the 16-bit types); y_t is rounded to scalar_t as soon as it is
// computed, since it is what the next steps read (docs/op_spec.md, "Dtypes").
// mod (self-generated modulation): the update of step t reads the rates r_t, computed from y_t
// into a (T, B, N_out) buffer that stands in for e. elig_rate (eligibility traces): h0, H and every
// checkpoint hold the two planes H, E.
template <typename scalar_t, typename trace_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& pre, const at::Tensor& drive,
                                                           const at::Tensor& w, const at::Tensor& alpha,
                                                           const at::Tensor& e, const at::Tensor& h0, Rule rule,
                                                           Act act, c10::optional<double> clip, const Dims& d,
                                                           bool recurrent, const at::Tensor* steps,
                                                           const at::Tensor* mod, const at::Tensor* elig_rate) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  // 16-bit inputs are read once into acc_t copies (small next to one trace); others are used as they are
  const at::Tensor pre_a = pre.to(acc_type), w_a = w.to(acc_type), alpha_a = alpha.to(acc_type),
                   e_a = e.to(acc_type), drive_a = drive.to(acc_type);
  const bool eligible = elig_rate != nullptr;
  const int64_t planes = eligible ? 2 : 1;
  auto y = at::empty({d.T, d.B, d.n_out}, drive_a.options());
  auto H = at::empty_like(h0);
  auto ckpts = eligible ? at::empty({d.C, 2, d.B, d.n_in, d.n_out}, h0.options())
                        : at::empty({d.C, d.B, d.n_in, d.n_out}, h0.options());
  const Split sp = make_split(d);
  auto acc = at::empty({d.B, d.n_out}, drive_a.options());
  auto partial = at::empty({sp.tasks, d.B, d.n_out}, drive_a.options());
  auto P = Problem<acc_t>::make(d, recurrent, pre_a, w_a, alpha_a, e_a, y, clip, steps);
  const int64_t trace_numel = d.B * d.n_in * d.n_out;
  if (eligible) {
    P.eplane = trace_numel;
    P.q = elig_rate->to(acc_type).template item<acc_t>();
  }
  const at::Tensor mod_a = mod ? mod->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor rates = mod ? at::empty({d.T, d.B, d.n_out}, drive_a.options()) : at::Tensor();
  if (mod) P.e = rates.data_ptr<acc_t>();
  const auto zeros = zero_row<trace_t>(steps ? d.n_out : 0);
  const trace_t* zrow = zeros.data();
  trace_t* Hp = H.data_ptr<trace_t>();
  trace_t* ckp = ckpts.data_ptr<trace_t>();
  acc_t* accp = acc.data_ptr<acc_t>();
  acc_t* partp = partial.data_ptr<acc_t>();
  const acc_t* drv = drive_a.data_ptr<acc_t>();
  acc_t* yp = y.data_ptr<acc_t>();
  const int64_t slot_numel = planes * trace_numel;
  const trace_t* h0p = h0.data_ptr<trace_t>();
  if (d.K > 0) std::copy(h0p, h0p + slot_numel, ckp);
  // Where H_t is written (and then read from).
  auto slot = [&](int64_t t) -> trace_t* {
    return d.K > 0 && t < d.T && t % d.K == 0 ? ckp + (t / d.K) * slot_numel : Hp;
  };

  dispatch_rule(rule, clip.has_value(), [&](auto rule_tag, auto clip_tag) {
   dispatch_bool(steps != nullptr, [&](auto steps_tag) {
    dispatch_elig(rule_tag, eligible, [&](auto elig_tag) {
    constexpr Rule R = decltype(rule_tag)::value;
    constexpr bool CLIP = decltype(clip_tag)::value;
    constexpr bool STEPS = decltype(steps_tag)::value;
    constexpr bool ELIG = decltype(elig_tag)::value;
    const trace_t* cur = h0p;  // holds H_t
    for (int64_t t = 0; t < d.T; ++t) {
      if (t == 0) {
        forward_sweep<acc_t, trace_t, R, CLIP, false, true, STEPS, ELIG>(P, sp, cur, nullptr, t, partp, zrow);
      } else {
        trace_t* next = slot(t);
        forward_sweep<acc_t, trace_t, R, CLIP, true, true, STEPS, ELIG>(P, sp, cur, next, t, partp, zrow);
        cur = next;
      }
      add_partials(accp, drv + t * d.B * d.n_out, partp, sp.tasks, d.B * d.n_out);
      acc_t* yt = yp + t * d.B * d.n_out;
      activate_rows(accp, yt, d.B, d.n_out, act);
      if (!std::is_same<scalar_t, acc_t>::value) {
        for (int64_t r = 0; r < d.B * d.n_out; ++r) yt[r] = round_to<scalar_t>(yt[r]);
      }
      if constexpr (STEPS) {  // a skipped step writes exact zeros
        for (int64_t b = 0; b < d.B; ++b) {
          if (P.flags(t)[b] & kSkip) std::fill(yt + b * d.n_out, yt + (b + 1) * d.n_out, acc_t(0));
        }
      }
      if (mod) {  // r_t from the stored y_t (a skipped row's rates are never read)
        self_modulation<acc_t>(yt, e_a.data_ptr<acc_t>() + t * d.B * d.n_out, mod_a.data_ptr<acc_t>(), nullptr,
                               nullptr, rates.data_ptr<acc_t>() + t * d.B * d.n_out, d.B, d.n_out);
      }
    }
    forward_sweep<acc_t, trace_t, R, CLIP, true, false, STEPS, ELIG>(P, sp, cur, Hp, d.T, nullptr, zrow);  // H_T
    });
   });
  });
  return {y.to(drive.scalar_type()), H, ckpts};
}

// ---------------------------------------------------------------------------------------
// Backward

// H_{s+1} .. H_{s+L-1} into seg[0 .. L-2] from the checkpoint H_s. Trace rows are
// independent through the update, so each row runs every step of the segment while it is
// in cache: one parallel region per segment, the checkpoint row read once, each new row
// written once.
// STEPS: a flagged step is recomputed as the forward ran it (zrow for a reset, a copy for a skip).
// ELIG: the checkpoint and each recomputed trace hold two planes (H, E), both recomputed.
template <typename scalar_t, typename trace_t, Rule R, bool CLIP, bool STEPS, bool ELIG>
void recompute_segment(const Problem<scalar_t>& P, const trace_t* Hs, trace_t* seg, int64_t s, int64_t L,
                       const trace_t* zrow) {
  const Dims d = P.d;
  const scalar_t c = P.clip, q = P.q;
  const int64_t eo = ELIG ? P.eplane : 0;
  const int64_t slot_numel = (ELIG ? 2 : 1) * d.B * d.n_in * d.n_out;
  const int64_t grain = std::max<int64_t>(16, kMinElementsPerTask / std::max<int64_t>(1, d.n_out * (L - 1)));
  const auto step_row = cpu_has_avx2() ? forward_row_avx2<scalar_t, trace_t, R, CLIP, true, false, ELIG>
                                       : forward_row_base<scalar_t, trace_t, R, CLIP, true, false, ELIG>;
  at::parallel_for(0, d.B * d.n_in, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / d.n_in;
      const trace_t* src = Hs + row * d.n_out;
      const trace_t* esrc = ELIG ? src + eo : nullptr;
      for (int64_t l = 0; l + 1 < L; ++l) {
        const int64_t t = s + l;
        trace_t* out = seg + l * slot_numel + row * d.n_out;
        trace_t* eout = ELIG ? out + eo : nullptr;
        scalar_t p = P.pre(t)[row];
        if constexpr (STEPS) {
          const uint8_t f = P.flags(t)[b];
          if (f & kReset) src = esrc = zrow;
          p = P.pre_of(p, f);
          if (f & kSkip) {
            std::copy(src, src + d.n_out, out);
            if (ELIG) std::copy(esrc, esrc + d.n_out, eout);
            src = out;
            esrc = eout;
            continue;
          }
        }
        // the forward's row loop without the a_t terms: the same operations, the same bits
        step_row(src, out, p, P.y_at(t) + b * d.n_out, P.e_at(t) + b * d.n_out, scalar_t(0), nullptr,
                 nullptr, nullptr, d.n_out, c, esrc, eout, q);
        src = out;
        esrc = eout;
      }
    }
  });
}

// One trace row (b, i) of backward_pass; returns (dL/dp_m, dL/dp_tb) of the row.
template <typename scalar_t, typename trace_t>
struct BackwardRow {
  const trace_t* hr;  // H_m
  const scalar_t* gin;
  scalar_t* gout;
  scalar_t pa;  // p_m
  const scalar_t *yr, *er;
  scalar_t *ger, *gyr;  // partials of dL/de_m, dL/dy_m
  scalar_t pb;  // p_tb
  const scalar_t *gab, *wr, *ar;
  scalar_t* gar;  // dL/dalpha
  // eligibility traces (the update half only): E_m, F = dL/dE in and out, the rate q, and where the
  // row's term of dL/dq goes
  const trace_t* el = nullptr;
  const scalar_t* fin = nullptr;
  scalar_t* fout = nullptr;
  scalar_t q = 0;
  scalar_t* gq = nullptr;
};

template <typename scalar_t, typename trace_t, Rule R, bool CLIP, bool DRIVE, bool UPDATE, bool G_ZERO,
          bool ELIG = false>
PLASTIC_OPS_INLINE std::pair<scalar_t, scalar_t> backward_row(const BackwardRow<scalar_t, trace_t>& r, int64_t n,
                                                              scalar_t c) {
  constexpr bool EU = ELIG && UPDATE;
  const trace_t* hr = r.hr;
  const trace_t* el = r.el;
  const scalar_t *gin = r.gin, *yr = r.yr, *er = r.er, *gab = r.gab, *wr = r.wr, *ar = r.ar, *fin = r.fin;
  scalar_t *gout = r.gout, *ger = r.ger, *gyr = r.gyr, *gar = r.gar, *fout = r.fout;
  const scalar_t pa = r.pa, pb = r.pb, q = r.q;
  scalar_t sb = 0, sa = 0, sq = 0;
#pragma omp simd reduction(+ : sa, sb, sq)
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t h = load<scalar_t>(hr[j]);
    scalar_t g = G_ZERO ? scalar_t(0) : gin[j];
    const scalar_t yy = UPDATE ? yr[j] : scalar_t(0);
    const scalar_t ee = UPDATE ? er[j] : scalar_t(0);
    const scalar_t ev = EU ? load<scalar_t>(el[j]) : scalar_t(0);
    const scalar_t hpre = UPDATE ? updated<R, EU>(h, pa, yy, ee, ev) : h;
    const scalar_t hb = UPDATE ? round_to<trace_t>(clamped<CLIP>(hpre, c)) : h;
    if constexpr (DRIVE) {
      const scalar_t a = ar[j], gg = gab[j];
      const scalar_t pg = pb * gg;
      g += pg * a;  // products in the reference's order (see forward_sweep)
      gar[j] += pg * hb;
      sb += gg * wr[j] + gg * (a * hb);
    }
    if constexpr (UPDATE) {
      if constexpr (CLIP) {
        g = clamp_mask(g, hpre, c);
      }
      // Terms kept apart as autograd keeps them on the reference (no factoring), so an
      // infinite g gives inf - inf = NaN exactly where the reference does.
      if constexpr (EU) {
        // H_{m+1} = (1 - r) H + r E (hebb) or H + r E (add); E_{m+1} = (1 - q) E + q p y
        const scalar_t f = G_ZERO ? scalar_t(0) : fin[j];
        if constexpr (R == Rule::Hebb) {
          ger[j] += g * ev - g * h;
        } else {
          ger[j] += g * ev;
        }
        fout[j] = g * ee + f * (scalar_t(1) - q);
        sq += f * (pa * yy) - f * ev;
        gyr[j] += f * q * pa;
        sa += f * q * yy;
        if constexpr (R == Rule::Hebb) g = g * (scalar_t(1) - ee);
      } else if constexpr (R == Rule::Hebb) {
        ger[j] += g * (pa * yy) - g * h;
        gyr[j] += g * ee * pa;
        sa += g * ee * yy;
        g = g * (scalar_t(1) - ee);
      } else if constexpr (R == Rule::Add) {
        ger[j] += g * (pa * yy);
        gyr[j] += g * ee * pa;
        sa += g * ee * yy;
      } else {
        const scalar_t gey = g * ee * yy;
        ger[j] += g * yy * (pa - h * yy);
        gyr[j] += g * ee * (pa - h * yy) - gey * h;
        sa += g * ee * yy;
        g = g - gey * yy;
      }
    }
    gout[j] = g;
  }
  if constexpr (EU) *r.gq = sq;
  return {sa, sb};
}

#define PLASTIC_OPS_BACKWARD_ROW(NAME, TARGET)                                                                 \
  template <typename scalar_t, typename trace_t, Rule R, bool CLIP, bool DRIVE, bool UPDATE, bool G_ZERO,    \
            bool ELIG = false>                                                                                 \
  TARGET std::pair<scalar_t, scalar_t> NAME(const BackwardRow<scalar_t, trace_t>& r, scalar_t c, int64_t n) { \
    return backward_row<scalar_t, trace_t, R, CLIP, DRIVE, UPDATE, G_ZERO, ELIG>(r, n, c);                     \
  }
PLASTIC_OPS_BACKWARD_ROW(backward_row_base, )
PLASTIC_OPS_BACKWARD_ROW(backward_row_avx2, PLASTIC_OPS_TARGET_AVX2)

// One pass over (H_m, G) that runs two half-steps of the backward in sequence on each
// element, so that G makes one round trip through memory for both:
//   DRIVE: through a_tb = p_tb (w + alpha H_tb) + d_tb, with tb = m + 1 when UPDATE is
//     also run (H_{m+1} recomputed in registers from H_m as in the forward, so it and the
//     clamp mask are bit-identical to the forward's), tb = m otherwise.
//     Adds alpha p ga to G (completing dL/dH_tb), p ga H to dL/dalpha, ga (w + alpha H)
//     to dp_b (dL/dp_tb).
//   UPDATE: through the clamp and the update of step m: G becomes the trace path of
//     dL/dH_m; sets dp_a (dL/dp_m) and fills each task's partials of dL/de_m and dL/dy_m.
// G_ZERO: G holds zeros (dL/dH_T not given), so it is written without being read.
// STEPS: a row flagged at step m or tb runs the two half-steps as separate calls of the same row
// loops, in place on its G row: the drive half of tb on Heff_tb (zrow after a reset; H_{m+1}
// recomputed into the task's scratch row), then G := 0 after a reset at tb (no gradient reaches
// the overwritten trace), then the update half of m on Heff_m, none for a skip (G passes).
// ELIG: H_m, Gin and Gout hold two planes, (H_m, E_m) and (G, F = dL/dE); the update half also takes F
// from dL/dE_{m+1} to dL/dE_m and writes each task's term of dL/dq, summed in row order in double, to
// gq[task]. The drive half reads H only (E is not in a_t); F changes there only when a reset at tb
// zeroes it with G.
template <typename scalar_t, typename trace_t, Rule R, bool CLIP, bool DRIVE, bool UPDATE, bool G_ZERO, bool STEPS,
          bool ELIG>
void backward_pass(const Problem<scalar_t>& P, const Split& sp, const trace_t* Hm, const scalar_t* Gin,
                   scalar_t* Gout, int64_t m, const scalar_t* ga, scalar_t* galpha, scalar_t* dp_b, scalar_t* dp_a,
                   scalar_t* partial, const trace_t* zrow, trace_t* scratch, double* gq) {
  const Dims d = P.d;
  const int64_t tb = UPDATE ? m + 1 : m;
  const scalar_t* p_a = UPDATE ? P.pre(m) : nullptr;
  const scalar_t* y_a = UPDATE ? P.y_at(m) : nullptr;
  const scalar_t* e_a = UPDATE ? P.e_at(m) : nullptr;
  const scalar_t* p_b = DRIVE ? P.pre(tb) : nullptr;
  const scalar_t c = P.clip, q = P.q;
  const int64_t n = d.n_out;
  constexpr bool EU = ELIG && UPDATE;
  const int64_t eo = ELIG ? P.eplane : 0;
  const auto row_fn = cpu_has_avx2() ? backward_row_avx2<scalar_t, trace_t, R, CLIP, DRIVE, UPDATE, G_ZERO, EU>
                                     : backward_row_base<scalar_t, trace_t, R, CLIP, DRIVE, UPDATE, G_ZERO, EU>;
  const auto drive_row = cpu_has_avx2() ? backward_row_avx2<scalar_t, trace_t, R, CLIP, true, false, false>
                                        : backward_row_base<scalar_t, trace_t, R, CLIP, true, false, false>;
  const auto update_row = cpu_has_avx2() ? backward_row_avx2<scalar_t, trace_t, R, CLIP, false, true, false, ELIG>
                                         : backward_row_base<scalar_t, trace_t, R, CLIP, false, true, false, ELIG>;
  const auto forward_update = cpu_has_avx2() ? forward_row_avx2<scalar_t, trace_t, R, CLIP, true, false, ELIG>
                                             : forward_row_base<scalar_t, trace_t, R, CLIP, true, false, ELIG>;
  const uint8_t* f_a = STEPS && UPDATE ? P.flags(m) : nullptr;
  const uint8_t* f_b = STEPS && DRIVE ? P.flags(tb) : nullptr;
  at::parallel_for(0, sp.tasks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      scalar_t* ge = UPDATE ? partial + 2 * k * d.B * n : nullptr;
      scalar_t* gy = UPDATE ? ge + d.B * n : nullptr;
      if (UPDATE) std::fill(ge, ge + 2 * d.B * n, scalar_t(0));
      double gq_task = 0;
      for (int64_t i = sp.begin(k, d.n_in); i < sp.end(k, d.n_in); ++i) {
        const scalar_t* wr = P.w + i * n;
        const scalar_t* ar = P.alpha + i * n;
        scalar_t* gar = DRIVE ? galpha + i * n : nullptr;
        for (int64_t b = 0; b < d.B; ++b) {
          const int64_t row = b * d.n_in + i;
          const trace_t* hr = Hm + row * n;
          const scalar_t* gin = G_ZERO ? nullptr : Gin + row * n;
          scalar_t* gout = Gout + row * n;
          const scalar_t pa = UPDATE ? p_a[row] : scalar_t(0);
          const scalar_t* yr = UPDATE ? y_a + b * n : nullptr;
          const scalar_t* er = UPDATE ? e_a + b * n : nullptr;
          scalar_t* ger = UPDATE ? ge + b * n : nullptr;
          scalar_t* gyr = UPDATE ? gy + b * n : nullptr;
          const scalar_t pb = DRIVE ? p_b[row] : scalar_t(0);
          const scalar_t* gab = DRIVE ? ga + b * n : nullptr;
          scalar_t sq = 0;  // the row's term of dL/dq
          if constexpr (STEPS) {
            const uint8_t fa = UPDATE ? f_a[b] : 0, fb = DRIVE ? f_b[b] : 0;
            if (fa | fb) {
              if (G_ZERO) {
                std::fill(gout, gout + n, scalar_t(0));
                if (ELIG) std::fill(gout + eo, gout + eo + n, scalar_t(0));
              } else if (gin != gout) {
                std::copy(gin, gin + n, gout);
                if (ELIG) std::copy(gin + eo, gin + eo + n, gout + eo);
              }
              if (DRIVE) {
                if (!(fb & kSkip)) {
                  const trace_t* hb = hr;  // Heff_tb
                  if (fb & kReset) {
                    hb = zrow;
                  } else if (UPDATE) {  // H_{m+1} from H_m, as the forward computed it
                    hb = (fa & kReset) ? zrow : hr;
                    if (!(fa & kSkip)) {
                      trace_t* hnext = scratch + (ELIG ? 2 : 1) * k * n;
                      forward_update(hb, hnext, P.pre_of(pa, fa), yr, er, scalar_t(0), nullptr, nullptr, nullptr, n,
                                     c, ELIG ? ((fa & kReset) ? zrow : hr + eo) : nullptr,
                                     ELIG ? hnext + n : nullptr, q);
                      hb = hnext;
                    }
                  }
                  const auto sums = drive_row({hb, gout, gout, scalar_t(0), nullptr, nullptr, nullptr, nullptr,
                                               P.pre_of(pb, fb), gab, wr, ar, gar}, c, n);
                  dp_b[row] += sums.second;
                }
                if (fb & kReset) {  // no gradient reaches the overwritten traces (H and E)
                  std::fill(gout, gout + n, scalar_t(0));
                  if (ELIG) std::fill(gout + eo, gout + eo + n, scalar_t(0));
                }
                // a skipped step had no input; a reset recurrent input was the constant 0
                if ((fb & kSkip) || (P.recurrent && (fb & kReset))) dp_b[row] = scalar_t(0);
              }
              if (UPDATE) {
                scalar_t sa = 0;
                if (!(fa & kSkip)) {
                  BackwardRow<scalar_t, trace_t> ur{(fa & kReset) ? zrow : hr, gout, gout, P.pre_of(pa, fa), yr, er,
                                                    ger, gyr, scalar_t(0), nullptr, nullptr, nullptr, nullptr};
                  if (EU) {
                    ur.el = (fa & kReset) ? zrow : hr + eo;
                    ur.fin = gout + eo;
                    ur.fout = gout + eo;
                    ur.q = q;
                    ur.gq = &sq;
                  }
                  sa = update_row(ur, c, n).first;
                }
                dp_a[row] = sa;
                if (EU) gq_task += sq;
              }
              continue;
            }
          }
          BackwardRow<scalar_t, trace_t> rr{hr, gin, gout, pa, yr, er, ger, gyr, pb, gab, wr, ar, gar};
          if (EU) {
            rr.el = hr + eo;
            rr.fin = G_ZERO ? nullptr : gin + eo;
            rr.fout = gout + eo;
            rr.q = q;
            rr.gq = &sq;
          }
          const auto sums = row_fn(rr, c, n);
          const scalar_t sa = sums.first, sb = sums.second;
          if (DRIVE) dp_b[row] += sb;
          if (UPDATE) dp_a[row] = sa;
          if (EU) gq_task += sq;
        }
      }
      if (EU) gq[k] = gq_task;
    }
  });
}

// Calls f(bool_constant<a>, bool_constant<b>) for runtime flags a, b.
template <typename F>
void dispatch_flags(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{}); else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{}); else f(std::false_type{}, std::false_type{});
  }
}

// Walks m = T-1 .. 0 with one pass per m (DRIVE of step m+1 fused with UPDATE of step m),
// then a last DRIVE pass of step 0; see docs/op_spec.md ("Backward", "Checkpointing").
// H_m is read from its checkpoint when K divides m, else from the recomputed segment.
// has_grad_hT false: dL/dH_T is zero, so the UPDATE of step T-1 is skipped altogether.
// scalar_t, trace_t: as in forward_impl. The gradients, dL/dH included, are accumulated in acc_t and
// rounded to their inputs' dtypes once, at the end.
// mod: the rates r_t of every step are recomputed first from the stored y_t by the forward's function
// (the same bits) and stand in for e; the passes then give dL/dr, and finish_step adds the
// modulation's path to dL/dy_m before act' and turns dL/dr into dL/de. elig_rate: the traces, G and
// grad_hT hold two planes (H, E), (dL/dH, dL/dE) (docs/op_spec.md, "Neuromodulation").
template <typename scalar_t, typename trace_t>
BackwardResult backward_impl(const at::Tensor& grad_y_in, const at::Tensor& grad_hT_in, bool has_grad_hT,
                             const at::Tensor& pre_in, const at::Tensor& w_in, const at::Tensor& alpha_in,
                             const at::Tensor& e_in, const at::Tensor& y_in, const at::Tensor& ckpts, Rule rule,
                             Act act, c10::optional<double> clip, const Dims& d, bool recurrent,
                             const at::Tensor* steps, const at::Tensor* mod_in, const at::Tensor* elig_rate) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor grad_y = grad_y_in.to(acc_type), pre = pre_in.to(acc_type), w = w_in.to(acc_type),
                   alpha = alpha_in.to(acc_type), e = e_in.to(acc_type), y = y_in.to(acc_type);
  const at::Tensor grad_hT = has_grad_hT ? grad_hT_in.to(acc_type).contiguous() : grad_hT_in;
  const bool eligible = elig_rate != nullptr;
  const int64_t planes = eligible ? 2 : 1;
  const auto opts = y.options();
  const int64_t seg_len = std::min(d.K, d.T);
  auto G = eligible ? at::empty({2, d.B, d.n_in, d.n_out}, opts) : at::empty({d.B, d.n_in, d.n_out}, opts);
  // H_{s+1} .. of one segment
  auto seg = eligible ? at::empty({seg_len - 1, 2, d.B, d.n_in, d.n_out}, ckpts.options())
                      : at::empty({seg_len - 1, d.B, d.n_in, d.n_out}, ckpts.options());
  auto g_drive = at::empty({d.T, d.B, d.n_out}, opts);
  auto g_e = at::empty({d.T, d.B, d.n_out}, opts);
  auto g_alpha = at::zeros({d.n_in, d.n_out}, opts);
  auto g_pre = recurrent ? at::empty({d.B, d.n_in}, opts) : at::empty({d.T, d.B, d.n_in}, opts);
  auto carry = at::empty({2, d.B, d.n_in}, opts);  // dL/dp_t of two consecutive steps (recurrent form)
  const Split sp = make_split(d);
  auto partial = at::empty({sp.tasks, 2, d.B, d.n_out}, opts);  // dL/de_m, dL/dy_m per task

  auto P = Problem<acc_t>::make(d, recurrent, pre, w, alpha, e, y, clip, steps);
  const int64_t trace_numel = d.B * d.n_in * d.n_out;
  const int64_t row_numel = d.B * d.n_out;
  if (eligible) {
    P.eplane = trace_numel;
    P.q = elig_rate->to(acc_type).template item<acc_t>();
  }
  std::vector<double> gq_task(eligible ? sp.tasks : 0);  // each task's dL/dq of one pass
  double gq_total = 0;
  // Self-generated modulation: s_t, M_t and r_t of every step, as the forward computed them.
  const at::Tensor mod = mod_in ? mod_in->to(acc_type).contiguous() : at::Tensor();
  const acc_t* modp = mod_in ? mod.data_ptr<acc_t>() : nullptr;
  std::vector<acc_t> s_all(mod_in ? d.T * d.B : 0), dz_all(mod_in ? d.T * d.B : 0);
  std::vector<acc_t> M_all(mod_in ? d.T * row_numel : 0), r_all(mod_in ? d.T * row_numel : 0);
  std::vector<acc_t> gM_all(mod_in ? d.T * row_numel : 0);
  std::vector<uint8_t> live_all(mod_in ? d.T * d.B : 0);  // rows whose update ran (their terms count)
  if (mod_in) {
    for (int64_t t = 0; t < d.T; ++t) {
      self_modulation<acc_t>(P.y_at(t), e.data_ptr<acc_t>() + t * row_numel, modp, s_all.data() + t * d.B,
                             M_all.data() + t * row_numel, r_all.data() + t * row_numel, d.B, d.n_out);
    }
    P.e = r_all.data();
  }

  const auto zeros = zero_row<trace_t>(steps ? d.n_out : 0);
  std::vector<trace_t> scratch(steps ? sp.tasks * planes * d.n_out : 0);  // one H_{m+1} row per task
  const int64_t slot_numel = planes * trace_numel;
  acc_t* Gp = G.data_ptr<acc_t>();
  trace_t* segp = seg.data_ptr<trace_t>();
  acc_t* partp = partial.data_ptr<acc_t>();
  acc_t* gap = g_alpha.data_ptr<acc_t>();
  const trace_t* ckp = ckpts.data_ptr<trace_t>();
  const acc_t* grad_yp = grad_y.data_ptr<acc_t>();

  auto H_at = [&](int64_t m) -> const trace_t* {
    return m % d.K == 0 ? ckp + (m / d.K) * slot_numel : segp + (m % d.K - 1) * slot_numel;
  };
  // dL/dp_t: the linear form's dL/dx_t; dL/dy_{t-1} (t > 0) or dL/dy0 (t = 0) in the recurrent one.
  auto dp_at = [&](int64_t t) -> acc_t* {
    if (!recurrent) return g_pre.data_ptr<acc_t>() + t * d.B * d.n_in;
    return t == 0 ? g_pre.data_ptr<acc_t>() : carry.data_ptr<acc_t>() + (t % 2) * d.B * d.n_in;
  };
  // After the pass that ran the UPDATE of step m (ran = false: skipped, its terms are zero):
  // dL/de_m, the total dL/dy_m and ga_m = act'(dL/dy_m).
  auto finish_step = [&](int64_t m, bool ran) {
    acc_t* ge = g_e.data_ptr<acc_t>() + m * row_numel;
    acc_t* gat = g_drive.data_ptr<acc_t>() + m * row_numel;
    const acc_t* gym = grad_yp + m * row_numel;
    std::vector<acc_t> gy(row_numel);
    for (int64_t r = 0; r < row_numel; ++r) {
      acc_t se = 0, sy = gym[r];
      if (ran) {
        for (int64_t k = 0; k < sp.tasks; ++k) {
          se += partp[(2 * k) * row_numel + r];
          sy += partp[(2 * k + 1) * row_numel + r];
        }
      }
      ge[r] = se;
      gy[r] = sy;
    }
    if (recurrent && m + 1 < d.T) {
      const acc_t* cp = dp_at(m + 1);
      for (int64_t r = 0; r < row_numel; ++r) gy[r] += cp[r];
    }
    if (mod_in) {  // ge holds dL/dr_m: through r = e M, M = fw s + fb, s = tanh(y . mw + mb)
      const int64_t n = d.n_out;
      const acc_t *mw = modp, *fw = modp + n;
      for (int64_t b = 0; b < d.B; ++b) {
        const int64_t tb = m * d.B + b;
        acc_t* gr = ge + b * n;
        acc_t* gM = gM_all.data() + m * row_numel + b * n;
        const bool live = ran && !(steps && (P.flags(m)[b] & kSkip));
        live_all[tb] = live;
        if (!live) {  // a skipped (or, against a zero dL/dH_T, unused) update: every term is zero
          std::fill(gM, gM + n, acc_t(0));
          std::fill(gr, gr + n, acc_t(0));
          dz_all[tb] = 0;
          continue;
        }
        const acc_t* er = e.data_ptr<acc_t>() + m * row_numel + b * n;
        const acc_t* Mr = M_all.data() + m * row_numel + b * n;
        acc_t ds = 0;
        for (int64_t j = 0; j < n; ++j) {
          gM[j] = gr[j] * er[j];
          ds += gM[j] * fw[j];
        }
        for (int64_t j = 0; j < n; ++j) gr[j] = gr[j] * Mr[j];
        const acc_t sv = s_all[tb];
        const acc_t dz = ds * (acc_t(1) - sv * sv);
        dz_all[tb] = dz;
        acc_t* gyr = gy.data() + b * n;
        for (int64_t k = 0; k < n; ++k) gyr[k] += dz * mw[k];
      }
    }
    activation_backward(gy.data(), P.y_at(m), gat, d.B, d.n_out, act);
    if (steps) {  // a skipped y_m is the constant 0: no gradient reaches its step
      for (int64_t b = 0; b < d.B; ++b) {
        if (P.flags(m)[b] & kSkip) {
          std::fill(gat + b * d.n_out, gat + (b + 1) * d.n_out, acc_t(0));
          std::fill(ge + b * d.n_out, ge + (b + 1) * d.n_out, acc_t(0));
        }
      }
    }
  };
  auto add_gq = [&]() {
    for (int64_t k = 0; k < sp.tasks; ++k) gq_total += gq_task[k];
  };

  dispatch_rule(rule, clip.has_value(), [&](auto rule_tag, auto clip_tag) {
   dispatch_bool(steps != nullptr, [&](auto steps_tag) {
    dispatch_elig(rule_tag, eligible, [&](auto elig_tag) {
    constexpr Rule R = decltype(rule_tag)::value;
    constexpr bool CLIP = decltype(clip_tag)::value;
    constexpr bool STEPS = decltype(steps_tag)::value;
    constexpr bool ELIG = decltype(elig_tag)::value;
    const trace_t* zrow = zeros.data();
    trace_t* scr = scratch.data();
    double* gqp = gq_task.data();
    bool g_zero = !has_grad_hT;
    const acc_t* Gin = has_grad_hT ? grad_hT.data_ptr<acc_t>() : Gp;
    for (int64_t m = d.T - 1; m >= 0; --m) {
      const int64_t s = m - m % d.K;
      if (m % d.K != 0 && (m == d.T - 1 || m % d.K == d.K - 1)) {  // entering segment [s, m]
        recompute_segment<acc_t, trace_t, R, CLIP, STEPS, ELIG>(P, H_at(s), segp, s, m - s + 1, zrow);
      }
      const bool drive = m + 1 < d.T;
      if (!drive && g_zero) {  // UPDATE of step T-1 against a zero G: every term is zero
        std::fill(dp_at(m), dp_at(m) + d.B * d.n_in, acc_t(0));
        finish_step(m, false);
        continue;
      }
      const acc_t* ga = drive ? g_drive.data_ptr<acc_t>() + (m + 1) * row_numel : nullptr;
      acc_t* dp_b = drive ? dp_at(m + 1) : nullptr;
      dispatch_flags(drive, g_zero, [&](auto drive_tag, auto zero_tag) {
        backward_pass<acc_t, trace_t, R, CLIP, decltype(drive_tag)::value, true, decltype(zero_tag)::value, STEPS,
                      ELIG>(P, sp, H_at(m), Gin, Gp, m, ga, gap, dp_b, dp_at(m), partp, zrow, scr, gqp);
      });
      if (ELIG) add_gq();
      g_zero = false;
      Gin = Gp;
      finish_step(m, true);
    }
    dispatch_flags(g_zero, false, [&](auto zero_tag, auto) {
      backward_pass<acc_t, trace_t, R, CLIP, true, false, decltype(zero_tag)::value, STEPS, ELIG>(
          P, sp, H_at(0), Gin, Gp, 0, g_drive.data_ptr<acc_t>(), gap, dp_at(0), nullptr, nullptr, zrow, scr, gqp);
    });
    // dL/dE_0 was never written when every pass saw a zero G (T = 1 without dL/dH_T)
    if (ELIG && g_zero) std::fill(Gp + trace_numel, Gp + 2 * trace_numel, acc_t(0));
    });
   });
  });

  // dL/dw = sum_t p_t^T ga_t as one GEMM over all steps.
  at::Tensor P_all = recurrent ? at::cat({pre.unsqueeze(0), y.narrow(0, 0, d.T - 1)}, 0) : pre;
  if (steps) {  // a skipped step reads no input (its ga is 0, its input may be NaN padding); a reset
               // step's recurrent input was the constant 0
    const at::Tensor unread = steps->bitwise_and(recurrent ? (kReset | kSkip) : kSkip).ne(0).unsqueeze(2);
    P_all = P_all.masked_fill(unread, 0);
  }
  auto g_w = at::mm(P_all.reshape({d.T * d.B, d.n_in}).t(), g_drive.reshape({d.T * d.B, d.n_out}));

  // The modulation's parameters: sums over (t, b) of the live rows, in one fixed order.
  at::Tensor g_mod = at::empty({0}, grad_y_in.options());
  if (mod_in) {
    const int64_t n = d.n_out;
    auto gm = at::zeros({4, n}, opts);
    acc_t* gmw = gm.data_ptr<acc_t>();
    acc_t *gfw = gmw + n, *gfb = gmw + 2 * n;
    acc_t gmb = 0;
    for (int64_t t = 0; t < d.T; ++t) {
      for (int64_t b = 0; b < d.B; ++b) {
        const int64_t tb = t * d.B + b;
        if (!live_all[tb]) continue;
        const acc_t dz = dz_all[tb], sv = s_all[tb];
        const acc_t* yr = P.y_at(t) + b * n;
        const acc_t* gM = gM_all.data() + t * row_numel + b * n;
        for (int64_t k = 0; k < n; ++k) gmw[k] += dz * yr[k];
        for (int64_t j = 0; j < n; ++j) {
          gfw[j] += gM[j] * sv;
          gfb[j] += gM[j];
        }
        gmb += dz;
      }
    }
    gmw[3 * n] = gmb;  // mod_bias is [3, 0]; the rest of row 3 is not read: gradient 0
    g_mod = gm.to(mod_in->scalar_type());
  }
  at::Tensor g_q = eligible ? at::scalar_tensor(gq_total, grad_y_in.options().dtype(elig_rate->scalar_type()))
                            : at::empty({0}, grad_y_in.options());
  return {g_pre.to(pre_in.scalar_type()), g_drive.to(grad_y_in.scalar_type()), g_w.to(w_in.scalar_type()),
          g_alpha.to(alpha_in.scalar_type()), g_e.to(e_in.scalar_type()), G.to(ckpts.scalar_type()), g_mod, g_q};
}

// ---------------------------------------------------------------------------------------
// Op entry points

ForwardResult forward_cpu(bool recurrent, const at::Tensor& pre, const at::Tensor& drive, const at::Tensor& w,
                          const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& h0, c10::string_view rule,
                          c10::string_view activation, c10::optional<double> clip, int64_t K,
                          const c10::optional<at::Tensor>& steps, const c10::optional<at::Tensor>& mod,
                          const c10::optional<at::Tensor>& elig_rate) {
  const Rule r = parse_rule(to_string(rule));
  const Neuro neuro = check_neuro(mod, elig_rate, r, w.dim() == 2 ? w.size(1) : 0, drive, &h0);
  const Dims d = check_canonical(pre, drive, w, alpha, e, trace_plane(h0, neuro.eligible), clip, K, recurrent);
  const at::Tensor* flags = check_steps(steps, d, drive.device()) ? &*steps : nullptr;
  const at::Tensor* mod_p = neuro.mod ? &*mod : nullptr;
  const at::Tensor* q_p = neuro.eligible ? &*elig_rate : nullptr;
  TORCH_CHECK(h0.is_contiguous(), "plastic_ops: canonical arguments must be contiguous");
  const Act a = parse_activation(to_string(activation));
  ForwardResult out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, drive.scalar_type(), "plastic_forward_cpu", [&] {
    dispatch_trace<scalar_t>(h0.scalar_type(), [&](auto trace_tag) {
      out = forward_impl<scalar_t, decltype(trace_tag)>(pre, drive, w, alpha, e, h0, r, a, clip, d, recurrent, flags,
                                                        mod_p, q_p);
    });
  });
  return out;
}

BackwardResult backward_cpu(bool recurrent, const at::Tensor& grad_y, const at::Tensor& grad_hT,
                            const at::Tensor& pre, const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& e,
                            const at::Tensor& y, const at::Tensor& ckpts, c10::string_view rule,
                            c10::string_view activation, c10::optional<double> clip, int64_t K,
                            const c10::optional<at::Tensor>& steps, const c10::optional<at::Tensor>& mod,
                            const c10::optional<at::Tensor>& elig_rate) {
  const Rule rr = parse_rule(to_string(rule));
  const Neuro neuro = check_neuro(mod, elig_rate, rr, w.dim() == 2 ? w.size(1) : 0, grad_y, nullptr);
  const Dims d = check_backward(grad_y, grad_hT, pre, w, alpha, e, y, ckpts, clip, K, recurrent, neuro.eligible);
  const at::Tensor* mod_p = neuro.mod ? &*mod : nullptr;
  const at::Tensor* q_p = neuro.eligible ? &*elig_rate : nullptr;
  const at::Tensor* flags = check_steps(steps, d, y.device()) ? &*steps : nullptr;
  const NoAutocast no_autocast;
  const bool has_grad_hT = !is_zero_grad_marker(grad_hT);  // else no trace of zeros is built or read
  const Rule r = parse_rule(to_string(rule));
  const Act a = parse_activation(to_string(activation));
  BackwardResult out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "plastic_backward_cpu", [&] {
    dispatch_trace<scalar_t>(ckpts.scalar_type(), [&](auto trace_tag) {
      out = backward_impl<scalar_t, decltype(trace_tag)>(grad_y, grad_hT, has_grad_hT, pre, w, alpha, e, y, ckpts,
                                                         r, a, clip, d, recurrent, flags, mod_p, q_p);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(plastic_ops, CPU, m) { register_kernels<forward_cpu, backward_cpu>(m); }

}  // namespace plastic_ops
