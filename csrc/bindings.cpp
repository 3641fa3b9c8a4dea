// The extension module distill_engine._C and the schemas of its CPU operators.
//
// Importing distill_engine._C loads this library, whose static initialisers register the operators below
// with PyTorch's dispatcher; Python then calls them as torch.ops.distill_engine_C.<op> (tensors in,
// tensors out, arguments checked in C++ with TORCH_CHECK).  The Python module itself holds only
// WITH_CUDA, so the library needs neither pybind11 nor libtorch_python.
//
// Schemas: `Tensor(a!)` marks an argument the kernel writes into (scratch buffers and gradient
// accumulators); every returned tensor is freshly allocated.  The CPU kernels are registered in
// csrc/cpu/*.cpp, the CUDA operators (schemas and kernels) in csrc/cuda/register.cu.
#include <Python.h>

#include "common.h"

TORCH_LIBRARY(distill_engine_C, m) {
  // The fake (meta) implementations, for FakeTensor tracing and torch.compile, live in this Python module.
  m.set_python_module("distill_engine._cpp_ops");
  // csrc/cpu/distill_loss.cpp
  m.def("distill_logits_lse(Tensor h, Tensor weight, Tensor? bias, float temperature, bool need_lse1, "
        "Tensor? exclude_ids=None) -> (Tensor buf, Tensor lse_T, Tensor lse_1)");
  m.def("distill_dense_grad(Tensor(a!) buf, Tensor h, Tensor weight, float temperature, Tensor lse_T, "
        "Tensor? lse_1, Tensor s_q, Tensor? s_1, Tensor(b!) dW_acc, Tensor(c!)? db_acc, Tensor? sparse_ids=None, "
        "Tensor? sparse_coef=None) -> Tensor");
  m.def("distill_buf_lse(Tensor buf, float temperature) -> Tensor");
  m.def("_vexp(Tensor x) -> Tensor");  // the kernels' exp (csrc/cpu/math.h), for its accuracy test
  // csrc/cpu/projection_loss.cpp
  m.def("projection_chunk(Tensor h, Tensor weight, Tensor? bias, Tensor t, int kind, float zero_norm_sq, "
        "Tensor? row_scale, Tensor(a!)? dW_acc, Tensor(b!)? db_acc, Tensor(c!)? dh_out) -> (Tensor, Tensor)");
  // csrc/cpu/teacher_targets.cpp
  m.def("teacher_topk_chunk(Tensor hidden, Tensor weight, Tensor? bias, int k, float inv_t, Tensor(a!) buf) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("teacher_sample_chunk(Tensor hidden, Tensor weight, Tensor? bias, float inv_t, Tensor u, Tensor(a!) buf) "
        "-> (Tensor, Tensor)");
  // csrc/cpu/token_relation.cpp
  m.def("token_relation_forward(Tensor S, Tensor T, int heads, Tensor mask, bool causal, int bq=128, "
        "int bk=256) -> (Tensor, Tensor, Tensor)");
  m.def("token_relation_backward(Tensor S, Tensor T, int heads, Tensor mask, bool causal, Tensor lse_s, "
        "Tensor lse_t, Tensor c, Tensor g, bool need_s, bool need_t, int bq=128, int bk=256) -> (Tensor, Tensor)");
}

// The Python module: import distill_engine._C loads the library (and with it the registrations above).
PyMODINIT_FUNC PyInit__C(void) {  // extern "C", exported
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "distill_engine C++ kernels: the operators torch.ops.distill_engine_C.*", -1,
                                   nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddObject(mod, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(with_cuda);
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
