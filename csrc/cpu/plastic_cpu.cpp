// CPU kernels of the plastic op: fused forward over the whole sequence and the
// checkpointed BPTT backward. The math, the sweep structure and the parallel
// layout are described once in docs/op_spec.md; comments here say only why.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>

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
  } else {
    if (clip) f(RuleTag<Rule::Oja>{}, std::true_type{}); else f(RuleTag<Rule::Oja>{}, std::false_type{});
  }
}

// Hpre_{t+1} from H_t (before the clamp).
template <Rule R, typename scalar_t>
inline scalar_t updated(scalar_t h, scalar_t p, scalar_t y, scalar_t e) {
  if constexpr (R == Rule::Hebb) {
    return (scalar_t(1) - e) * h + e * p * y;
  } else {
    return h + e * y * (p - h * y);
  }
}

// NaN stays NaN, as with torch.clamp (every comparison with NaN is false).
template <typename scalar_t>
inline scalar_t clamp(scalar_t h, scalar_t c) {
  return h < -c ? -c : (h > c ? c : h);
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

  // pre is x (linear form) or y0 (recurrent form).
  static Problem make(const Dims& d, bool recurrent, const at::Tensor& pre, const at::Tensor& w,
                      const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y, c10::optional<double> clip) {
    return {d,
            recurrent,
            recurrent ? nullptr : pre.data_ptr<scalar_t>(),
            recurrent ? pre.data_ptr<scalar_t>() : nullptr,
            w.data_ptr<scalar_t>(),
            alpha.data_ptr<scalar_t>(),
            e.data_ptr<scalar_t>(),
            y.data_ptr<scalar_t>(),
            static_cast<scalar_t>(clip.value_or(0.0))};
  }

  // p_t: the presynaptic vector of step t, (B, N_in).
  const scalar_t* pre(int64_t t) const {
    if (!recurrent) return x + t * d.B * d.n_in;
    return t == 0 ? y0 : y + (t - 1) * d.B * d.n_out;
  }
  const scalar_t* y_at(int64_t t) const { return y + t * d.B * d.n_out; }
  const scalar_t* e_at(int64_t t) const { return e + t * d.B * d.n_out; }
};

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

// ---------------------------------------------------------------------------------------
// Forward

// One pass over the trace: applies the update of step t-1 (UPDATE) and accumulates the
// terms of a_t with the fresh values (ACCUM) into each task's partial (B, N_out) sum.
template <typename scalar_t, Rule R, bool CLIP, bool UPDATE, bool ACCUM>
void forward_sweep(const Problem<scalar_t>& P, const Split& sp, scalar_t* H, int64_t t, scalar_t* partial) {
  const Dims d = P.d;
  const scalar_t* p_prev = UPDATE ? P.pre(t - 1) : nullptr;
  const scalar_t* y_prev = UPDATE ? P.y_at(t - 1) : nullptr;
  const scalar_t* e_prev = UPDATE ? P.e_at(t - 1) : nullptr;
  const scalar_t* p_cur = ACCUM ? P.pre(t) : nullptr;
  const scalar_t c = P.clip;
  const int64_t n = d.n_out;
  at::parallel_for(0, sp.tasks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      scalar_t* acc = ACCUM ? partial + k * d.B * n : nullptr;
      if (ACCUM) std::fill(acc, acc + d.B * n, scalar_t(0));
      for (int64_t i = sp.begin(k, d.n_in); i < sp.end(k, d.n_in); ++i) {
        const scalar_t* wr = P.w + i * n;
        const scalar_t* ar = P.alpha + i * n;
        for (int64_t b = 0; b < d.B; ++b) {
          scalar_t* hr = H + (b * d.n_in + i) * n;
          const scalar_t pp = UPDATE ? p_prev[b * d.n_in + i] : scalar_t(0);
          const scalar_t* yr = UPDATE ? y_prev + b * n : nullptr;
          const scalar_t* er = UPDATE ? e_prev + b * n : nullptr;
          const scalar_t pc = ACCUM ? p_cur[b * d.n_in + i] : scalar_t(0);
          scalar_t* accr = ACCUM ? acc + b * n : nullptr;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            scalar_t h = hr[j];
            if constexpr (UPDATE) {
              h = updated<R>(h, pp, yr[j], er[j]);
              if constexpr (CLIP) h = clamp(h, c);
              hr[j] = h;
            }
            // p*w and p*(alpha*h) as two terms, as in the reference: an infinite p meets
            // w and alpha*h separately, so inf/NaN come out where the reference has them
            if constexpr (ACCUM) accr[j] += pc * wr[j] + pc * (ar[j] * h);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& pre, const at::Tensor& drive,
                                                           const at::Tensor& w, const at::Tensor& alpha,
                                                           const at::Tensor& e, const at::Tensor& h0, Rule rule,
                                                           Act act, c10::optional<double> clip, const Dims& d,
                                                           bool recurrent) {
  auto y = at::empty({d.T, d.B, d.n_out}, drive.options());
  auto H = h0.clone();
  auto ckpts = at::empty({d.C, d.B, d.n_in, d.n_out}, h0.options());
  const Split sp = make_split(d);
  auto acc = at::empty({d.B, d.n_out}, drive.options());
  auto partial = at::empty({sp.tasks, d.B, d.n_out}, drive.options());
  const auto P = Problem<scalar_t>::make(d, recurrent, pre, w, alpha, e, y, clip);
  scalar_t* Hp = H.data_ptr<scalar_t>();
  scalar_t* accp = acc.data_ptr<scalar_t>();
  scalar_t* partp = partial.data_ptr<scalar_t>();
  const scalar_t* drv = drive.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t trace_numel = d.B * d.n_in * d.n_out;

  dispatch_rule(rule, clip.has_value(), [&](auto rule_tag, auto clip_tag) {
    constexpr Rule R = decltype(rule_tag)::value;
    constexpr bool CLIP = decltype(clip_tag)::value;
    for (int64_t t = 0; t < d.T; ++t) {
      if (t == 0) {
        forward_sweep<scalar_t, R, CLIP, false, true>(P, sp, Hp, t, partp);
      } else {
        forward_sweep<scalar_t, R, CLIP, true, true>(P, sp, Hp, t, partp);
      }
      add_partials(accp, drv + t * d.B * d.n_out, partp, sp.tasks, d.B * d.n_out);
      activate_rows(accp, yp + t * d.B * d.n_out, d.B, d.n_out, act);
      if (d.K > 0 && t % d.K == 0) {  // H now holds H_t
        std::copy(Hp, Hp + trace_numel, ckpts.data_ptr<scalar_t>() + (t / d.K) * trace_numel);
      }
    }
    forward_sweep<scalar_t, R, CLIP, true, false>(P, sp, Hp, d.T, nullptr);  // H_T
  });
  return {y, H, ckpts};
}

// ---------------------------------------------------------------------------------------
// Backward

// H_{t+1} = clamp(update(H_t)) for one step of a segment being recomputed.
template <typename scalar_t, Rule R, bool CLIP>
void recompute_step(const Problem<scalar_t>& P, const scalar_t* Ht, scalar_t* Hn, int64_t t) {
  const Dims d = P.d;
  const scalar_t* p = P.pre(t);
  const scalar_t* yt = P.y_at(t);
  const scalar_t* et = P.e_at(t);
  const scalar_t c = P.clip;
  const int64_t grain = std::max<int64_t>(16, kMinElementsPerTask / d.n_out);
  at::parallel_for(0, d.B * d.n_in, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / d.n_in;
      const scalar_t pp = p[row];
      const scalar_t* yr = yt + b * d.n_out;
      const scalar_t* er = et + b * d.n_out;
      const scalar_t* hr = Ht + row * d.n_out;
      scalar_t* out = Hn + row * d.n_out;
#pragma omp simd
      for (int64_t j = 0; j < d.n_out; ++j) {
        scalar_t h = updated<R>(hr[j], pp, yr[j], er[j]);
        if constexpr (CLIP) h = clamp(h, c);
        out[j] = h;
      }
    }
  });
}

// Sweep A of step t: through the clamp and the update. G (dL/dH_{t+1}) becomes the trace
// path of dL/dH_t; sets dp (dL/dp_t, B x N_in) and fills each task's partials of
// dL/de_t and dL/dy_t (two (B, N_out) blocks per task).
template <typename scalar_t, Rule R, bool CLIP>
void backward_sweep_update(const Problem<scalar_t>& P, const Split& sp, const scalar_t* Ht, scalar_t* G, int64_t t,
                           scalar_t* dp, scalar_t* partial) {
  const Dims d = P.d;
  const scalar_t* p = P.pre(t);
  const scalar_t* yt = P.y_at(t);
  const scalar_t* et = P.e_at(t);
  const scalar_t c = P.clip;
  const int64_t n = d.n_out;
  at::parallel_for(0, sp.tasks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      scalar_t* ge = partial + 2 * k * d.B * n;
      scalar_t* gy = ge + d.B * n;
      std::fill(ge, ge + 2 * d.B * n, scalar_t(0));
      for (int64_t i = sp.begin(k, d.n_in); i < sp.end(k, d.n_in); ++i) {
        for (int64_t b = 0; b < d.B; ++b) {
          const int64_t row = b * d.n_in + i;
          const scalar_t pp = p[row];
          const scalar_t* hr = Ht + row * n;
          scalar_t* gr = G + row * n;
          const scalar_t* yr = yt + b * n;
          const scalar_t* er = et + b * n;
          scalar_t* ger = ge + b * n;
          scalar_t* gyr = gy + b * n;
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t h = hr[j], yy = yr[j], ee = er[j];
            scalar_t g = gr[j];
            if constexpr (CLIP) {
              const scalar_t hp = updated<R>(h, pp, yy, ee);
              g = (hp >= -c && hp <= c) ? g : scalar_t(0);
            }
            // Terms kept apart as autograd keeps them on the reference (no factoring), so an
            // infinite g gives inf - inf = NaN exactly where the reference does.
            if constexpr (R == Rule::Hebb) {
              ger[j] += g * (pp * yy) - g * h;
              gyr[j] += g * ee * pp;
              gr[j] = g * (scalar_t(1) - ee);
            } else {
              const scalar_t gey = g * ee * yy;
              ger[j] += g * yy * (pp - h * yy);
              gyr[j] += g * ee * (pp - h * yy) - gey * h;
              gr[j] = g - gey * yy;
            }
            s += g * ee * yy;
          }
          dp[row] = s;
        }
      }
    }
  });
}

// Sweep B of step t: through a_t = p_t (w + alpha H_t) + d_t. Adds alpha p ga to G
// (completing dL/dH_t), p ga H to dL/dalpha and ga (w + alpha H) to dp.
template <typename scalar_t>
void backward_sweep_drive(const Problem<scalar_t>& P, const Split& sp, const scalar_t* Ht, scalar_t* G, int64_t t,
                          const scalar_t* ga, scalar_t* galpha, scalar_t* dp) {
  const Dims d = P.d;
  const scalar_t* p = P.pre(t);
  const int64_t n = d.n_out;
  at::parallel_for(0, sp.tasks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t i = sp.begin(k, d.n_in); i < sp.end(k, d.n_in); ++i) {
        const scalar_t* wr = P.w + i * n;
        const scalar_t* ar = P.alpha + i * n;
        scalar_t* gar = galpha + i * n;
        for (int64_t b = 0; b < d.B; ++b) {
          const int64_t row = b * d.n_in + i;
          const scalar_t pp = p[row];
          const scalar_t* hr = Ht + row * n;
          scalar_t* gr = G + row * n;
          const scalar_t* gab = ga + b * n;
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t h = hr[j], a = ar[j], g = gab[j];
            const scalar_t pg = pp * g;
            gr[j] += pg * a;  // products in the reference's order (see forward_sweep)
            gar[j] += pg * h;
            s += g * wr[j] + g * (a * h);
          }
          dp[row] += s;
        }
      }
    }
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_y, const at::Tensor& grad_hT, const at::Tensor& pre, const at::Tensor& w,
    const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y, const at::Tensor& ckpts, Rule rule, Act act,
    c10::optional<double> clip, const Dims& d, bool recurrent) {
  const auto opts = y.options();
  auto G = grad_hT.clone();
  auto seg = at::empty({std::min(d.K, d.T), d.B, d.n_in, d.n_out}, opts);
  auto g_drive = at::empty({d.T, d.B, d.n_out}, opts);
  auto g_e = at::empty({d.T, d.B, d.n_out}, opts);
  auto g_alpha = at::zeros({d.n_in, d.n_out}, opts);
  auto g_pre = recurrent ? at::empty({d.B, d.n_in}, opts) : at::empty({d.T, d.B, d.n_in}, opts);
  auto gy = at::empty({d.B, d.n_out}, opts);
  auto carry = at::zeros({d.B, d.n_in}, opts);  // dL/dy_t from step t+1 (recurrent form)
  const Split sp = make_split(d);
  auto partial = at::empty({sp.tasks, 2, d.B, d.n_out}, opts);  // dL/de_t, dL/dy_t per task

  const auto P = Problem<scalar_t>::make(d, recurrent, pre, w, alpha, e, y, clip);
  const int64_t trace_numel = d.B * d.n_in * d.n_out;
  const int64_t row_numel = d.B * d.n_out;
  scalar_t* Gp = G.data_ptr<scalar_t>();
  scalar_t* segp = seg.data_ptr<scalar_t>();
  scalar_t* gyp = gy.data_ptr<scalar_t>();
  scalar_t* partp = partial.data_ptr<scalar_t>();
  const scalar_t* grad_yp = grad_y.data_ptr<scalar_t>();

  dispatch_rule(rule, clip.has_value(), [&](auto rule_tag, auto clip_tag) {
    constexpr Rule R = decltype(rule_tag)::value;
    constexpr bool CLIP = decltype(clip_tag)::value;
    for (int64_t c = d.C - 1; c >= 0; --c) {
      const int64_t s = c * d.K, L = std::min(d.K, d.T - s);
      const scalar_t* ck = ckpts.data_ptr<scalar_t>() + c * trace_numel;
      std::copy(ck, ck + trace_numel, segp);
      for (int64_t l = 0; l + 1 < L; ++l) {
        recompute_step<scalar_t, R, CLIP>(P, segp + l * trace_numel, segp + (l + 1) * trace_numel, s + l);
      }
      for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t t = s + l;
        const scalar_t* Ht = segp + l * trace_numel;
        std::copy(grad_yp + t * row_numel, grad_yp + (t + 1) * row_numel, gyp);
        if (recurrent) {
          const scalar_t* cp = carry.data_ptr<scalar_t>();
          for (int64_t k = 0; k < row_numel; ++k) gyp[k] += cp[k];
        }
        scalar_t* dp = recurrent ? (t > 0 ? carry.data_ptr<scalar_t>() : g_pre.data_ptr<scalar_t>())
                                 : g_pre.data_ptr<scalar_t>() + t * d.B * d.n_in;
        backward_sweep_update<scalar_t, R, CLIP>(P, sp, Ht, Gp, t, dp, partp);
        // Add up the tasks' partials: dL/de_t, and dL/dy_t (update path) onto gy.
        scalar_t* ge = g_e.data_ptr<scalar_t>() + t * row_numel;
        for (int64_t r = 0; r < row_numel; ++r) {
          scalar_t se = 0, sy = gyp[r];
          for (int64_t k = 0; k < sp.tasks; ++k) {
            se += partp[(2 * k) * row_numel + r];
            sy += partp[(2 * k + 1) * row_numel + r];
          }
          ge[r] = se;
          gyp[r] = sy;
        }
        scalar_t* gat = g_drive.data_ptr<scalar_t>() + t * row_numel;
        activation_backward(gyp, P.y_at(t), gat, d.B, d.n_out, act);
        backward_sweep_drive<scalar_t>(P, sp, Ht, Gp, t, gat, g_alpha.data_ptr<scalar_t>(), dp);
      }
    }
  });

  // dL/dw = sum_t p_t^T ga_t as one GEMM over all steps.
  at::Tensor P_all = recurrent ? at::cat({pre.unsqueeze(0), y.narrow(0, 0, d.T - 1)}, 0) : pre;
  auto g_w = at::mm(P_all.reshape({d.T * d.B, d.n_in}).t(), g_drive.reshape({d.T * d.B, d.n_out}));
  return {g_pre, g_drive, g_w, g_alpha, g_e, G};
}

// ---------------------------------------------------------------------------------------
// Op entry points

ForwardResult forward_cpu(bool recurrent, const at::Tensor& pre, const at::Tensor& drive, const at::Tensor& w,
                          const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& h0, c10::string_view rule,
                          c10::string_view activation, c10::optional<double> clip, int64_t K) {
  const Dims d = check_canonical(pre, drive, w, alpha, e, h0, clip, K, recurrent);
  const Rule r = parse_rule(to_string(rule));
  const Act a = parse_activation(to_string(activation));
  ForwardResult out;
  AT_DISPATCH_FLOATING_TYPES(drive.scalar_type(), "plastic_forward_cpu", [&] {
    out = forward_impl<scalar_t>(pre, drive, w, alpha, e, h0, r, a, clip, d, recurrent);
  });
  return out;
}

BackwardResult backward_cpu(bool recurrent, const at::Tensor& grad_y, const at::Tensor& grad_hT,
                            const at::Tensor& pre, const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& e,
                            const at::Tensor& y, const at::Tensor& ckpts, c10::string_view rule,
                            c10::string_view activation, c10::optional<double> clip, int64_t K) {
  const Dims d = check_backward(grad_y, grad_hT, pre, w, alpha, e, y, ckpts, clip, K, recurrent);
  const Rule r = parse_rule(to_string(rule));
  const Act a = parse_activation(to_string(activation));
  BackwardResult out;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "plastic_backward_cpu", [&] {
    out = backward_impl<scalar_t>(grad_y, grad_hT, pre, w, alpha, e, y, ckpts, r, a, clip, d, recurrent);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(plastic_ops, CPU, m) { register_kernels<forward_cpu, backward_cpu>(m); }

}  // namespace plastic_ops
