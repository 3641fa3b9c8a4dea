// Argument-check macros and declarations shared by the C++ kernels.
#pragma once
#include <torch/extension.h>

#define DE_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define DE_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor")
#define DE_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define DE_CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype " #dt)
#define DE_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have " #n " dimensions")
#define DE_CHECK_CPU_INPUT(x) \
  DE_CHECK_CPU(x);            \
  DE_CHECK_CONTIGUOUS(x)
#define DE_CHECK_CUDA_INPUT(x) \
  DE_CHECK_CUDA(x);            \
  DE_CHECK_CONTIGUOUS(x)

namespace distill_engine {
// Each op's translation unit registers its functions on the module.
void register_distill_loss(pybind11::module_& m);   // csrc/cpu/distill_loss.cpp
void register_teacher_targets(pybind11::module_& m);  // csrc/cpu/teacher_targets.cpp
void register_projection(pybind11::module_& m);     // csrc/cpu/projection.cpp
void register_token_relation(pybind11::module_& m);  // csrc/cpu/token_relation.cpp
#ifdef WITH_CUDA
void register_cuda(pybind11::module_& m);           // csrc/cuda/*.cu
#endif
}  // namespace distill_engine
