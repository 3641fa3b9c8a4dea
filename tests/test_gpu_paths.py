"""GPU path selection that can be proven on CPU: the row-chunk policy of the fused loss and the loud fallback of
the fp32-output gradient GEMMs (issue 10). The kernels themselves are covered by the interpreter tests and by the
AOT sm_90a compile check (tests/test_aot_compile.py)."""
import types
import warnings

import pytest
import torch

from distill_engine.ops import distill_loss as ops


def test_gpu_chunk_policy_keeps_dW_passes_few(monkeypatch):
    monkeypatch.delenv("DISTILL_ENGINE_DISTILL_LOSS_CHUNK_BYTES", raising=False)
    monkeypatch.delenv("DISTILL_ENGINE_CHUNK_BYTES", raising=False)
    V = 128256
    big = types.SimpleNamespace(total_memory=141 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: big)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # 2^29 elements: 4,096 rows, so N = 8,192 makes 2 passes over the fp32 dW accumulator instead of 8
    assert ops._chunk_rows(V, torch.device("cuda")) == 4096
    # a small card: the chunk's buffers (fp32 + 16-bit g, 6 B/element) stay within 1/16 of its memory
    small = types.SimpleNamespace(total_memory=24 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: small)
    rows = ops._chunk_rows(V, torch.device("cuda"))
    assert rows * V * 6 <= small.total_memory // 16 and rows >= 1024
    # CPU keeps its 32 MB buffer; the environment overrides both
    assert ops._chunk_rows(V, torch.device("cpu")) == 64
    monkeypatch.setenv("DISTILL_ENGINE_DISTILL_LOSS_CHUNK_BYTES", str(2**29))  # 2^27 fp32 elements
    assert ops._chunk_rows(V, torch.device("cuda")) == 1024


def test_fp32_out_gemm_probe_failure_warns_once_naming_the_path(monkeypatch):
    from distill_engine.kernels import distill_loss as K

    K._out_dtype_gemm_ok_cached.cache_clear()

    def broken_mm(*a, **kw):
        if "out_dtype" in kw:
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        return torch.matmul(*a)

    monkeypatch.setattr(torch, "mm", broken_mm)
    with pytest.warns(RuntimeWarning, match=r"out_dtype=torch.float32\) is unavailable .*fall back to a torch.bfloat16"):
        assert K._out_dtype_gemm_ok_cached("cpu", torch.bfloat16) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second ask is answered from the cache, silently
        assert K._out_dtype_gemm_ok_cached("cpu", torch.bfloat16) is False
    K._out_dtype_gemm_ok_cached.cache_clear()


def test_fp32_out_gemm_forced_off_by_env(monkeypatch):
    from distill_engine.kernels import distill_loss as K

    fake_cuda = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    monkeypatch.setenv("DISTILL_ENGINE_GEMM_F32_OUT", "0")
    K._warn_forced_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="DISTILL_ENGINE_GEMM_F32_OUT=0"):
        assert K._out_dtype_gemm_ok(fake_cuda) is False
    # CPU tensors never take the CUDA-only path, whatever the switch says
    monkeypatch.delenv("DISTILL_ENGINE_GEMM_F32_OUT")
    assert K._out_dtype_gemm_ok(torch.zeros(2, dtype=torch.bfloat16)) is False
    K._warn_forced_fallback.cache_clear()
