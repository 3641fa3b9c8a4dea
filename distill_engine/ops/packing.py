"""Compact byte format of teacher targets for caches and streams: ``pack_targets`` / ``unpack_targets``.

Byte layout, version 3 (all integers little-endian; one flat uint8 buffer, on any device)::

    offset  size  field
    0       4     magic b"DETT"
    4       2     version: 3 for float32 log-probs, else 2 (the version-2 layout is version 3 without format
                  code 3, so float16/bfloat16/uint8 buffers are written as version 2, byte for byte what
                  earlier builds wrote and read; version 1 buffers, identical but without flag bit 3, are still read)
    6       2     flags: bits 0-1 log-prob format (0 = float16, 1 = bfloat16, 2 = uint8, 3 = float32 (version 3));
                         bit 2 = ids bit-packed (else int32);
                         bit 3 = rest section present (version 2 only); other bits 0
    8       8     N (rows, uint64)
    16      4     k (slots per row, uint32)
    20      4     V (vocabulary size, uint32)
    24      1     id_bits: 32 for int32 ids, else b = ceil(log2(V + 1)) (17 at V = 128,256)
    25      7     reserved, 0
    32      8     payload size in bytes (uint64)
    40      8     checksum (uint64) of the whole buffer with these 8 bytes zeroed (see ``_checksum``)
    48      ...   payload: the sections below in this order, each zero-padded to a multiple of 8 bytes

    uint8 format only:  row offsets  float16 [N]   (o_n, an fp16 value rounded UP from max of the row)
                        row scales   float16 [N]   (s_n, fp16 rounded UP from (o_n − min of the row) / 254)
    log-probabilities:  float16 | bfloat16 | float32 [N·k], or uint8 codes [N·k]: lp = o_n − code·s_n, 255 = empty
    ids:                int32 [N·k] (−1 = empty), or a bit stream of N·k codes of id_bits bits each,
                        slot i in stream bits [i·b, (i+1)·b) (bit 0 = least significant bit of byte 0),
                        code V = empty slot, stored as ceil(N·k·b / 32) little-endian uint32 words
    rest (flag bit 3):  float32 [N]  TeacherTargets.rest_logprob, the log of the teacher's exact mass
                        outside the row's ids (kept in fp32: it is what tail="bucket" needs exactly)

Bytes per (token, slot) at V = 128,256, k = 64: int32 + fp16 = 6, int32 + uint8 = 5.06,
bit-packed + fp16 = 4.13, bit-packed + uint8 = 3.19, int32 + fp32 = 8 (plus the 48-byte header per buffer).

float32 is lossless: unpacking returns the packed log-probs bit for bit (empty slots −inf, as packed), with no
renormalization — it serves exactness checks (a cache or stream round trip gives bit-identical targets).
Lossy steps of the other formats and what unpacking restores: float16 clamps log-probs to >= -65504; uint8
floors them at ``U8_FLOOR`` = -100 first (exp(-100) ≈ 4e-44: no change to any loss, and the core op floors its
logs there too) and rounds to the row's 255-level grid (error <= s_n / 2); after decoding, a row whose
probabilities sum to more than 1 (rounding of a near-1 top slot) is renormalized to sum 1 so
``tail="bucket"`` stays valid. Ids are always exact.

The checksum detects every single-word corruption with certainty (a bijective mix of each 32-bit word
and its position, summed mod 2^64) and other damage with probability 1 − 2^-64; a truncated buffer
fails the length check. Any failure raises ValueError. Pack and checksum run as torch ops on the
buffer's device (no host round trip); on CUDA the bit-packing and uint8 coding use the warp kernels in
csrc/cuda/pack.cu when the extension was built with CUDA, else the equivalent torch code.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Optional, Union

import torch

from .. import _backend
from .teacher_targets import TeacherTargets

MAGIC = b"DETT"
VERSION = 3  # the newest version written (float32 buffers); the others are written as version 2
READABLE_VERSIONS = (1, 2, 3)
HEADER_BYTES = 48
LOGPROB_DTYPES = ("float16", "bfloat16", "uint8", "float32")
_FMT_CODE = {"float16": 0, "bfloat16": 1, "uint8": 2, "float32": 3}
_FMT_VERSION = {"float16": 2, "bfloat16": 2, "uint8": 2, "float32": 3}  # the version each format is written as
_FP_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FLAG_BITPACK = 1 << 2
_FLAG_REST = 1 << 3  # version 2: a float32 [N] rest_logprob section follows the ids
U8_FLOOR = -100.0
_HEADER = struct.Struct("<4sHHQIIB7xQQ")  # magic, version, flags, N, k, V, id_bits, payload, checksum
assert _HEADER.size == HEADER_BYTES

# checksum constants (odd 64-bit multipliers, as signed int64)
_M1 = 0x9E3779B97F4A7C15 - (1 << 64)
_M2 = 0xBF58476D1CE4E5B9 - (1 << 64)


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def id_bits_for(V: int) -> int:
    """Bits per bit-packed id: codes 0..V-1 plus V for the empty slot → ceil(log2(V + 1))."""
    return max(1, int(V).bit_length())


def _sections(N: int, k: int, V: int, fmt: str, bitpack: bool, rest: bool = False):
    """[(name, nbytes)] of the payload in order (each section padded to 8 bytes)."""
    n = N * k
    out = []
    if fmt == "uint8":
        out += [("offset", 2 * N), ("scale", 2 * N), ("logprobs", n)]
    else:
        out += [("logprobs", (4 if fmt == "float32" else 2) * n)]
    if bitpack:
        out += [("ids", 4 * ((n * id_bits_for(V) + 31) // 32))]
    else:
        out += [("ids", 4 * n)]
    if rest:
        out += [("rest", 4 * N)]
    return out


def _checksum(buf: torch.Tensor) -> torch.Tensor:
    """uint64 checksum (as an int64 0-dim tensor on buf's device) of a uint8 buffer.

    words w_i = the buffer as little-endian uint32 (zero-padded); x_i = (w_i + i·2^32)·M1; x_i ^= x_i >> 29;
    x_i ·= M2; x_i ^= x_i >> 32 (logical shifts, arithmetic mod 2^64); checksum = Σ_i x_i mod 2^64.
    Each step is a bijection of (w_i, i), so changing any one word always changes the sum.
    """
    n = buf.numel()
    pad = (-n) % 4
    if pad:
        buf = torch.cat([buf, buf.new_zeros(pad)])
    w = buf.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    i = torch.arange(w.numel(), device=buf.device, dtype=torch.int64)
    x = (w | (i << 32)) * _M1
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    x = x * _M2
    x = x ^ ((x >> 32) & 0xFFFFFFFF)
    return x.sum()


def _i64_to_u8(v: torch.Tensor) -> torch.Tensor:
    """0-dim int64 tensor → its 8 little-endian bytes (uint8 [8]) on the same device."""
    return v.reshape(1).view(torch.uint8)


def _half_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (elementwise, x fp32 finite), like CUDA's __float2half_ru."""
    h = x.to(torch.float16)
    below = h.float() < x
    bits = h.view(torch.int16)
    neg_zero = bits == -32768
    up = torch.where(bits < 0, bits - 1, bits + 1)  # towards +inf: magnitude down if negative, up if positive
    up = torch.where(neg_zero, torch.ones_like(bits), up)
    return torch.where(below, up, bits).view(torch.float16)


def _use_cuda_ext(t: torch.Tensor, symbol: str) -> bool:
    return t.is_cuda and _backend.cuda_extension_has(symbol)


# ----------------------------------------------------------------------------------------------
# section codecs (torch, with CUDA kernels when available)
# ----------------------------------------------------------------------------------------------
def _pack_id_bits(ids: torch.Tensor, V: int, bits: int) -> torch.Tensor:
    """ids [n] int32 → uint32 words as int32 [ceil(n·bits/32)]."""
    n = ids.numel()
    n_words = (n * bits + 31) // 32
    if _use_cuda_ext(ids, "tt_pack_id_bits"):
        return _backend.cpu_extension().tt_pack_id_bits(ids.contiguous(), bits, V)
    code = torch.where(ids < 0, torch.full_like(ids, V), ids).to(torch.int64)
    s = torch.arange(n, device=ids.device, dtype=torch.int64) * bits
    w0 = s >> 5
    off = s & 31
    acc = torch.zeros(n_words + 1, dtype=torch.int64, device=ids.device)
    acc.scatter_add_(0, w0, (code << off) & 0xFFFFFFFF)  # bits never overlap, so add == or
    spill = (off + bits) > 32
    acc.scatter_add_(0, w0 + 1, torch.where(spill, code >> (32 - off).clamp(max=63), torch.zeros_like(code)))
    acc = acc[:n_words]
    acc = torch.where(acc >= 2**31, acc - 2**32, acc)
    return acc.to(torch.int32)


def _unpack_id_bits(words: torch.Tensor, n: int, V: int, bits: int) -> torch.Tensor:
    """uint32 words (int32 view) → ids [n] int32; ValueError on a code > V."""
    if _use_cuda_ext(words, "tt_unpack_id_bits"):
        ids, bad = _backend.cpu_extension().tt_unpack_id_bits(words.contiguous(), n, bits, V)
        if int(bad.item()) > 0:
            raise ValueError(f"corrupt packed targets: {int(bad.item())} bit-packed ids exceed V={V}")
        return ids
    w = torch.cat([words.to(torch.int64) & 0xFFFFFFFF, words.new_zeros(1, dtype=torch.int64)])
    s = torch.arange(n, device=words.device, dtype=torch.int64) * bits
    w0 = s >> 5
    off = s & 31
    # an id needs at most bits + off − 32 <= 31 bits of the next word, so bit 31 of it is never shifted in
    v = (w[w0] >> off) | ((w[w0 + 1] & 0x7FFFFFFF) << (32 - off))
    code = v & ((1 << bits) - 1)
    if bool((code > V).any()):
        raise ValueError(f"corrupt packed targets: bit-packed ids exceed V={V}")
    return torch.where(code == V, torch.full_like(code, -1), code).to(torch.int32)


def _quantize_u8(lp: torch.Tensor, ids: torch.Tensor):
    """lp, ids [N, k] → (codes uint8 [N, k], offset fp16 [N], scale fp16 [N])."""
    N, k = lp.shape
    if _use_cuda_ext(lp, "tt_quantize_u8"):
        return _backend.cpu_extension().tt_quantize_u8(lp.contiguous(), ids.contiguous(), U8_FLOOR)
    slot = ids >= 0
    x = lp.clamp(min=U8_FLOOR)
    inf = torch.full((), float("inf"), device=lp.device)
    hi = torch.where(slot, x, -inf).amax(dim=1)
    lo = torch.where(slot, x, inf).amin(dim=1)
    empty_row = ~slot.any(dim=1)
    hi = torch.where(empty_row, torch.zeros_like(hi), hi)
    lo = torch.where(empty_row, torch.zeros_like(lo), lo)
    off = _half_round_up(hi)
    offf = off.float()
    sc = _half_round_up((offf - lo) / 254.0)
    scf = sc.float()
    q = torch.where(scf[:, None] > 0, torch.round((offf[:, None] - x) / scf[:, None].clamp(min=1e-30)),
                    torch.zeros_like(x))
    q = q.clamp(0, 254)
    codes = torch.where(slot, q, torch.full_like(q, 255)).to(torch.uint8)
    return codes, off, sc


def _dequantize_u8(codes: torch.Tensor, off: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    if _use_cuda_ext(codes, "tt_dequantize_u8"):
        return _backend.cpu_extension().tt_dequantize_u8(codes.contiguous(), off.contiguous(), sc.contiguous())
    c = codes.to(torch.float32)
    lp = off.float()[:, None] - c * sc.float()[:, None]
    return torch.where(codes == 255, torch.full_like(lp, float("-inf")), lp)


# ----------------------------------------------------------------------------------------------
# the container
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackedTargets:
    """Packed teacher targets: ``buffer`` is the flat uint8 byte string of the layout above.

    Build with ``pack_targets``; read back with ``unpack_targets``; move with ``.to(device)``; persist with
    ``save`` / ``load`` or ``to_bytes`` / ``from_bytes``.
    """

    buffer: torch.Tensor

    # header fields (parsed on construction, which also checks length, magic, version and flags)
    def __post_init__(self):
        b = self.buffer
        if not isinstance(b, torch.Tensor) or b.dtype != torch.uint8 or b.dim() != 1:
            raise ValueError("buffer must be a 1-D torch.uint8 tensor holding a packed teacher-targets buffer")
        if b.storage_offset() % 8 or not b.is_contiguous():  # sections are viewed as int32/fp16 in place
            b = b.clone()
            object.__setattr__(self, "buffer", b)
        object.__setattr__(self, "_header", _parse_header(bytes(b[:HEADER_BYTES].cpu().numpy().tobytes()), b.numel()))

    @property
    def num_rows(self) -> int:
        return self._header["N"]

    def __len__(self) -> int:
        return self._header["N"]

    @property
    def k(self) -> int:
        return self._header["k"]

    @property
    def vocab_size(self) -> int:
        return self._header["V"]

    @property
    def logprob_dtype(self) -> str:
        return self._header["fmt"]

    @property
    def bitpacked_ids(self) -> bool:
        return self._header["bitpack"]

    @property
    def version(self) -> int:
        return self._header["version"]

    @property
    def has_rest_logprob(self) -> bool:
        """Whether the buffer carries TeacherTargets.rest_logprob (version 2 with the rest section)."""
        return self._header["rest"]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def bytes_per_slot(self) -> float:
        """Whole buffer (header included) per (token, slot)."""
        n = self.num_rows * self.k
        return self.nbytes / n if n else float("nan")

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def to(self, device, non_blocking: bool = False) -> "PackedTargets":
        return PackedTargets(self.buffer.to(device, non_blocking=non_blocking))

    def to_bytes(self) -> bytes:
        return self.buffer.cpu().numpy().tobytes()

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview], device=None) -> "PackedTargets":
        """Wrap bytes (validating header, length and checksum)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"data must be bytes, got {type(data).__name__}")
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        p = cls(t.to(device) if device is not None else t)
        p.verify()
        return p

    def verify(self) -> "PackedTargets":
        """Recompute the checksum; ValueError when the buffer was altered."""
        b = self.buffer
        zeroed = torch.cat([b[:40], b.new_zeros(8), b[HEADER_BYTES:]])
        got = int(_checksum(zeroed).item()) & 0xFFFFFFFFFFFFFFFF
        if got != self._header["checksum"]:
            raise ValueError("corrupt packed targets: checksum mismatch (the buffer was altered after packing)")
        return self

    def save(self, path: str) -> None:
        """Write atomically (temp file in the same directory, fsync, rename: ``data/io.atomic_write_bytes``)."""
        from ..data.io import atomic_write_bytes  # imported here: the op module stays free of the data package

        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str, device=None) -> "PackedTargets":
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), device=device)


def _parse_header(head: bytes, total: int) -> dict:
    if total < HEADER_BYTES or len(head) < HEADER_BYTES:
        raise ValueError(f"truncated packed targets: {total} bytes, the header alone needs {HEADER_BYTES}")
    magic, version, flags, N, k, V, id_bits, payload, checksum = _HEADER.unpack(head[:HEADER_BYTES])
    if magic != MAGIC:
        raise ValueError(f"not a packed teacher-targets buffer (magic {magic!r}, expected {MAGIC!r})")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"packed targets version {version} is not supported (this build reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    fmt_code = flags & 3
    known = 3 | _FLAG_BITPACK | (_FLAG_REST if version >= 2 else 0)
    if (fmt_code == 3 and version < 3) or flags & ~known:  # float32 (code 3) exists from version 3 on
        raise ValueError(f"corrupt packed targets: unknown flags {flags:#x}")
    fmt = LOGPROB_DTYPES[fmt_code]
    bitpack = bool(flags & _FLAG_BITPACK)
    rest = bool(flags & _FLAG_REST)
    if V < 1 or k < 1:
        raise ValueError(f"corrupt packed targets: k={k}, V={V}")
    want_bits = id_bits_for(V) if bitpack else 32
    if id_bits != want_bits:
        raise ValueError(f"corrupt packed targets: id_bits={id_bits}, expected {want_bits} for V={V}")
    expect = sum(_pad8(n) for _, n in _sections(N, k, V, fmt, bitpack, rest))
    if payload != expect:
        raise ValueError(f"corrupt packed targets: payload size {payload} does not match N={N}, k={k} ({expect})")
    if total != HEADER_BYTES + payload:
        kind = "truncated" if total < HEADER_BYTES + payload else "oversized"
        raise ValueError(f"{kind} packed targets: {total} bytes, header says {HEADER_BYTES + payload}")
    return dict(N=N, k=k, V=V, fmt=fmt, bitpack=bitpack, id_bits=id_bits, payload=payload, checksum=checksum,
                version=version, rest=rest)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def pack_targets(targets: TeacherTargets, logprob_dtype: str = "float16", *, bitpack_ids: bool = False,
                 vocab_size: Optional[int] = None) -> PackedTargets:
    """Pack teacher targets into one flat uint8 buffer on their device (layout in this module's docstring).

    Args:
        targets: TeacherTargets (ids [N, k], logprobs [N, k], rest_logprob [N] | None: stored in fp32 when set).
        logprob_dtype: "float16" | "bfloat16" | "uint8" (per-row fp16 offset and scale, 255 levels) | "float32"
            (lossless: unpacking returns the log-probs bit for bit).
        bitpack_ids: store ids in ceil(log2(V + 1)) bits each instead of int32.
        vocab_size: V; defaults to ``targets.vocab_size`` (required).
    """
    if not isinstance(targets, TeacherTargets):
        raise ValueError(f"targets must be a TeacherTargets, got {type(targets).__name__}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
    if not isinstance(bitpack_ids, bool):
        raise ValueError(f"bitpack_ids must be a bool, got {bitpack_ids!r}")
    V = vocab_size if vocab_size is not None else targets.vocab_size
    if V is None:
        raise ValueError("vocab_size is unknown: pass vocab_size=V (or build targets with de.teacher_targets)")
    if isinstance(V, bool) or not isinstance(V, int) or not 1 <= V < 2**31 - 1:
        raise ValueError(f"vocab_size must be an int in [1, 2^31 - 1), got {V!r}")
    # fresh row-major copies: .contiguous() keeps odd strides on size-1 axes, which the byte views below refuse
    ids = torch.empty(targets.ids.shape, dtype=torch.int32, device=targets.ids.device).copy_(targets.ids)
    lp = torch.empty(targets.logprobs.shape, dtype=torch.float32, device=targets.ids.device).copy_(targets.logprobs)
    N, k = ids.shape
    if k < 1:
        raise ValueError("targets must have k >= 1 slots per row")
    if N and bool(((ids < -1) | (ids >= V)).any()):
        raise ValueError(f"targets.ids must lie in [-1, vocab_size={V})")
    if N and bool(torch.isnan(lp).any()):
        raise ValueError("targets.logprobs contains NaN")
    # the loss's rules: log-probabilities (<= 0, -inf allowed) in filled slots; +inf nowhere
    if N and bool((lp == float("inf")).any() | ((lp > 1e-4) & (ids >= 0)).any()):
        row = int(((lp == float("inf")) | ((lp > 1e-4) & (ids >= 0))).any(1).nonzero()[0, 0])
        raise ValueError(f"targets.logprobs must be log-probabilities (<= 0, or -inf); row {row} has a positive "
                         f"or +inf value — pass log_softmax outputs, not logits")
    has_rest = targets.rest_logprob is not None
    if has_rest:
        rest = targets.rest_logprob.to(device=ids.device, dtype=torch.float32).contiguous()
        if N and bool(torch.isnan(rest).any()):
            raise ValueError("targets.rest_logprob contains NaN")
    dev = ids.device
    fmt = logprob_dtype
    parts = {}
    if fmt == "uint8":
        codes, off, sc = _quantize_u8(lp, ids)
        parts["offset"] = off.view(torch.uint8)
        parts["scale"] = sc.view(torch.uint8)
        parts["logprobs"] = codes.reshape(-1)
    else:
        lpx = lp.clamp(min=-65504.0) if fmt == "float16" else lp
        lpx = torch.where(ids >= 0, lpx, torch.full_like(lpx, float("-inf")))
        parts["logprobs"] = lpx.to(_FP_DTYPE[fmt]).reshape(-1).view(torch.uint8)
    bits = id_bits_for(V) if bitpack_ids else 32
    if bitpack_ids:
        parts["ids"] = _pack_id_bits(ids.reshape(-1), V, bits).view(torch.uint8)
    else:
        parts["ids"] = ids.reshape(-1).view(torch.uint8)
    if has_rest:
        parts["rest"] = rest.view(torch.uint8)
    chunks = []
    for name, nbytes in _sections(N, k, V, fmt, bitpack_ids, has_rest):
        data = parts[name]
        assert data.numel() == nbytes, (name, data.numel(), nbytes)
        chunks.append(data)
        if _pad8(nbytes) > nbytes:
            chunks.append(torch.zeros(_pad8(nbytes) - nbytes, dtype=torch.uint8, device=dev))
    payload = sum(c.numel() for c in chunks)
    flags = _FMT_CODE[fmt] | (_FLAG_BITPACK if bitpack_ids else 0) | (_FLAG_REST if has_rest else 0)
    head = _HEADER.pack(MAGIC, _FMT_VERSION[fmt], flags, N, k, V, bits, payload, 0)
    head_t = torch.frombuffer(bytearray(head), dtype=torch.uint8).to(dev)
    buf = torch.cat([head_t, *chunks])
    buf[40:48] = _i64_to_u8(_checksum(buf))  # stays on device: no host sync
    return PackedTargets(buf)


def unpack_targets(packed: Union[PackedTargets, bytes, bytearray, memoryview], device=None, *,
                   verify: bool = True) -> TeacherTargets:
    """Decode a PackedTargets (or its bytes) into TeacherTargets(ids int32, logprobs fp32, rest_logprob fp32 |
    None) on ``device``
    (default: the buffer's device). Raises ValueError for a corrupt or truncated buffer."""
    if isinstance(packed, (bytes, bytearray, memoryview)):
        packed = PackedTargets.from_bytes(packed, device=device)
    elif isinstance(packed, PackedTargets):
        if device is not None:
            packed = packed.to(device)
        if verify:
            packed.verify()
    else:
        raise ValueError(f"packed must be PackedTargets or bytes, got {type(packed).__name__}")
    h = packed._header
    N, k, V, fmt, bitpack = h["N"], h["k"], h["V"], h["fmt"], h["bitpack"]
    buf = packed.buffer
    pos = HEADER_BYTES
    sec = {}
    for name, nbytes in _sections(N, k, V, fmt, bitpack, h["rest"]):
        sec[name] = buf[pos:pos + nbytes]
        pos += _pad8(nbytes)
    n = N * k
    if bitpack:
        ids = _unpack_id_bits(sec["ids"].view(torch.int32), n, V, h["id_bits"]).reshape(N, k)
    else:
        ids = sec["ids"].view(torch.int32).reshape(N, k).clone()
        if n and bool(((ids < -1) | (ids >= V)).any()):
            raise ValueError(f"corrupt packed targets: ids outside [-1, V={V})")
    if fmt == "uint8":
        codes = sec["logprobs"].reshape(N, k)
        lp = _dequantize_u8(codes, sec["offset"].view(torch.float16), sec["scale"].view(torch.float16))
        if n and bool(((codes == 255) != (ids < 0)).any()):
            raise ValueError("corrupt packed targets: empty-slot marks of ids and log-probs disagree")
    else:
        lp = sec["logprobs"].view(_FP_DTYPE[fmt]).reshape(N, k).float()
    lp = torch.where(ids >= 0, lp, torch.full_like(lp, float("-inf")))
    # rounding may push a row's mass slightly above 1; renormalize such rows (keeps tail="bucket" valid).
    # float32 stores the packed values exactly: nothing was rounded, so nothing is changed (bit-identical)
    if n and fmt != "float32":
        lse = torch.logsumexp(lp.double(), dim=1)
        lp = torch.where((lse > 0)[:, None], (lp.double() - lse.clamp(min=0)[:, None]).float(), lp)
    rest = sec["rest"].view(torch.float32).clone() if h["rest"] else None  # version 1 / no section: None
    if rest is not None and N and bool(torch.isnan(rest).any() | (rest > 1e-4).any()):
        raise ValueError("corrupt packed targets: rest_logprob section holds NaN or positive values")
    return TeacherTargets(ids, lp, V, rest)
