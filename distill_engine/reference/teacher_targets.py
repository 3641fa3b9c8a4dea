"""PyTorch implementations for the teacher-targets op.

* The ``torch`` backend of ``teacher_targets``: one row chunk at a time, the raw logits of the chunk go
  into ONE reusable fp32 [chunk, V] buffer (vocabulary tiles of the weight are cast to fp32 on the fly,
  so bf16/fp16 inputs get fp32 logits without an fp32 copy of the whole weight), then the row
  log-sum-exp, ``torch.topk`` or the inverse-CDF sampling walk run on that buffer in vocabulary blocks,
  so no second [chunk, V] tensor is created.
* ``dense_teacher_logprobs`` / ``dense_topk_reference`` / ``dense_sample_reference``: the float64
  dense oracle used by the tests (materialises [N, V]; tests only).

Sampling semantics shared by every backend (see ``ops/teacher_targets.py``): draw j of a row is the
smallest vocabulary index v with u_j < Σ_{w ≤ v} p_w for a sorted uniform u_j ∈ [0, 1); a draw the
rounding of the cumulative sum leaves unresolved (u_j at or above the computed total) goes to the last
index with non-zero probability. The draws of a row are therefore non-decreasing in j.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Vocabulary block of the torch backend's passes over the chunk buffer (bounds the temporaries).
_VOCAB_BLOCK = 4096


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------
def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], inv_t: float,
                 buf: torch.Tensor) -> torch.Tensor:
    """z = (h Wᵀ + b) · inv_t into ``buf[:c]`` (fp32) and return that view. h [c, d], buf [≥c, V]."""
    c = h.shape[0]
    V = weight.shape[0]
    z = buf[:c]  # [c, V]
    if weight.dtype == torch.float32:
        if bias is not None:
            torch.addmm(bias, h, weight.t(), out=z)
        else:
            torch.mm(h, weight.t(), out=z)
    else:
        # fp32 accumulation for half inputs: cast one vocabulary tile of the weight at a time
        h32 = h.float()
        for v0 in range(0, V, _VOCAB_BLOCK):
            v1 = min(V, v0 + _VOCAB_BLOCK)
            z[:, v0:v1] = h32 @ weight[v0:v1].float().t()
        if bias is not None:
            z.add_(bias.float())
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z


def row_lse(z: torch.Tensor) -> torch.Tensor:
    """log Σ_v exp(z_v) per row, in vocabulary blocks (temporaries of [c, block] only). z [c, V] → [c]."""
    m = z.amax(dim=1)  # [c]
    s = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    for v0 in range(0, z.shape[1], _VOCAB_BLOCK):
        s += torch.exp(z[:, v0:v0 + _VOCAB_BLOCK] - m[:, None]).sum(dim=1, dtype=torch.float64)
    return (m.double() + s.log()).float()


def topk_chunk(h, weight, bias, k: int, inv_t: float, buf) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of one chunk: (ids [c, k] int32, logprobs [c, k] fp32 sorted descending, lse [c])."""
    z = chunk_logits(h, weight, bias, inv_t, buf)  # [c, V]
    lse = row_lse(z)  # [c]
    vals, idx = torch.topk(z, k, dim=1, largest=True, sorted=True)  # [c, k]
    return idx.to(torch.int32), vals - lse[:, None], lse


def sample_chunk(h, weight, bias, inv_t: float, u: torch.Tensor, buf) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws of one chunk: u [c, k] sorted uniforms (float64) → (draw ids [c, k] int64, lse [c]).

    The buffer is turned into probabilities in place; the cumulative sum runs in float64 one
    vocabulary block at a time, each draw resolved by ``searchsorted`` in the block that holds it.
    """
    return sample_from_z(chunk_logits(h, weight, bias, inv_t, buf), u)


def sample_from_z(z: torch.Tensor, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse-CDF walk of ``sample_chunk`` on tempered logits z [c, V] (fp32 scratch, overwritten)."""
    c, V = z.shape
    lse = row_lse(z)
    p = z.sub_(lse[:, None]).exp_()  # [c, V] probabilities, in place
    out = torch.full(u.shape, -1, dtype=torch.int64, device=u.device)  # [c, k]
    running = torch.zeros(c, dtype=torch.float64, device=z.device)  # [c] mass before the block
    last_nz = torch.full((c,), -1, dtype=torch.int64, device=z.device)  # last index with p > 0
    for v0 in range(0, V, _VOCAB_BLOCK):
        pb = p[:, v0:v0 + _VOCAB_BLOCK]  # [c, B]
        incl = running[:, None] + torch.cumsum(pb, dim=1, dtype=torch.float64)  # [c, B] inclusive CDF
        end = incl[:, -1]
        # draws in this block: running <= u < end; position = #{v : incl_v <= u}
        pos = torch.searchsorted(incl, u, right=True)  # [c, k]
        inside = (u >= running[:, None]) & (u < end[:, None]) & (out < 0)
        out = torch.where(inside, v0 + pos, out)
        nz = pb > 0
        has = nz.any(dim=1)
        last_in_block = pb.shape[1] - 1 - torch.flip(nz, dims=[1]).to(torch.int8).argmax(dim=1)
        last_nz = torch.where(has, v0 + last_in_block, last_nz)
        running = end
    # draws the float rounding left past the total go to the last index with non-zero probability
    out = torch.where(out < 0, last_nz[:, None].expand_as(out), out)
    return out, lse


# ----------------------------------------------------------------------------------------------
# float64 dense oracle (tests only: materialises [N, V])
# ----------------------------------------------------------------------------------------------
def dense_teacher_logprobs(hidden, weight, bias=None, temperature: float = 1.0, logit_scale=None,
                           softcap=None) -> torch.Tensor:
    """log softmax(z / T) in float64, [N, V], z = s·(h Wᵀ + b), soft-capped to c·tanh(z/c) when softcap."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if logit_scale is not None:
        logits = logits * float(logit_scale)
    if softcap is not None:
        logits = float(softcap) * torch.tanh(logits / float(softcap))
    return torch.log_softmax(logits / temperature, dim=1)


def dense_topk_reference(hidden, weight, k: int, bias=None, temperature: float = 1.0):
    """(ids [N, k] int64, logprobs [N, k] float64) of the exact top-k, sorted descending."""
    lp = dense_teacher_logprobs(hidden, weight, bias, temperature)
    vals, idx = torch.topk(lp, k, dim=1)
    return idx, vals


def dense_sample_reference(hidden, weight, u: torch.Tensor, bias=None, temperature: float = 1.0) -> torch.Tensor:
    """Draw ids [N, k] for sorted uniforms u [N, k] by the float64 inverse CDF (same rule as the backends)."""
    p = dense_teacher_logprobs(hidden, weight, bias, temperature).exp()
    cdf = torch.cumsum(p, dim=1)  # [N, V]
    V = p.shape[1]
    pos = torch.searchsorted(cdf, u.double(), right=True)  # #{v : cdf_v <= u}
    nz = p > 0
    last_nz = V - 1 - torch.flip(nz, dims=[1]).to(torch.int8).argmax(dim=1)
    return torch.where(pos >= V, last_nz[:, None].expand_as(pos), pos)
