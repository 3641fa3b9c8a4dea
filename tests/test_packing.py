"""pack_targets / unpack_targets: round trips per format with bounded error, exact ids, the byte
budget, the distillation-loss change each format introduces, and corrupt/truncated buffers."""
from __future__ import annotations

import math

import pytest
import torch

import distill_engine as de
from distill_engine import _backend
from distill_engine.ops import packing as P
from distill_engine.ops.teacher_targets import TeacherTargets

FORMATS = [(fmt, bp) for fmt in ("float16", "bfloat16", "uint8", "float32") for bp in (False, True)]


def _teacher(N=40, d=24, V=1009, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g) * scale
    w = torch.randn(V, d, generator=g) / math.sqrt(d)
    return h, w


def _targets(method, N=40, V=1009, k=32, seed=0) -> TeacherTargets:
    h, w = _teacher(N, 24, V, seed)
    gen = torch.Generator().manual_seed(seed) if method == "sample" else None
    t = de.teacher_targets(h, w, k, method=method, generator=gen, backend="torch")
    if method == "topk":  # some padded rows and one fully empty row, as caches may hold
        t.ids[3, k // 2:] = -1
        t.logprobs[3, k // 2:] = float("-inf")
        t.ids[5] = -1
        t.logprobs[5] = float("-inf")
    return t


def _bound(t: TeacherTargets, fmt: str) -> torch.Tensor:
    """Per-row bound on |decoded − original| log-prob error: twice the element rounding (the second
    half covers the renormalisation of rows whose decoded mass exceeds 1)."""
    slot = t.ids >= 0
    x = torch.where(slot, t.logprobs.clamp(min=P.U8_FLOOR), torch.zeros_like(t.logprobs))
    amax = x.abs().amax(dim=1)
    if fmt == "float32":  # lossless
        return torch.zeros_like(amax)
    if fmt == "float16":
        e = amax * 2.0**-11 + 2.0**-24
    elif fmt == "bfloat16":
        e = amax * 2.0**-8 + 2.0**-133
    else:
        hi = torch.where(slot, x, torch.full_like(x, -1e9)).amax(1)
        lo = torch.where(slot, x, torch.full_like(x, 1e9)).amin(1)
        hi, lo = torch.where(slot.any(1), hi, 0), torch.where(slot.any(1), lo, 0)
        off_err = hi.abs() * 2.0**-10 + 2.0**-24  # offset rounded up to fp16
        scale = (hi - lo + off_err) / 254 * (1 + 2.0**-10) + 2.0**-24
        e = scale / 2 + off_err + 1e-6
    return 2 * e + 1e-7


@pytest.mark.parametrize("method", ["topk", "sample"])
@pytest.mark.parametrize("fmt,bitpack", FORMATS)
def test_round_trip_bounded_error(method, fmt, bitpack):
    t = _targets(method)
    p = de.pack_targets(t, fmt, bitpack_ids=bitpack)
    assert isinstance(p, de.PackedTargets)
    assert (p.num_rows, p.k, p.vocab_size, p.logprob_dtype, p.bitpacked_ids) == (40, 32, 1009, fmt, bitpack)
    for src in (p, p.to_bytes()):
        u = de.unpack_targets(src)
        assert u.ids.dtype == torch.int32 and u.logprobs.dtype == torch.float32 and u.vocab_size == 1009
        assert torch.equal(u.ids, t.ids.int())  # ids are exact
        slot = t.ids >= 0
        assert bool((u.logprobs[~slot] == float("-inf")).all())
        err = torch.where(slot, (u.logprobs - t.logprobs).abs(), torch.zeros_like(t.logprobs)).amax(1)
        assert bool((err <= _bound(t, fmt)).all()), f"max error {err.max():.3g}"
        mass = torch.where(slot, u.logprobs.double().exp(), torch.zeros((), dtype=torch.float64)).sum(1)
        assert bool((mass <= 1 + 1e-6).all())
    u.validate()


def test_fp_formats_keep_sampled_counts_nearly_exact():
    t = _targets("sample")
    u = de.unpack_targets(de.pack_targets(t, "float16"))
    slot = t.ids >= 0
    counts = (u.logprobs.exp() * t.k).round()
    assert torch.equal(counts[slot], (t.logprobs.exp() * t.k).round()[slot])


@pytest.mark.parametrize("V", [1, 2, 7, 255, 256, 1000, 65535, 65536, 128256, 2**31 - 2])
def test_bitpacked_ids_exact_for_any_vocabulary(V):
    g = torch.Generator().manual_seed(V % 1000)
    N, k = 7, 5
    ids = torch.randint(0, V, (N, k), generator=g, dtype=torch.int64).to(torch.int32)
    ids[2, 3:] = -1
    lp = torch.where(ids >= 0, -torch.rand(N, k, generator=g) * 5, torch.full((N, k), float("-inf")))
    t = TeacherTargets(ids, lp, V)
    p = de.pack_targets(t, "uint8", bitpack_ids=True)
    assert P.id_bits_for(V) == max(1, V.bit_length())
    u = de.unpack_targets(p)
    assert torch.equal(u.ids, ids)


def test_byte_budget_of_the_most_compact_format():
    # V = 128,256 (Llama 3), k = 64: 17-bit ids + uint8 log-probs + 4 bytes of row scale/offset
    N, k, V = 512, 64, 128256
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]).int()
    lp = torch.log_softmax(torch.randn(N, V // 1000, generator=g), 1)[:, :1].expand(N, k) - torch.arange(k) * 0.1
    t = TeacherTargets(ids, lp.contiguous(), V)
    sizes = {}
    for fmt, bp in FORMATS:
        p = de.pack_targets(t, fmt, bitpack_ids=bp)
        expect = P.HEADER_BYTES + sum(P._pad8(n) for _, n in P._sections(N, k, V, fmt, bp))
        assert p.nbytes == expect
        sizes[(fmt, bp)] = p.bytes_per_slot
    assert P.id_bits_for(V) == 17
    assert sizes[("uint8", True)] <= 3.2, sizes
    assert sizes[("float16", False)] == pytest.approx(6.0, abs=0.01)
    assert sizes[("uint8", True)] < sizes[("float16", True)] < sizes[("uint8", False)] < sizes[("float16", False)]


@pytest.mark.parametrize("method,tail", [("topk", "bucket"), ("sample", "renormalize")])
def test_loss_change_per_format(method, tail):
    """Relative change of the distillation loss when the targets go through each format."""
    V, d, N, k = 1009, 24, 64, 32
    h_t, w_t = _teacher(N, d, V, seed=1, scale=3.0)
    g = torch.Generator().manual_seed(2)
    # a student close to the teacher (a small loss: the harder case for a relative bound)
    h_s = h_t + 0.3 * torch.randn(N, d, generator=g)
    w_s = w_t + 0.05 * torch.randn(V, d, generator=g)
    t = de.teacher_targets(h_t, w_t, k, method=method, backend="torch",
                           generator=torch.Generator().manual_seed(3) if method == "sample" else None)
    base = de.fused_distill_loss(h_s, w_s, t.ids, t.logprobs, tail=tail, backend="torch").item()
    assert base > 0
    limits = {"float16": 2e-3, "bfloat16": 1e-2, "uint8": 1e-2, "float32": 0.0}  # float32: the same loss
    for fmt, bp in FORMATS:
        u = de.unpack_targets(de.pack_targets(t, fmt, bitpack_ids=bp))
        loss = de.fused_distill_loss(h_s, w_s, u.ids, u.logprobs, tail=tail, backend="torch").item()
        rel = abs(loss - base) / base
        print(f"{method} {fmt} bitpack={bp}: base {base:.4f} relative change {rel:.2e}")
        assert rel <= limits[fmt], f"{fmt} bitpack={bp}: relative loss change {rel:.2e}"


# ----------------------------------------------------------------------------------------------
# corruption
# ----------------------------------------------------------------------------------------------
def _packed_bytes(fmt="uint8", bitpack=True) -> bytes:
    return de.pack_targets(_targets("topk", N=9, k=8), fmt, bitpack_ids=bitpack).to_bytes()


@pytest.mark.parametrize("fmt,bitpack", FORMATS)
def test_every_single_byte_corruption_is_detected(fmt, bitpack):
    data = _packed_bytes(fmt, bitpack)
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(ValueError):
            de.unpack_targets(bytes(bad))


def test_truncated_or_extended_buffers_raise():
    data = _packed_bytes()
    for n in list(range(0, 60)) + list(range(len(data) - 20, len(data))):
        with pytest.raises(ValueError, match="truncated|packed"):
            de.unpack_targets(data[:n])
    with pytest.raises(ValueError, match="oversized"):
        de.unpack_targets(data + b"\0")


def test_header_errors_are_explained():
    data = bytearray(_packed_bytes())
    with pytest.raises(ValueError, match="magic"):
        de.unpack_targets(b"NOPE" + bytes(data[4:]))
    v4 = bytearray(data)
    v4[4] = 4
    with pytest.raises(ValueError, match="version"):
        de.unpack_targets(bytes(v4))
    with pytest.raises(ValueError, match="bytes"):
        de.unpack_targets("not bytes")
    with pytest.raises(ValueError):
        de.PackedTargets(torch.zeros(10, dtype=torch.int32))


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_float32_is_bit_identical_and_version_3(method):
    """float32: every log-prob and the rest log-mass come back bit for bit, through the buffer and its bytes; it
    is written as version 3, the other formats stay version 2 (what earlier builds read)."""
    t = _targets(method, N=23, V=1013, k=7, seed=5)
    t = TeacherTargets(t.ids, t.logprobs, t.vocab_size, -torch.rand(23, dtype=torch.float64).float() * 9)
    p = de.pack_targets(t, "float32")
    assert p.version == 3 and p.logprob_dtype == "float32" and p.bytes_per_slot > 8
    for src in (p, p.to_bytes()):
        u = de.unpack_targets(src)
        assert torch.equal(u.ids, t.ids.int())
        assert torch.equal(u.logprobs.view(torch.int32), t.logprobs.float().view(torch.int32))  # same bits
        assert torch.equal(u.rest_logprob.view(torch.int32), t.rest_logprob.view(torch.int32))
    assert {de.pack_targets(t, f).version for f in ("float16", "bfloat16", "uint8")} == {2}


def test_float32_code_in_an_older_version_is_refused():
    data = bytearray(de.pack_targets(_targets("topk", N=9, k=4), "float32").to_bytes())
    data[4] = 2  # format code 3 (float32) does not exist in version 2
    with pytest.raises(ValueError, match="flags"):
        de.unpack_targets(bytes(data))


def test_in_memory_corruption_is_caught_by_verify():
    p = de.pack_targets(_targets("topk", N=9, k=8), "float16")
    p.buffer[P.HEADER_BYTES + 3] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        de.unpack_targets(p)


def test_save_load_round_trip(tmp_path):
    t = _targets("sample", N=9, k=8)
    p = de.pack_targets(t, "uint8", bitpack_ids=True)
    path = tmp_path / "sub" / "targets.bin"
    p.save(str(path))
    assert sorted(x.name for x in path.parent.iterdir()) == ["targets.bin"]  # no temp file left
    q = de.PackedTargets.load(str(path))
    assert q.to_bytes() == p.to_bytes()
    assert torch.equal(de.unpack_targets(q).ids, t.ids)


def test_pack_rejects_bad_input():
    t = _targets("topk", N=9, k=4)
    with pytest.raises(ValueError, match="logprob_dtype"):
        de.pack_targets(t, "int4")
    with pytest.raises(ValueError, match="targets"):
        de.pack_targets((t.ids, t.logprobs))
    with pytest.raises(ValueError, match="vocab_size"):
        de.pack_targets(TeacherTargets(t.ids, t.logprobs))
    with pytest.raises(ValueError, match="ids must lie"):
        de.pack_targets(t, vocab_size=10)
    nan = TeacherTargets(t.ids, t.logprobs.clone(), t.vocab_size)
    nan.logprobs[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        de.pack_targets(nan)


def test_half_round_up_matches_definition():
    x = torch.cat([torch.randn(10000) * 50, torch.tensor([0.0, -0.0, 1e-9, -1e-9, 65504.0, -65504.0, 3.0e-8])])
    h = P._half_round_up(x)
    assert bool((h.float() >= x).all())
    # the next smaller half is below x, so h is the smallest half >= x
    bits = h.view(torch.int16)
    down = torch.where(bits > 0, bits - 1, torch.where(bits == 0, torch.full_like(bits, -32767), bits + 1))
    assert bool(((h.float() == x) | (down.view(torch.float16).float() < x)).all())


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,bitpack", FORMATS)
def test_cuda_pack_matches_cpu_bytes(fmt, bitpack):
    t = _targets("topk", N=300, k=64)
    cpu = de.pack_targets(t, fmt, bitpack_ids=bitpack)
    gpu = de.pack_targets(t.to("cuda"), fmt, bitpack_ids=bitpack)
    assert gpu.buffer.is_cuda
    # pack.cu rounds every step explicitly like the torch code, and the checksum is torch on both: same bytes
    assert torch.equal(cpu.buffer, gpu.buffer.cpu())
    u = de.unpack_targets(gpu)
    assert u.ids.is_cuda and torch.equal(u.ids.cpu(), t.ids)
    v = de.unpack_targets(gpu.to_bytes())
    assert torch.equal(v.ids, t.ids)
