// The one pybind11 module, distill_engine._C. Every op adds its own functions.
#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distill_engine C++ kernels (CPU always, CUDA when built with it)";
  distill_engine::register_distill_loss(m);
  distill_engine::register_teacher_targets(m);
  distill_engine::register_projection(m);
  distill_engine::register_token_relation(m);
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
  distill_engine::register_cuda(m);
#else
  m.attr("WITH_CUDA") = false;
#endif
}
