// The CUDA operators of distill_engine._C: torch.ops.distill_engine_C.tt_* (teacher-target merge and the
// packed-target codecs), registered for the CUDA dispatch key.
//
// Each operator takes tensors, checks them with TORCH_CHECK (device, dtype, contiguity, shape — messages
// name the argument), allocates its outputs on the input's device, and runs the launcher declared in
// cuda_ops.h on the CURRENT stream of that device (under a device guard), like any ATen CUDA op.
// Device and stream come through c10's device-generic interface (c10::DeviceGuard and
// c10::impl::getDeviceGuardImpl(CUDA)->getStream(device).native_handle(), both implemented by c10_cuda at
// run time) rather than <c10/cuda/CUDAStream.h>: that header needs the build-generated
// c10/cuda/impl/cuda_cmake_macros.h, which a CPU build of torch does not ship, and the compile test
// (tests/test_cuda_compile.py) builds this file against such a torch.
//
// Host code only: the device pass of nvcc skips the whole file (it holds no kernels, and parsing the ATen
// headers there would only cost compile time).
#ifndef __CUDA_ARCH__
#include <cuda_runtime.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <tuple>

#include "common.h"
#include "cuda/cuda_ops.h"

namespace distill_engine {
namespace cuda {
namespace {

// The current CUDA stream of `device` (set by torch.cuda.stream(...) or the default stream).
cudaStream_t current_stream(const c10::Device& device) {
  const c10::Stream s = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(s.native_handle());
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// x must be a contiguous CUDA tensor of dtype dt with `dim` dimensions, on `device` when given.
void check_arg(const at::Tensor& x, const char* name, at::ScalarType dt, int64_t dim,
               const c10::optional<c10::Device>& device = c10::nullopt) {
  TORCH_CHECK(x.device().is_cuda(), name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(!device.has_value() || x.device() == *device, name, " must be on ", *device,
              " like the first input, got ",
              x.device());
  TORCH_CHECK(x.scalar_type() == dt, name, " must have dtype ", dt, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == dim, name, " must have ", dim, " dimensions, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous (call .contiguous())");
}

// cand_vals/cand_ids [rows, M], split_max/split_sum [rows, S] -> (ids int32 [rows, k], logprobs fp32 [rows, k],
// lse fp32 [rows]); math in csrc/cuda/topk_merge.cu.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tt_topk_merge(const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                                                             const at::Tensor& split_max, const at::Tensor& split_sum,
                                                             int64_t k) {
  check_arg(cand_vals, "cand_vals", at::kFloat, 2);
  const c10::Device dev = cand_vals.device();
  check_arg(cand_ids, "cand_ids", at::kInt, 2, dev);
  check_arg(split_max, "split_max", at::kFloat, 2, dev);
  check_arg(split_sum, "split_sum", at::kFloat, 2, dev);
  const int64_t rows = cand_vals.size(0), M = cand_vals.size(1), S = split_max.size(1);
  TORCH_CHECK(cand_ids.sizes() == cand_vals.sizes(), "cand_ids must have the shape of cand_vals ", cand_vals.sizes(),
              ", got ", cand_ids.sizes());
  TORCH_CHECK(split_max.size(0) == rows && split_sum.sizes() == split_max.sizes(),
              "split_max and split_sum must both have shape [rows, S] with rows = ", rows, ", got ", split_max.sizes(),
              " and ", split_sum.sizes());
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  c10::DeviceGuard guard(dev);
  const auto opts = cand_vals.options();
  at::Tensor ids = at::empty({rows, k}, opts.dtype(at::kInt));
  at::Tensor lps = at::empty({rows, k}, opts);
  at::Tensor lse = at::empty({rows}, opts);
  if (rows > 0) {
    launch_topk_merge(cand_vals.data_ptr<float>(), cand_ids.data_ptr<int32_t>(), split_max.data_ptr<float>(),
                      split_sum.data_ptr<float>(), ids.data_ptr<int32_t>(), lps.data_ptr<float>(),
                      lse.data_ptr<float>(), rows, M, S, k, current_stream(dev));
    check_launch("tt_topk_merge");
  }
  return {ids, lps, lse};
}

void check_bits(int64_t bits, int64_t vocab) {
  TORCH_CHECK(bits >= 1 && bits <= 32, "bits must lie in [1, 32], got ", bits);
  TORCH_CHECK(vocab >= 0 && (bits == 32 || vocab < (int64_t{1} << bits)), "vocab (", vocab,
              ") must be representable in bits = ", bits, " (the empty-slot code is vocab)");
}

// ids int32 [n] (-1 = empty) -> words int32 [ceil(n·bits/32)] (uint32 bit stream; layout in ops/packing.py).
at::Tensor tt_pack_id_bits(const at::Tensor& ids, int64_t bits, int64_t vocab) {
  check_arg(ids, "ids", at::kInt, 1);
  check_bits(bits, vocab);
  const int64_t n = ids.numel(), n_words = (n * bits + 31) / 32;
  c10::DeviceGuard guard(ids.device());
  at::Tensor words = at::empty({n_words}, ids.options());
  if (n_words > 0) {
    launch_pack_id_bits(ids.data_ptr<int32_t>(), n, static_cast<int>(bits), static_cast<int32_t>(vocab),
                        reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()), n_words, current_stream(ids.device()));
    check_launch("tt_pack_id_bits");
  }
  return words;
}

// words int32 [n_words] -> (ids int32 [n], bad int32 [1] = number of codes > vocab, written as -1).
std::tuple<at::Tensor, at::Tensor> tt_unpack_id_bits(const at::Tensor& words, int64_t n, int64_t bits, int64_t vocab) {
  check_arg(words, "words", at::kInt, 1);
  check_bits(bits, vocab);
  TORCH_CHECK(n >= 0 && words.numel() >= (n * bits + 31) / 32, "words holds ", words.numel(), " words, fewer than the ",
              (n * bits + 31) / 32, " that n = ", n, " ids of ", bits, " bits need");
  c10::DeviceGuard guard(words.device());
  at::Tensor ids = at::empty({n}, words.options());
  at::Tensor bad = at::zeros({1}, words.options());
  if (n > 0) {
    launch_unpack_id_bits(reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), words.numel(), n,
                          static_cast<int>(bits), static_cast<int32_t>(vocab), ids.data_ptr<int32_t>(),
                          bad.data_ptr<int32_t>(), current_stream(words.device()));
    check_launch("tt_unpack_id_bits");
  }
  return {ids, bad};
}

// logprobs fp32 [N, k], ids int32 [N, k] -> (codes uint8 [N, k], offset fp16 [N], scale fp16 [N]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> tt_quantize_u8(const at::Tensor& logprobs, const at::Tensor& ids,
                                                              double floor_value) {
  check_arg(logprobs, "logprobs", at::kFloat, 2);
  check_arg(ids, "ids", at::kInt, 2, logprobs.device());
  TORCH_CHECK(ids.sizes() == logprobs.sizes(), "ids must have the shape of logprobs ", logprobs.sizes(), ", got ",
              ids.sizes());
  const int64_t N = logprobs.size(0), k = logprobs.size(1);
  c10::DeviceGuard guard(logprobs.device());
  at::Tensor codes = at::empty({N, k}, logprobs.options().dtype(at::kByte));
  at::Tensor offset = at::empty({N}, logprobs.options().dtype(at::kHalf));
  at::Tensor scale = at::empty({N}, logprobs.options().dtype(at::kHalf));
  if (N > 0) {
    launch_quantize_u8(logprobs.data_ptr<float>(), ids.data_ptr<int32_t>(), N, k, static_cast<float>(floor_value),
                       codes.data_ptr<uint8_t>(), reinterpret_cast<uint16_t*>(offset.data_ptr()),
                       reinterpret_cast<uint16_t*>(scale.data_ptr()), current_stream(logprobs.device()));
    check_launch("tt_quantize_u8");
  }
  return {codes, offset, scale};
}

// codes uint8 [N, k], offset/scale fp16 [N] -> logprobs fp32 [N, k] (-inf for code 255).
at::Tensor tt_dequantize_u8(const at::Tensor& codes, const at::Tensor& offset, const at::Tensor& scale) {
  check_arg(codes, "codes", at::kByte, 2);
  check_arg(offset, "offset", at::kHalf, 1, codes.device());
  check_arg(scale, "scale", at::kHalf, 1, codes.device());
  const int64_t N = codes.size(0), k = codes.size(1);
  TORCH_CHECK(offset.size(0) == N && scale.size(0) == N, "offset and scale must have shape [N] = [", N, "], got ",
              offset.sizes(), " and ", scale.sizes());
  c10::DeviceGuard guard(codes.device());
  at::Tensor lp = at::empty({N, k}, codes.options().dtype(at::kFloat));
  if (N > 0) {
    launch_dequantize_u8(codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(offset.data_ptr()),
                         reinterpret_cast<const uint16_t*>(scale.data_ptr()), N, k, lp.data_ptr<float>(),
                         current_stream(codes.device()));
    check_launch("tt_dequantize_u8");
  }
  return lp;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_FRAGMENT(distill_engine_C, m) {
  m.set_python_module("distill_engine._cpp_ops");  // their fake implementations
  m.def("tt_topk_merge(Tensor cand_vals, Tensor cand_ids, Tensor split_max, Tensor split_sum, int k) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("tt_pack_id_bits(Tensor ids, int bits, int vocab) -> Tensor");
  m.def("tt_unpack_id_bits(Tensor words, int n, int bits, int vocab) -> (Tensor, Tensor)");
  m.def("tt_quantize_u8(Tensor logprobs, Tensor ids, float floor_value) -> (Tensor, Tensor, Tensor)");
  m.def("tt_dequantize_u8(Tensor codes, Tensor offset, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(distill_engine_C, CUDA, m) {
  m.impl("tt_topk_merge", &cuda::tt_topk_merge);
  m.impl("tt_pack_id_bits", &cuda::tt_pack_id_bits);
  m.impl("tt_unpack_id_bits", &cuda::tt_unpack_id_bits);
  m.impl("tt_quantize_u8", &cuda::tt_quantize_u8);
  m.impl("tt_dequantize_u8", &cuda::tt_dequantize_u8);
}

}  // namespace distill_engine
#endif  // __CUDA_ARCH__
