// What every backend of the plastic op shares: option parsing and the shape checks of
// the canonical arguments (the Python wrapper has already given the user clear errors;
// these guard direct calls of torch.ops.plastic_ops.*). Math: docs/op_spec.md.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>

namespace plastic_ops {

enum class Rule { Hebb, Oja, Add };
enum class Act { Tanh, Sigmoid, Relu, Identity, Softmax };

inline Rule parse_rule(const std::string& s) {
  if (s == "hebb") return Rule::Hebb;
  if (s == "oja") return Rule::Oja;
  if (s == "add") return Rule::Add;
  TORCH_CHECK(false, "plastic_ops: unknown rule '", s, "' (expected 'hebb', 'oja' or 'add')");
}

inline Act parse_activation(const std::string& s) {
  if (s == "tanh") return Act::Tanh;
  if (s == "sigmoid") return Act::Sigmoid;
  if (s == "relu") return Act::Relu;
  if (s == "identity") return Act::Identity;
  if (s == "softmax") return Act::Softmax;
  TORCH_CHECK(false, "plastic_ops: unknown activation '", s, "'");
}

// Sizes of one call, read from the canonical tensors.
struct Dims {
  int64_t T, B, n_in, n_out, K, C;
};

// ceil(T / K) written so that no K up to INT64_MAX can overflow (T >= 1, K >= 0).
inline int64_t num_checkpoints(int64_t T, int64_t K) { return K == 0 ? 0 : (T - 1) / K + 1; }

// Dtypes (docs/op_spec.md, "Dtypes"): every tensor but the trace has the inputs' dtype (float64,
// float32, bfloat16 or float16); the trace, its checkpoints and dL/dH are stored in float32 or
// bfloat16 for float32 and 16-bit inputs, in float64 for float64 inputs.
inline void check_dtypes(at::ScalarType inputs, at::ScalarType trace) {
  TORCH_CHECK(inputs == at::kDouble || inputs == at::kFloat || inputs == at::kBFloat16 || inputs == at::kHalf,
              "plastic_ops: the inputs must be float64, float32, bfloat16 or float16, got ", inputs);
  const bool ok = inputs == at::kDouble ? trace == at::kDouble : (trace == at::kFloat || trace == at::kBFloat16);
  TORCH_CHECK(ok, "plastic_ops: a trace of dtype ", trace, " is not supported for ", inputs,
              " inputs (float64 inputs: float64; others: float32 or bfloat16)");
}

// Calls f(trace_t{}) with the trace's storage type: bfloat16, or else the accumulation type of scalar_t.
template <typename scalar_t, typename F>
void dispatch_trace(at::ScalarType trace, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<acc_t, double>::value) {
    f(acc_t{});
  } else {
    if (trace == at::kBFloat16) f(c10::BFloat16{}); else f(acc_t{});
  }
}

// A backward run inside an autocast region (loss.backward() under torch.autocast) must not have
// its at::mm cast to 16 bits: the op computes in the accumulation type whatever its inputs' dtype.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// pre: x (T,B,N_in) for the linear form, y0 (B,N) for the recurrent form.
inline Dims check_canonical(const at::Tensor& pre, const at::Tensor& drive, const at::Tensor& w,
                            const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& h0,
                            c10::optional<double> clip, int64_t K, bool recurrent) {
  TORCH_CHECK(drive.dim() == 3, "plastic_ops: drive must be (T, B, N_out)");
  TORCH_CHECK(w.dim() == 2, "plastic_ops: w must be (N_in, N_out)");
  TORCH_CHECK(drive.size(0) > 0, "plastic_ops: T must be positive");
  TORCH_CHECK(K >= 0, "plastic_ops: checkpoint_every must be >= 0, got ", K);
  Dims d{drive.size(0), drive.size(1), w.size(0), w.size(1), K, num_checkpoints(drive.size(0), K)};
  TORCH_CHECK(drive.size(2) == d.n_out, "plastic_ops: drive must be (T, B, N_out)");
  if (recurrent) {
    TORCH_CHECK(d.n_in == d.n_out, "plastic_ops: w must be square for the recurrent form");
    TORCH_CHECK(pre.dim() == 2 && pre.size(0) == d.B && pre.size(1) == d.n_in, "plastic_ops: y0 must be (B, N)");
  } else {
    TORCH_CHECK(pre.dim() == 3 && pre.size(0) == d.T && pre.size(1) == d.B && pre.size(2) == d.n_in,
                "plastic_ops: x must be (T, B, N_in)");
  }
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == d.n_in && alpha.size(1) == d.n_out,
              "plastic_ops: alpha must be expanded to (N_in, N_out)");
  TORCH_CHECK(e.dim() == 3 && e.size(0) == d.T && e.size(1) == d.B && e.size(2) == d.n_out,
              "plastic_ops: e must be (T, B, N_out)");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == d.B && h0.size(1) == d.n_in && h0.size(2) == d.n_out,
              "plastic_ops: h0 must be (B, N_in, N_out)");
  TORCH_CHECK(!clip.has_value() || *clip > 0, "plastic_ops: clip must be positive");
  check_dtypes(drive.scalar_type(), h0.scalar_type());
  for (const at::Tensor* t : {&pre, &drive, &w, &alpha, &e, &h0}) {
    TORCH_CHECK(t->is_contiguous(), "plastic_ops: canonical arguments must be contiguous");
    TORCH_CHECK(t == &h0 || t->scalar_type() == drive.scalar_type(),
                "plastic_ops: all tensors but the trace must share a dtype");
    TORCH_CHECK(t->device() == drive.device(), "plastic_ops: all tensors must share a device");
    // The ops have no forward-mode formula: a tangent would be dropped without a word.
    TORCH_CHECK(!t->_fw_grad(/*level=*/0).defined(),
                "plastic_ops: forward-mode AD is not supported by torch.ops.plastic_ops.*; call "
                "plastic_ops.plastic_linear / plastic_rnn, which run the reference for dual tensors");
  }
  return d;
}

// The bits of the per-step flags `steps` (docs/op_spec.md, "Episode resets and lengths").
constexpr uint8_t kReset = 1, kSkip = 2;

// steps: None, or (T, B) uint8, contiguous, on the op's device. Returns whether flags are given.
inline bool check_steps(const c10::optional<at::Tensor>& steps, const Dims& d, const at::Device& device) {
  if (!steps.has_value() || !steps->defined()) return false;
  const at::Tensor& s = *steps;
  TORCH_CHECK(s.dim() == 2 && s.size(0) == d.T && s.size(1) == d.B, "plastic_ops: steps must be (T, B) = (", d.T,
              ", ", d.B, "), got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kByte, "plastic_ops: steps must be uint8, got ", s.scalar_type());
  TORCH_CHECK(s.is_contiguous(), "plastic_ops: steps must be contiguous");
  TORCH_CHECK(s.device() == device, "plastic_ops: steps is on ", s.device(), " but the other tensors are on ", device);
  return true;
}

// A 1-D empty grad_hT stands for dL/dH_T = 0 (the caller's gradient was None), so that no
// trace of zeros is built, copied or read (docs/op_spec.md, "Checkpointing").
inline bool is_zero_grad_marker(const at::Tensor& grad_hT) { return grad_hT.dim() == 1 && grad_hT.numel() == 0; }

// The backward's arguments: the forward's canonical ones, with grad_y standing for the
// drive (same shape) and grad_hT for h0, plus y and the checkpoints.
// eligible: the traces hold two planes, H and E (docs/op_spec.md, "Neuromodulation"): grad_hT is
// (2, B, N_in, N_out) and the checkpoints (C, 2, B, N_in, N_out).
inline Dims check_backward(const at::Tensor& grad_y, const at::Tensor& grad_hT, const at::Tensor& pre,
                           const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y,
                           const at::Tensor& ckpts, c10::optional<double> clip, int64_t K, bool recurrent,
                           bool eligible = false) {
  const int64_t cdim = eligible ? 5 : 4;
  // checkpoint 0 has the trace's shape, dtype and device: it stands in for the zero marker's checks
  const bool stand_in = is_zero_grad_marker(grad_hT) && ckpts.dim() == cdim && ckpts.size(0) > 0;
  if (eligible && !stand_in) {
    TORCH_CHECK(grad_hT.dim() == 4 && grad_hT.size(0) == 2,
                "plastic_ops: with eligibility traces grad_hT must be (2, B, N_in, N_out)");
  }
  const at::Tensor& stacked = stand_in ? ckpts.select(0, 0) : grad_hT;
  const at::Tensor trace = eligible ? stacked.select(0, 0) : stacked;
  const Dims d = check_canonical(pre, grad_y, w, alpha, e, trace, clip, K, recurrent);
  TORCH_CHECK(K >= 1, "plastic_ops: the backward needs the checkpoints of a forward run with checkpoint_every >= 1");
  TORCH_CHECK(y.sizes() == grad_y.sizes(), "plastic_ops: y must be (T, B, N_out)");
  const int64_t o = eligible ? 1 : 0;
  TORCH_CHECK(ckpts.dim() == cdim && ckpts.size(0) == d.C && (!eligible || ckpts.size(1) == 2) &&
                  ckpts.size(1 + o) == d.B && ckpts.size(2 + o) == d.n_in && ckpts.size(3 + o) == d.n_out,
              eligible ? "plastic_ops: checkpoints must be (ceil(T / checkpoint_every), 2, B, N_in, N_out)"
                       : "plastic_ops: checkpoints must be (ceil(T / checkpoint_every), B, N_in, N_out)");
  TORCH_CHECK(y.scalar_type() == grad_y.scalar_type(), "plastic_ops: all tensors but the trace must share a dtype");
  TORCH_CHECK(ckpts.scalar_type() == trace.scalar_type(),
              "plastic_ops: the checkpoints and grad_hT must have the trace's dtype");
  for (const at::Tensor* t : {&y, &ckpts}) {
    TORCH_CHECK(t->is_contiguous(), "plastic_ops: canonical arguments must be contiguous");
    TORCH_CHECK(t->device() == grad_y.device(), "plastic_ops: all tensors must share a device");
  }
  return d;
}

// The options of docs/op_spec.md, "Neuromodulation": mod, None or (4, N_out); elig_rate, None or
// 0-dim, with the traces in two planes. Returns {has mod, has eligibility}. h0_or_trace: h0 in the
// forward ((2, B, N_in, N_out) with eligibility), nullptr in the backward (checked by check_backward).
struct Neuro {
  bool mod, eligible;
};

inline Neuro check_neuro(const c10::optional<at::Tensor>& mod, const c10::optional<at::Tensor>& elig_rate,
                         Rule rule, int64_t n_out, const at::Tensor& like, const at::Tensor* h0) {
  Neuro n{mod.has_value() && mod->defined(), elig_rate.has_value() && elig_rate->defined()};
  for (const at::Tensor* t : {n.mod ? &*mod : nullptr, n.eligible ? &*elig_rate : nullptr}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->is_contiguous(), "plastic_ops: canonical arguments must be contiguous");
    TORCH_CHECK(t->scalar_type() == like.scalar_type(), "plastic_ops: all tensors but the trace must share a dtype");
    TORCH_CHECK(t->device() == like.device(), "plastic_ops: all tensors must share a device");
    TORCH_CHECK(!t->_fw_grad(/*level=*/0).defined(),
                "plastic_ops: forward-mode AD is not supported by torch.ops.plastic_ops.*; call "
                "plastic_ops.plastic_linear / plastic_rnn, which run the reference for dual tensors");
  }
  if (n.mod) {
    TORCH_CHECK(mod->dim() == 2 && mod->size(0) == 4 && mod->size(1) == n_out,
                "plastic_ops: mod must be (4, N_out) = (4, ", n_out, "), got ", mod->sizes());
  }
  if (n.eligible) {
    TORCH_CHECK(elig_rate->dim() == 0, "plastic_ops: elig_rate must be 0-dim, got ", elig_rate->sizes());
    TORCH_CHECK(rule != Rule::Oja, "plastic_ops: Oja's rule has no eligibility-trace form (use 'hebb' or 'add')");
  }
  if (h0 != nullptr) {
    TORCH_CHECK(h0->dim() == (n.eligible ? 4 : 3) && (!n.eligible || h0->size(0) == 2),
                n.eligible ? "plastic_ops: with eligibility traces h0 must be (2, B, N_in, N_out): H_0 and E_0"
                           : "plastic_ops: h0 must be (B, N_in, N_out)");
  }
  return n;
}

// The trace plane H of a (2, B, N_in, N_out) pair, or the trace itself (a contiguous view).
inline at::Tensor trace_plane(const at::Tensor& h0, bool eligible) { return eligible ? h0.select(0, 0) : h0; }

inline std::string to_string(c10::string_view s) { return std::string(s.data(), s.size()); }

// Each backend implements the op once, for both forms; the schema has one op per form.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardImpl = ForwardResult (*)(bool recurrent, const at::Tensor& pre, const at::Tensor& drive,
                                      const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& e,
                                      const at::Tensor& h0, c10::string_view rule, c10::string_view activation,
                                      c10::optional<double> clip, int64_t K, const c10::optional<at::Tensor>& steps,
                                      const c10::optional<at::Tensor>& mod,
                                      const c10::optional<at::Tensor>& elig_rate);
using BackwardImpl = BackwardResult (*)(bool recurrent, const at::Tensor& grad_y, const at::Tensor& grad_hT,
                                        const at::Tensor& pre, const at::Tensor& w, const at::Tensor& alpha,
                                        const at::Tensor& e, const at::Tensor& y, const at::Tensor& ckpts,
                                        c10::string_view rule, c10::string_view activation,
                                        c10::optional<double> clip, int64_t K,
                                        const c10::optional<at::Tensor>& steps,
                                        const c10::optional<at::Tensor>& mod,
                                        const c10::optional<at::Tensor>& elig_rate);

template <ForwardImpl F, bool Recurrent>
ForwardResult forward_form(const at::Tensor& pre, const at::Tensor& drive, const at::Tensor& w,
                           const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& h0, c10::string_view rule,
                           c10::string_view activation, c10::optional<double> clip, int64_t K,
                           const c10::optional<at::Tensor>& steps, const c10::optional<at::Tensor>& mod,
                           const c10::optional<at::Tensor>& elig_rate) {
  return F(Recurrent, pre, drive, w, alpha, e, h0, rule, activation, clip, K, steps, mod, elig_rate);
}

template <BackwardImpl F, bool Recurrent>
BackwardResult backward_form(const at::Tensor& grad_y, const at::Tensor& grad_hT, const at::Tensor& pre,
                             const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& e, const at::Tensor& y,
                             const at::Tensor& ckpts, c10::string_view rule, c10::string_view activation,
                             c10::optional<double> clip, int64_t K, const c10::optional<at::Tensor>& steps,
                             const c10::optional<at::Tensor>& mod, const c10::optional<at::Tensor>& elig_rate) {
  return F(Recurrent, grad_y, grad_hT, pre, w, alpha, e, y, ckpts, rule, activation, clip, K, steps, mod, elig_rate);
}

// Registers one backend's kernels for the four ops of csrc/plastic_op.cpp.
template <ForwardImpl F, BackwardImpl Bk>
void register_kernels(torch::Library& m) {
  m.impl("plastic_linear_forward", &forward_form<F, false>);
  m.impl("plastic_rnn_forward", &forward_form<F, true>);
  m.impl("plastic_linear_backward", &backward_form<Bk, false>);
  m.impl("plastic_rnn_backward", &backward_form<Bk, true>);
}

}  // namespace plastic_ops
