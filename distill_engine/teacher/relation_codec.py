"""Self-describing byte encoding of a list of tensors: the ``loss.relation`` tensors (issue 16) that ride at
the end of a stream message's payload, after the packed targets and the feature-loss hidden states.

Layout: int64 words [count, then per tensor: dtype code, ndim, dims...], then each tensor's raw bytes.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DTYPES = {v: k for k, v in _CODES.items()}


def pack_tensors(tensors: List[torch.Tensor]) -> np.ndarray:
    head = [len(tensors)]
    body = []
    for t in tensors:
        t = t.detach().contiguous().cpu()
        if t.dtype not in _CODES:
            t = t.float()
        head += [_CODES[t.dtype], t.dim(), *t.shape]
        body.append(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else np.zeros(0, np.uint8))
    return np.concatenate([np.asarray(head, dtype=np.int64).view(np.uint8)] + body)


def unpack_tensors(raw: np.ndarray, where: str) -> List[torch.Tensor]:
    words = raw[: (raw.size // 8) * 8].view(np.int64)
    if words.size < 1 or words[0] < 0:
        raise RuntimeError(f"{where}: malformed relation tensors at the end of the message")
    n, pos, metas = int(words[0]), 1, []
    for _ in range(n):
        code, ndim = int(words[pos]), int(words[pos + 1])
        if code not in _DTYPES:
            raise RuntimeError(f"{where}: unknown dtype code {code} in the relation tensors")
        metas.append((_DTYPES[code], tuple(int(x) for x in words[pos + 2: pos + 2 + ndim])))
        pos += 2 + ndim
    off = pos * 8
    out = []
    for dt, shape in metas:
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
        chunk = raw[off: off + nbytes]
        if chunk.size != nbytes:
            raise RuntimeError(f"{where}: relation tensors truncated ({chunk.size} of {nbytes} bytes)")
        out.append(torch.from_numpy(chunk.copy()).view(dt).reshape(shape) if nbytes else torch.empty(shape, dtype=dt))
        off += nbytes
    return out
