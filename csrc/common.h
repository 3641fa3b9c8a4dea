// Argument-check macros shared by the C++ kernels.
//
// Every kernel is a PyTorch operator in the namespace `distill_engine_C` (distinct from the Python custom
// ops' namespace `distill_engine`, distill_engine/ops/library.py): csrc/bindings.cpp holds the one
// TORCH_LIBRARY block with the CPU ops' schemas, each csrc/cpu/*.cpp registers its kernels with
// TORCH_LIBRARY_IMPL(distill_engine_C, CPU, m), and csrc/cuda/register.cu adds the CUDA ops' schemas
// (TORCH_LIBRARY_FRAGMENT) and kernels (TORCH_LIBRARY_IMPL(distill_engine_C, CUDA, m)).  Python reaches them
// as torch.ops.distill_engine_C.<op> (distill_engine/_backend.py::cpu_extension()).
// The checks raise c10::Error (RuntimeError in Python) with a message that names the argument.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#define DE_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got one on ", (x).device())
#define DE_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous (call .contiguous())")
#define DE_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define DE_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have " #n " dimensions, got shape ", (x).sizes())
#define DE_CHECK_CPU_INPUT(x) \
  DE_CHECK_CPU(x);            \
  DE_CHECK_CONTIGUOUS(x)
