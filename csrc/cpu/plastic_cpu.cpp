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

// Each task owns the output columns [j0, j1) of a chunk for every i and b, so every
// sum over i or over b has one writer; rows of `width` floats keep the inner loop
// vectorizable.
struct Chunks {
  int64_t width, count;
  int64_t begin(int64_t c) const { return c * width; }
};

Chunks make_chunks(int64_t n_out) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t width = (n_out + 4 * threads - 1) / (4 * threads);  // about 4 chunks a thread
  width = std::max<int64_t>(16, std::min<int64_t>(256, width));
  width = (width + 7) / 8 * 8;
  return {width, (n_out + width - 1) / width};
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

template <typename scalar_t>
inline scalar_t clamp(scalar_t h, scalar_t c) {
  return std::min(std::max(h, -c), c);
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
      case Act::Relu: for (int64_t j = 0; j < n; ++j) yr[j] = ar[j] > 0 ? ar[j] : scalar_t(0); break;
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
      case Act::Relu: for (int64_t j = 0; j < n; ++j) out[j] = yr[j] > 0 ? gr[j] : scalar_t(0); break;
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
// plastic and fixed terms of a_t with the fresh values (ACCUM). acc must hold the drive.
template <typename scalar_t, Rule R, bool CLIP, bool UPDATE, bool ACCUM>
void forward_sweep(const Problem<scalar_t>& P, const Chunks& ch, scalar_t* H, int64_t t, scalar_t* acc) {
  const Dims d = P.d;
  const scalar_t* p_prev = UPDATE ? P.pre(t - 1) : nullptr;
  const scalar_t* y_prev = UPDATE ? P.y_at(t - 1) : nullptr;
  const scalar_t* e_prev = UPDATE ? P.e_at(t - 1) : nullptr;
  const scalar_t* p_cur = ACCUM ? P.pre(t) : nullptr;
  const scalar_t c = P.clip;
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t j0 = ch.begin(chunk), nj = std::min(ch.width, d.n_out - j0);
      for (int64_t i = 0; i < d.n_in; ++i) {
        const scalar_t* wr = P.w + i * d.n_out + j0;
        const scalar_t* ar = P.alpha + i * d.n_out + j0;
        for (int64_t b = 0; b < d.B; ++b) {
          scalar_t* hr = H + (b * d.n_in + i) * d.n_out + j0;
          const scalar_t pp = UPDATE ? p_prev[b * d.n_in + i] : scalar_t(0);
          const scalar_t* yr = UPDATE ? y_prev + b * d.n_out + j0 : nullptr;
          const scalar_t* er = UPDATE ? e_prev + b * d.n_out + j0 : nullptr;
          const scalar_t pc = ACCUM ? p_cur[b * d.n_in + i] : scalar_t(0);
          scalar_t* accr = ACCUM ? acc + b * d.n_out + j0 : nullptr;
#pragma omp simd
          for (int64_t jj = 0; jj < nj; ++jj) {
            scalar_t h = hr[jj];
            if constexpr (UPDATE) {
              h = updated<R>(h, pp, yr[jj], er[jj]);
              if constexpr (CLIP) h = clamp(h, c);
              hr[jj] = h;
            }
            if constexpr (ACCUM) accr[jj] += pc * (wr[jj] + ar[jj] * h);
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
  auto acc = at::empty({d.B, d.n_out}, drive.options());
  Problem<scalar_t> P{d,
                      recurrent,
                      recurrent ? nullptr : pre.data_ptr<scalar_t>(),
                      recurrent ? pre.data_ptr<scalar_t>() : nullptr,
                      w.data_ptr<scalar_t>(),
                      alpha.data_ptr<scalar_t>(),
                      e.data_ptr<scalar_t>(),
                      y.data_ptr<scalar_t>(),
                      static_cast<scalar_t>(clip.value_or(0.0))};
  const Chunks ch = make_chunks(d.n_out);
  scalar_t* Hp = H.data_ptr<scalar_t>();
  scalar_t* accp = acc.data_ptr<scalar_t>();
  const scalar_t* drv = drive.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t trace_numel = d.B * d.n_in * d.n_out;

  dispatch_rule(rule, clip.has_value(), [&](auto rule_tag, auto clip_tag) {
    constexpr Rule R = decltype(rule_tag)::value;
    constexpr bool CLIP = decltype(clip_tag)::value;
    for (int64_t t = 0; t < d.T; ++t) {
      std::copy(drv + t * d.B * d.n_out, drv + (t + 1) * d.B * d.n_out, accp);
      if (t == 0) {
        forward_sweep<scalar_t, R, CLIP, false, true>(P, ch, Hp, t, accp);
      } else {
        forward_sweep<scalar_t, R, CLIP, true, true>(P, ch, Hp, t, accp);
      }
      activate_rows(accp, yp + t * d.B * d.n_out, d.B, d.n_out, act);
      if (d.K > 0 && t % d.K == 0) {  // H now holds H_t
        std::copy(Hp, Hp + trace_numel, ckpts.data_ptr<scalar_t>() + (t / d.K) * trace_numel);
      }
    }
    forward_sweep<scalar_t, R, CLIP, true, false>(P, ch, Hp, d.T, nullptr);  // H_T
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
  at::parallel_for(0, d.B * d.n_in, 16, [&](int64_t r0, int64_t r1) {
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
// path of dL/dH_t; adds to gy (dL/dy_t), ge (dL/de_t) and the chunk partials of dL/dp_t.
template <typename scalar_t, Rule R, bool CLIP>
void backward_sweep_update(const Problem<scalar_t>& P, const Chunks& ch, const scalar_t* Ht, scalar_t* G, int64_t t,
                           scalar_t* gy, scalar_t* ge, scalar_t* partial) {
  const Dims d = P.d;
  const scalar_t* p = P.pre(t);
  const scalar_t* yt = P.y_at(t);
  const scalar_t* et = P.e_at(t);
  const scalar_t c = P.clip;
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t j0 = ch.begin(chunk), nj = std::min(ch.width, d.n_out - j0);
      scalar_t* part = partial + chunk * d.B * d.n_in;
      for (int64_t i = 0; i < d.n_in; ++i) {
        for (int64_t b = 0; b < d.B; ++b) {
          const int64_t row = b * d.n_in + i;
          const scalar_t pp = p[row];
          const scalar_t* hr = Ht + row * d.n_out + j0;
          scalar_t* gr = G + row * d.n_out + j0;
          const scalar_t* yr = yt + b * d.n_out + j0;
          const scalar_t* er = et + b * d.n_out + j0;
          scalar_t* ger = ge + b * d.n_out + j0;
          scalar_t* gyr = gy + b * d.n_out + j0;
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t jj = 0; jj < nj; ++jj) {
            const scalar_t h = hr[jj], yy = yr[jj], ee = er[jj];
            scalar_t g = gr[jj];
            if constexpr (CLIP) {
              const scalar_t hp = updated<R>(h, pp, yy, ee);
              g = (hp >= -c && hp <= c) ? g : scalar_t(0);
            }
            if constexpr (R == Rule::Hebb) {
              ger[jj] += g * (pp * yy - h);
              gyr[jj] += g * ee * pp;
              gr[jj] = g * (scalar_t(1) - ee);
            } else {
              ger[jj] += g * yy * (pp - h * yy);
              gyr[jj] += g * ee * (pp - scalar_t(2) * h * yy);
              gr[jj] = g * (scalar_t(1) - ee * yy * yy);
            }
            s += g * ee * yy;
          }
          part[row] += s;
        }
      }
    }
  });
}

// Sweep B of step t: through a_t = p_t (w + alpha H_t) + d_t. Adds alpha p ga to G
// (completing dL/dH_t), p ga H to dL/dalpha and ga (w + alpha H) to the partials of dL/dp_t.
template <typename scalar_t>
void backward_sweep_drive(const Problem<scalar_t>& P, const Chunks& ch, const scalar_t* Ht, scalar_t* G, int64_t t,
                          const scalar_t* ga, scalar_t* galpha, scalar_t* partial) {
  const Dims d = P.d;
  const scalar_t* p = P.pre(t);
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t j0 = ch.begin(chunk), nj = std::min(ch.width, d.n_out - j0);
      scalar_t* part = partial + chunk * d.B * d.n_in;
      for (int64_t i = 0; i < d.n_in; ++i) {
        const scalar_t* wr = P.w + i * d.n_out + j0;
        const scalar_t* ar = P.alpha + i * d.n_out + j0;
        scalar_t* gar = galpha + i * d.n_out + j0;
        for (int64_t b = 0; b < d.B; ++b) {
          const int64_t row = b * d.n_in + i;
          const scalar_t pp = p[row];
          const scalar_t* hr = Ht + row * d.n_out + j0;
          scalar_t* gr = G + row * d.n_out + j0;
          const scalar_t* gab = ga + b * d.n_out + j0;
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t jj = 0; jj < nj; ++jj) {
            const scalar_t h = hr[jj], a = ar[jj], g = gab[jj];
            gr[jj] += a * pp * g;
            gar[jj] += pp * g * h;
            s += g * (wr[jj] + a * h);
          }
          part[row] += s;
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
  auto g_e = at::zeros({d.T, d.B, d.n_out}, opts);
  auto g_alpha = at::zeros({d.n_in, d.n_out}, opts);
  auto g_pre = recurrent ? at::empty({d.B, d.n_in}, opts) : at::empty({d.T, d.B, d.n_in}, opts);
  auto gy = at::empty({d.B, d.n_out}, opts);
  auto carry = at::zeros({d.B, d.n_in}, opts);  // dL/dy_t from step t+1 (recurrent form)
  const Chunks ch = make_chunks(d.n_out);
  auto partial = at::empty({ch.count, d.B, d.n_in}, opts);

  Problem<scalar_t> P{d,
                      recurrent,
                      recurrent ? nullptr : pre.data_ptr<scalar_t>(),
                      recurrent ? pre.data_ptr<scalar_t>() : nullptr,
                      w.data_ptr<scalar_t>(),
                      alpha.data_ptr<scalar_t>(),
                      e.data_ptr<scalar_t>(),
                      y.data_ptr<scalar_t>(),
                      static_cast<scalar_t>(clip.value_or(0.0))};
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
        partial.zero_();
        backward_sweep_update<scalar_t, R, CLIP>(P, ch, Ht, Gp, t, gyp, g_e.data_ptr<scalar_t>() + t * row_numel,
                                                 partp);
        scalar_t* gat = g_drive.data_ptr<scalar_t>() + t * row_numel;
        activation_backward(gyp, P.y_at(t), gat, d.B, d.n_out, act);
        backward_sweep_drive<scalar_t>(P, ch, Ht, Gp, t, gat, g_alpha.data_ptr<scalar_t>(), partp);
        // dL/dp_t: add up the chunk partials.
        scalar_t* dp = recurrent ? (t > 0 ? carry.data_ptr<scalar_t>() : g_pre.data_ptr<scalar_t>())
                                 : g_pre.data_ptr<scalar_t>() + t * d.B * d.n_in;
        const int64_t n = d.B * d.n_in;
        std::fill(dp, dp + n, scalar_t(0));
        for (int64_t k = 0; k < ch.count; ++k) {
          const scalar_t* src = partp + k * n;
          for (int64_t r = 0; r < n; ++r) dp[r] += src[r];
        }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& pre, const at::Tensor& drive,
                                                          const at::Tensor& w, const at::Tensor& alpha,
                                                          const at::Tensor& e, const at::Tensor& h0,
                                                          c10::string_view rule, c10::string_view activation,
                                                          c10::optional<double> clip, int64_t K, bool recurrent) {
  const Dims d = check_canonical(pre, drive, w, alpha, e, h0, clip, K, recurrent);
  const Rule r = parse_rule(std::string(rule.data(), rule.size()));
  const Act a = parse_activation(std::string(activation.data(), activation.size()));
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(drive.scalar_type(), "plastic_forward_cpu", [&] {
    out = forward_impl<scalar_t>(pre, drive, w, alpha, e, h0, r, a, clip, d, recurrent);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_hT, const at::Tensor& pre, const at::Tensor& w,
    const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y, const at::Tensor& ckpts,
    c10::string_view rule, c10::string_view activation, c10::optional<double> clip, int64_t K, bool recurrent) {
  // The drive is not needed by the backward: y stands for it in the shape checks.
  const Dims d = check_canonical(pre, y, w, alpha, e, grad_hT, clip, K, recurrent);
  TORCH_CHECK(K > 0 && ckpts.dim() == 4 && ckpts.size(0) == d.C,
              "plastic_ops: the backward needs the forward's checkpoints (checkpoint_every > 0)");
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.is_contiguous() && ckpts.is_contiguous(),
              "plastic_ops: grad_y must match y and be contiguous");
  const Rule r = parse_rule(std::string(rule.data(), rule.size()));
  const Act a = parse_activation(std::string(activation.data(), activation.size()));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "plastic_backward_cpu", [&] {
    out = backward_impl<scalar_t>(grad_y, grad_hT, pre, w, alpha, e, y, ckpts, r, a, clip, d, recurrent);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_cpu(const at::Tensor& x, const at::Tensor& drive,
                                                                 const at::Tensor& w, const at::Tensor& alpha,
                                                                 const at::Tensor& e, const at::Tensor& h0,
                                                                 c10::string_view rule, c10::string_view activation,
                                                                 c10::optional<double> clip, int64_t K) {
  return forward_cpu(x, drive, w, alpha, e, h0, rule, activation, clip, K, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_forward_cpu(const at::Tensor& y0, const at::Tensor& drive,
                                                              const at::Tensor& w, const at::Tensor& alpha,
                                                              const at::Tensor& e, const at::Tensor& h0,
                                                              c10::string_view rule, c10::string_view activation,
                                                              c10::optional<double> clip, int64_t K) {
  return forward_cpu(y0, drive, w, alpha, e, h0, rule, activation, clip, K, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_hT, const at::Tensor& x, const at::Tensor& w,
    const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y, const at::Tensor& ckpts,
    c10::string_view rule, c10::string_view activation, c10::optional<double> clip, int64_t K) {
  return backward_cpu(grad_y, grad_hT, x, w, alpha, e, y, ckpts, rule, activation, clip, K, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_hT, const at::Tensor& y0, const at::Tensor& w,
    const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y, const at::Tensor& ckpts,
    c10::string_view rule, c10::string_view activation, c10::optional<double> clip, int64_t K) {
  return backward_cpu(grad_y, grad_hT, y0, w, alpha, e, y, ckpts, rule, activation, clip, K, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(plastic_ops, CPU, m) {
  m.impl("plastic_linear_forward", &linear_forward_cpu);
  m.impl("plastic_rnn_forward", &rnn_forward_cpu);
  m.impl("plastic_linear_backward", &linear_backward_cpu);
  m.impl("plastic_rnn_backward", &rnn_backward_cpu);
}

}  // namespace plastic_ops
