"""TeacherTargets.rest_logprob (issue 15): teacher_targets fills it exactly, packing v2 stores it (v1 files stay
readable), and it reaches fused_distill_loss."""
import math
import os

import pytest
import torch

import distill_engine as de
from distill_engine.ops import packing
from distill_engine.reference.distill_loss import dense_reference_grads
from op_testing import backends

DATA = os.path.join(os.path.dirname(__file__), "data")


def _exact_inputs(scale, seed=0, n=9, d=16, v=101):
    """Teacher hidden/weight on integer grids so the fp32 logits are exact (the check is then on the rest math)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-4, 5, (n, d), generator=g).float() / 16 * scale
    w = torch.randint(-4, 5, (v, d), generator=g).float()
    b = torch.randint(-2, 3, (v,), generator=g).float() / 4
    return h, w, b


def _dense_rest(h, w, b, ids, T):
    z = (h.double() @ w.double().t() + b.double()) / T
    m = torch.zeros_like(z, dtype=torch.bool).scatter(1, ids.long(), True)
    return torch.logsumexp(z.masked_fill(m, float("-inf")), 1) - torch.logsumexp(z, 1)


@pytest.mark.parametrize("backend", backends("tail_exact"))
def test_teacher_topk_rest_logprob_is_exact(backend):
    for scale in (1.0, 8.0, 64.0):  # rest mass from ~0.5 down to far below 1 − Σp's resolution
        h, w, b = _exact_inputs(scale, seed=int(scale))
        for T, k in ((1.0, 5), (2.0, 1), (0.7, 12)):
            t = de.teacher_targets(h, w, k, bias=b, temperature=T, backend=backend, chunk_rows=4)
            ref = _dense_rest(h, w, b, t.ids, T)
            assert t.rest_logprob is not None and t.rest_logprob.dtype == torch.float32
            assert t.rest_logprob.shape == (h.shape[0],)
            err = (t.rest_logprob.double() - ref).abs() / (1 + ref.abs())
            assert float(err.max()) < 1e-6, (backend, scale, T, k, float(err.max()))
    # k = V: no rest at all
    t = de.teacher_targets(h[:3], w[:7], 7, backend=backend)
    assert bool((t.rest_logprob == float("-inf")).all())


def test_sampled_targets_have_no_rest_and_cat_slicing_keep_it():
    h, w, b = _exact_inputs(1.0)
    s = de.teacher_targets(h, w, 4, method="sample", generator=torch.Generator().manual_seed(0), backend="torch")
    assert s.rest_logprob is None
    t = de.teacher_targets(h, w, 4, backend="torch")
    assert torch.equal(t[2:5].rest_logprob, t.rest_logprob[2:5])
    assert torch.equal(de.TeacherTargets.cat([t[:3], t[3:]]).rest_logprob, t.rest_logprob)
    assert de.TeacherTargets.cat([t[:3], s[3:]]).rest_logprob is None  # unknown for part of the rows
    with pytest.raises(ValueError, match="rest_logprob"):
        de.TeacherTargets(t.ids, t.logprobs, 101, torch.zeros(3))
    with pytest.raises(ValueError, match="rest_logprob"):
        de.TeacherTargets(t.ids, t.logprobs, 101, torch.full((h.shape[0],), 0.5)).validate()


@pytest.mark.parametrize("fmt,bitpack", [("float16", False), ("bfloat16", True), ("uint8", True)])
def test_pack_v2_round_trips_rest_logprob(fmt, bitpack):
    h, w, b = _exact_inputs(16.0)
    t = de.teacher_targets(h, w, 6, bias=b, backend="torch")
    t.rest_logprob[0] = float("-inf")
    p = de.pack_targets(t, fmt, bitpack_ids=bitpack)
    assert p.version == 2 and p.has_rest_logprob
    u = de.unpack_targets(de.PackedTargets.from_bytes(p.to_bytes()))
    assert torch.equal(u.rest_logprob, t.rest_logprob)  # stored in fp32: exact
    assert torch.equal(u.ids, t.ids)
    # without rest_logprob: version 2, no section, None back
    p0 = de.pack_targets(de.TeacherTargets(t.ids, t.logprobs, t.vocab_size), fmt, bitpack_ids=bitpack)
    assert p0.version == 2 and not p0.has_rest_logprob and p0.nbytes == p.nbytes - 8 * math.ceil(4 * len(t) / 8)
    assert de.unpack_targets(p0).rest_logprob is None


def _v1_targets():
    # the construction that wrote tests/data/packed_v1_*.bin with the version-1 code
    g = torch.Generator().manual_seed(1234)
    lp, ids = torch.log_softmax(torch.randn(5, 50, generator=g) * 2, 1).topk(6, dim=1)
    ids = ids.to(torch.int32)
    ids[1, 3:] = -1
    lp[1, 3:] = float("-inf")
    return de.TeacherTargets(ids, lp.float(), 50)


@pytest.mark.parametrize("name,fmt,bitpack", [("packed_v1_float16.bin", "float16", False),
                                              ("packed_v1_uint8_bitpack.bin", "uint8", True)])
def test_version_1_files_stay_readable(name, fmt, bitpack, tmp_path):
    data = open(os.path.join(DATA, name), "rb").read()
    assert data[4:6] == b"\x01\x00"
    old = de.unpack_targets(data)
    assert old.rest_logprob is None
    path = str(tmp_path / "v1.bin")
    with open(path, "wb") as f:
        f.write(data)
    assert de.PackedTargets.load(path).version == 1
    # the same targets packed now: identical payload, only the version field and the checksum differ
    new = de.pack_targets(_v1_targets(), fmt, bitpack_ids=bitpack).to_bytes()
    assert new[:4] == data[:4] and new[6:40] == data[6:40] and new[48:] == data[48:]
    now = de.unpack_targets(new)
    assert torch.equal(old.ids, now.ids) and torch.equal(old.logprobs, now.logprobs)
    # a version-1 header cannot claim the version-2 rest flag
    bad = bytearray(data)
    bad[6] |= 1 << 3
    with pytest.raises(ValueError, match="flags"):
        de.unpack_targets(bytes(bad))


def test_corrupt_rest_section_is_rejected():
    h, w, b = _exact_inputs(1.0)
    t = de.teacher_targets(h, w, 3, backend="torch")
    t.rest_logprob[1] = 0.7  # not a log-probability: packing does not check the sign, unpacking does
    buf = de.pack_targets(t, "float16").buffer
    with pytest.raises(ValueError, match="rest_logprob"):
        de.unpack_targets(de.PackedTargets(buf))


def test_rest_logprob_reaches_the_loss():
    """The student trained on exact teacher rest mass: fused_distill_loss(teacher_rest_logprob=t.rest_logprob)
    matches the oracle given the same rest, at a teacher confident enough that 1 − Σp could not resolve it."""
    h, w, b = _exact_inputs(64.0, n=6)
    t = de.teacher_targets(h, w, 4, bias=b, backend="torch")
    g = torch.Generator().manual_seed(1)
    sh = torch.randn(6, 8, generator=g, requires_grad=True)
    sw = torch.randn(101, 8, generator=g, requires_grad=True)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        out = de.fused_distill_loss(sh, sw, t.ids, t.logprobs, teacher_rest_logprob=t.rest_logprob,
                                    divergence=div, backend="torch")
        ref = dense_reference_grads(sh, sw, t.ids, t.logprobs, teacher_rest_logprob=t.rest_logprob, divergence=div)
        gh, gw = torch.autograd.grad(out, (sh, sw))
        for a, r in ((out, ref[0]), (gh, ref[1]), (gw, ref[2])):
            assert float((a.detach().double() - r).norm() / r.norm()) < 1e-5, div
    with pytest.raises(ValueError, match="teacher_rest_logprob"):
        de.fused_distill_loss(sh, sw, t.ids, t.logprobs, teacher_rest_logprob=torch.zeros(5))
    with pytest.raises(ValueError, match="teacher_rest_logprob"):
        de.fused_distill_loss(sh, sw, t.ids, t.logprobs, teacher_rest_logprob=torch.full((6,), float("nan")))


def test_stream_message_and_colocated_source_carry_rest():
    """The stream's wire message (packed v2 + hidden states) and the co-located source keep rest_logprob."""
    from distill_engine.teacher.base import TeacherBatch
    from distill_engine.teacher.codec import decode
    from distill_engine.teacher.colocated import ColocatedTeacher
    from distill_engine.teacher.stream import _message

    h, w, b = _exact_inputs(8.0, n=5)
    t = de.teacher_targets(h, w, 4, bias=b, backend="torch")
    hid = [torch.randn(5, 3)]
    hdr, payload = _message(TeacherBatch(t.ids, t.logprobs, 7, hid, t.rest_logprob), "float16", 101, True)
    nbytes = int(hdr[3])
    ids, lps, rest = decode(payload.numpy()[:nbytes].tobytes(), where="test", with_rest=True)
    assert torch.equal(ids, t.ids) and torch.equal(rest, t.rest_logprob)
    hdr0, payload0 = _message(TeacherBatch(t.ids, t.logprobs, 7), "float16", 101, True)
    assert decode(payload0.numpy()[:int(hdr0[3])].tobytes(), where="test", with_rest=True)[2] is None

    class _Batch:
        micro_step = 3
        input_ids = attention_mask = valid_index = None

        def to(self, device):
            return self

    for out, want in (((t.ids, t.logprobs, None, t.rest_logprob), t.rest_logprob), ((t.ids, t.logprobs, None), None)):
        src = ColocatedTeacher(lambda *a, _o=out: _o, device="cpu", seed=0, dp_rank=0, method="topk")
        tb = src.compute(_Batch())
        assert (tb.rest_logprob is None) if want is None else torch.equal(tb.rest_logprob, want)
        moved = tb.to("cpu")
        assert (moved.rest_logprob is None) == (want is None)
