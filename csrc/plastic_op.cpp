// The op schema of plastic_ops (one definition for every backend) and the Python
// module that loads it. Kernels: cpu/plastic_cpu.cpp, cuda/plastic_cuda.cu.
// Math and the meaning of every argument: docs/op_spec.md.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import plastic_ops._C` runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(plastic_ops, m) {
  // Canonical shapes: x (T,B,N_in) | y0 (B,N); drive (T,B,N_out); w, alpha (N_in,N_out);
  // e (T,B,N_out); h0 (B,N_in,N_out). Returns y (T,B,N_out), H_T, and the checkpoints
  // (C,B,N_in,N_out) with C = ceil(T/K), none when checkpoint_every == 0.
  // steps: None or (T,B) uint8 flags, RESET = 1, SKIP = 2 (docs/op_spec.md, "Episode resets and lengths").
  // mod: None or (4,N_out) self-modulation parameters; elig_rate: None or the 0-dim eligibility rate q,
  // and then h0, H_T and each checkpoint hold two planes (2,B,N_in,N_out): H and the eligibility
  // trace E (docs/op_spec.md, "Neuromodulation").
  m.def("plastic_linear_forward(Tensor x, Tensor drive, Tensor w, Tensor alpha, Tensor e, Tensor h0, "
        "str rule, str activation, float? clip, int checkpoint_every, Tensor? steps=None, Tensor? mod=None, "
        "Tensor? elig_rate=None) -> (Tensor, Tensor, Tensor)");
  m.def("plastic_rnn_forward(Tensor y0, Tensor drive, Tensor w, Tensor alpha, Tensor e, Tensor h0, "
        "str rule, str activation, float? clip, int checkpoint_every, Tensor? steps=None, Tensor? mod=None, "
        "Tensor? elig_rate=None) -> (Tensor, Tensor, Tensor)");
  // Returns the gradients of (x | y0, drive, w, alpha, e, h0, mod, elig_rate); those of mod and elig_rate
  // are empty (0,) tensors when they are None.
  m.def("plastic_linear_backward(Tensor grad_y, Tensor grad_hT, Tensor x, Tensor w, Tensor alpha, Tensor e, "
        "Tensor y, Tensor checkpoints, str rule, str activation, float? clip, int checkpoint_every, "
        "Tensor? steps=None, Tensor? mod=None, Tensor? elig_rate=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("plastic_rnn_backward(Tensor grad_y, Tensor grad_hT, Tensor y0, Tensor w, Tensor alpha, Tensor e, "
        "Tensor y, Tensor checkpoints, str rule, str activation, float? clip, int checkpoint_every, "
        "Tensor? steps=None, Tensor? mod=None, Tensor? elig_rate=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
