// The one definition of distill_engine::register_cuda (declared in csrc/common.h, called by bindings.cpp
// when the extension is built WITH_CUDA). It binds the launchers declared in cuda_ops.h and then runs
// every bindings function other .cu files registered with DE_CUDA_REGISTER(fn).
//
// The Python-facing functions take device pointers and the CUDA stream as integers (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream); the Python wrappers (distill_engine/kernels/teacher_targets.py,
// distill_engine/ops/packing.py) check dtypes, shapes, contiguity and device and set the current device.
// Taking integers keeps this file free of ATen's CUDA headers: it compiles against pybind11 alone.
#define DE_CUDA_WITH_PYBIND
#include "cuda_ops.h"

#include <cuda_runtime.h>

// Host code only: skip it in the device pass (pybind11 there would only cost compile time).
#ifndef __CUDA_ARCH__
#include <stdexcept>
#include <string>
#include <vector>

namespace distill_engine {
namespace cuda {
namespace {

std::vector<BindingsFn>& bindings_list() {
  static std::vector<BindingsFn> list;  // constructed on first use: safe during static initialisation
  return list;
}

template <typename T>
T* ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

cudaStream_t stream_of(int64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s)); }

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void bind_teacher_targets(pybind11::module_& m) {
  m.def(
      "tt_topk_merge",
      [](int64_t cand_vals, int64_t cand_ids, int64_t split_max, int64_t split_sum, int64_t out_ids,
         int64_t out_logprobs, int64_t out_lse, int64_t rows, int64_t M, int64_t S, int64_t k, int64_t stream) {
        launch_topk_merge(ptr<const float>(cand_vals), ptr<const int32_t>(cand_ids), ptr<const float>(split_max),
                          ptr<const float>(split_sum), ptr<int32_t>(out_ids), ptr<float>(out_logprobs),
                          ptr<float>(out_lse), rows, M, S, k, stream_of(stream));
        check_launch("tt_topk_merge");
      },
      "merge per-split top-k candidates (device pointers; see csrc/cuda/cuda_ops.h)");
  m.def(
      "tt_pack_id_bits",
      [](int64_t ids, int64_t n, int bits, int32_t vocab, int64_t words, int64_t n_words, int64_t stream) {
        launch_pack_id_bits(ptr<const int32_t>(ids), n, bits, vocab, ptr<uint32_t>(words), n_words, stream_of(stream));
        check_launch("tt_pack_id_bits");
      },
      "bit-pack int32 ids (device pointers)");
  m.def(
      "tt_unpack_id_bits",
      [](int64_t words, int64_t n_words, int64_t n, int bits, int32_t vocab, int64_t ids, int64_t bad,
         int64_t stream) {
        launch_unpack_id_bits(ptr<const uint32_t>(words), n_words, n, bits, vocab, ptr<int32_t>(ids),
                              ptr<int32_t>(bad), stream_of(stream));
        check_launch("tt_unpack_id_bits");
      },
      "unpack bit-packed ids (device pointers)");
  m.def(
      "tt_quantize_u8",
      [](int64_t logprobs, int64_t ids, int64_t rows, int64_t k, float floor_v, int64_t codes, int64_t offset_h,
         int64_t scale_h, int64_t stream) {
        launch_quantize_u8(ptr<const float>(logprobs), ptr<const int32_t>(ids), rows, k, floor_v, ptr<uint8_t>(codes),
                           ptr<uint16_t>(offset_h), ptr<uint16_t>(scale_h), stream_of(stream));
        check_launch("tt_quantize_u8");
      },
      "per-row uint8 quantization of log-probabilities (device pointers)");
  m.def(
      "tt_dequantize_u8",
      [](int64_t codes, int64_t offset_h, int64_t scale_h, int64_t rows, int64_t k, int64_t logprobs,
         int64_t stream) {
        launch_dequantize_u8(ptr<const uint8_t>(codes), ptr<const uint16_t>(offset_h), ptr<const uint16_t>(scale_h),
                             rows, k, ptr<float>(logprobs), stream_of(stream));
        check_launch("tt_dequantize_u8");
      },
      "uint8 codes → log-probabilities (device pointers)");
}

}  // namespace

bool add_cuda_bindings(BindingsFn fn) {
  bindings_list().push_back(fn);
  return true;
}

}  // namespace cuda

void register_cuda(pybind11::module_& m) {
  cuda::bind_teacher_targets(m);
  for (cuda::BindingsFn fn : cuda::bindings_list()) fn(m);
}

}  // namespace distill_engine
#endif  // __CUDA_ARCH__
