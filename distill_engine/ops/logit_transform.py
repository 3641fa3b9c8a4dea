"""Logit transforms after the lm_head (issue 12): scaling and soft-capping, fused into the chunked ops.

Math. With raw logits l = h Wᵀ + b, a scale s (``logit_scale``, default 1) and a cap c (``softcap``):

    z = s · l                       (softcap None)
    z = c · tanh(s · l / c)         (softcap c)

z replaces l everywhere in the ops (temperature divides z, the CE term uses z at T = 1), exactly as the
Hugging Face forwards do (Gemma 2/3 soft-cap, Cohere/Falcon-H1/HyperCLOVA X multiply, Granite divides).

How the backends get it without new kernels: the transform is elementwise on the [chunk, V] buffer.
:class:`TransformChunks` wraps any backend of the loss's chunk contract (``logits_lse`` / ``buf_lse`` /
``dense_grad``): its ``logits_lse`` takes the backend's raw fp32 logits and transforms them in place (the
log-sum-exps are re-taken over z); ``dense_grad`` forms g = dL/dz over the buffer, multiplies by
dz/dl = s·(1 − (z/c)²) (s without a cap; 0 where a teacher id is masked to −inf), adds the sparse
coefficients times dz/dl at their ids (raw logits at those ids re-formed by a small gather-dot, since the
masked buffer no longer holds them) and runs the three GEMMs in fp32 (torch). A scale without a cap is folded
into the inputs instead (``fold_scale``: fp32 inputs, or a power-of-two scale in any dtype), so the backend's
kernels run unchanged; other scales on half inputs go through the buffer in fp32 and lose nothing to rounding.
:class:`TransformTargets` does the same for ``teacher_targets`` (top-k / sampling on the transformed,
tempered buffer). Cost: the GEMMs of the backend's logits pass stay; the gradient GEMMs run in torch fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._validate import check_positive

# rows × ids × d elements of one gather-dot block in SoftcapChunks (bounds the temporary W[ids] copy)
_GATHER_ELEMS = 2**24


def check_transform(logit_scale, softcap) -> None:
    """One-line ValueErrors for bad transform arguments."""
    check_positive("logit_scale", logit_scale, optional=True)
    check_positive("softcap", softcap, optional=True)  # None: no capping


def fold_scale(hidden: torch.Tensor, logit_scale, softcap) -> bool:
    """True when a scale without cap can be folded into the inputs, s·l = (s·h)Wᵀ + s·b, without changing the
    result: fp32 inputs (one rounding at 2^-24), or any dtype when s is a power of two (exact; Cohere's 1/16,
    Granite's 1/8, ...). Then the backend's fused kernels run unchanged (autograd carries s into dH, db)."""
    if softcap is not None or logit_scale is None or float(logit_scale) == 1.0:
        return False
    return hidden.dtype == torch.float32 or math.frexp(float(logit_scale))[0] == 0.5


def active(logit_scale, softcap) -> bool:
    return softcap is not None or (logit_scale is not None and float(logit_scale) != 1.0)


def transform_(buf: torch.Tensor, scale: float, softcap: Optional[float]) -> torch.Tensor:
    """z = s·l, then c·tanh(z/c) when ``softcap``; in place on an fp32 buffer."""
    if softcap is None:
        return buf.mul_(scale) if scale != 1.0 else buf
    c = float(softcap)
    return buf.mul_(scale / c).tanh_().mul_(c)


def dz_dl(z: torch.Tensor, scale: float, softcap: Optional[float]) -> torch.Tensor:
    """dz/dl from the transformed values z (a new tensor; 0 where z = −inf, i.e. a masked id)."""
    zero = torch.zeros((), device=z.device)
    if softcap is None:
        return torch.where(torch.isinf(z), zero, torch.full((), scale, device=z.device))
    return torch.where(torch.isinf(z), zero, scale * (1.0 - (z / float(softcap)) ** 2))


def _raw_at(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Raw fp32 logits h_i · W[ids_ij] + b[ids_ij], [c, m], in row blocks of ≤ _GATHER_ELEMS elements."""
    c, m = ids.shape
    d = h.shape[1]
    out = torch.empty(c, m, dtype=torch.float32, device=h.device)
    rows = max(1, _GATHER_ELEMS // max(m * d, 1))
    for s in range(0, c, rows):
        e = min(c, s + rows)
        w = weight[ids[s:e]].float()  # [r, m, d]
        out[s:e] = torch.einsum("rd,rmd->rm", h[s:e].float(), w)
    if bias is not None:
        out += bias.float()[ids]
    return out


class TransformChunks:
    """Any backend of the fused loss's chunk contract, with z = transform(l) applied to its logits buffer."""

    def __init__(self, base, logit_scale, softcap):
        self.base = base
        self.s = 1.0 if logit_scale is None else float(logit_scale)
        self.c = None if softcap is None else float(softcap)

    def logits_lse(self, h, weight, bias, temperature, need_lse1, store=True):
        buf, _, _ = self.base.logits_lse(h, weight, bias, 1.0, False, True)  # raw logits [c, V] fp32
        transform_(buf, self.s, self.c)
        lse_1 = torch.logsumexp(buf, dim=1) if need_lse1 else None
        lse_T = torch.logsumexp(buf / temperature, dim=1) if temperature != 1.0 else (
            lse_1 if lse_1 is not None else torch.logsumexp(buf, dim=1))
        return buf, lse_T, lse_1

    def buf_lse(self, buf, temperature):
        return self.base.buf_lse(buf, temperature)

    def dense_grad(self, buf, h, weight, bias, temperature, lse_T, lse_1, s_q, s_1, dW_acc, db_acc,
                   sparse_ids=None, sparse_coef=None):
        """dL/dl = (dL/dz)·dz/dl; dense dL/dz from the buffer (0 at masked ids), sparse at the ids."""
        from ..reference.distill_loss import dense_coef_, grad_products

        dz = dz_dl(buf, self.s, self.c)  # [c, V], before buf is overwritten
        g = dense_coef_(buf, temperature, lse_T, lse_1, s_q, s_1)  # dL/dz, in place
        g.mul_(dz)
        del dz
        if sparse_ids is not None:
            z_sp = transform_(_raw_at(h, weight, bias, sparse_ids), self.s, self.c)  # [c, m] z at the ids
            g.scatter_add_(1, sparse_ids, sparse_coef * dz_dl(z_sp, self.s, self.c))
        return grad_products(g, h, weight, dW_acc, db_acc)


class TransformTargets:
    """teacher_targets backend on transformed logits: z = transform(l)/T in the op's [chunk, V] buffer, then the
    torch backend's top-k / inverse-CDF sampling on it (so the op's rest pass still finds z in the buffer)."""

    needs_buffer = True

    def __init__(self, loss_impl, logit_scale, softcap, torch_backend: bool):
        self.loss_impl, self.torch_backend = loss_impl, torch_backend
        self.s = 1.0 if logit_scale is None else float(logit_scale)
        self.c = None if softcap is None else float(softcap)

    def _z(self, h, weight, bias, inv_t, buf):
        from ..reference import teacher_targets as _ref

        if self.torch_backend:
            z = _ref.chunk_logits(h, weight, bias, 1.0, buf)  # raw logits straight into the buffer
        else:
            raw, _, _ = self.loss_impl.logits_lse(h, weight, bias, 1.0, False, True)  # [c, V] fp32
            z = buf[:h.shape[0]]
            z.copy_(raw)
            del raw
        z = transform_(z, self.s, self.c)
        return z.mul_(inv_t) if inv_t != 1.0 else z

    def topk(self, h, weight, bias, k, inv_t, buf):
        from ..reference import teacher_targets as _ref

        z = self._z(h, weight, bias, inv_t, buf)
        lse = _ref.row_lse(z)
        vals, idx = torch.topk(z, k, dim=1, largest=True, sorted=True)
        return idx.to(torch.int32), vals - lse[:, None], lse

    def sample(self, h, weight, bias, inv_t, u, buf):
        from ..reference import teacher_targets as _ref

        return _ref.sample_from_z(self._z(h, weight, bias, inv_t, buf), u)
