"""The on-policy metric of ``distill-engine eval`` (issue 13).

Per slice and student: the student continues prompts drawn from the slice's held-out windows (the first
``prompt_tokens`` tokens of up to ``samples`` windows; sampling at temperature 1, top-p 1, from a generator
seeded by (seed, slice)), then the teacher's per-token NLL of those continuations (lower: the student's own
samples look more like the teacher's text — the quantity on-policy distillation improves and that off-policy
metrics on fixed text miss) and the student's own NLL of them (its sampling entropy estimate) are measured
with ``de.logprobs_at`` (no [tokens, V] logits).
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence

import torch

from . import models as _models


def _generator(seed: int, slice_id: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(f"eval-onpolicy/{seed}/{slice_id}".encode()).digest()[:8], "little")
                  & ((1 << 63) - 1))
    return g


def _nll(model, inp, mask, valid, y, backend) -> torch.Tensor:
    from ..ops.logprobs_at import logprobs_at
    from ..trainer.families import logit_transform

    w, b = _models.lm_head(model)
    h = _models.final_hidden(model, inp, mask)[:, :-1][valid]  # [N, d]
    s, c = logit_transform(model.config, "model")  # the family's logits (Gemma 2 soft-cap, scaled logits)
    return -logprobs_at(h, w, y[:, None], bias=b, backend=backend, logit_scale=s, softcap=c)[:, 0].double()  # [N]


@torch.no_grad()
def on_policy_metrics(windows: Sequence, n_slices: int, t_model, students: Dict[str, torch.nn.Module], tok, *,
                      samples: int, prompt_tokens: int, max_new_tokens: int, batch_size: int, device,
                      backend: str = "auto", seed: int = 0) -> Dict[str, List[Optional[dict]]]:
    """{role: [per slice {"tokens", "teacher_nll", "student_nll"} | None]} (NLLs in nats per generated token)."""
    from ..data.loader import Batch
    from ..trainer.onpolicy import build_batch, generate

    out: Dict[str, List[Optional[dict]]] = {role: [None] * n_slices for role in students}
    for sid in range(n_slices):
        prompts = [torch.tensor(w.ids[:max(1, min(prompt_tokens, len(w.ids) - 1))], dtype=torch.long)
                   for w in windows if w.slice_id == sid][:samples]
        if not prompts:
            continue
        for role, sm in students.items():
            gen = _generator(seed, sid)
            tot = {"tokens": 0.0, "teacher_nll": 0.0, "student_nll": 0.0}
            for b0 in range(0, len(prompts), batch_size):
                ps = prompts[b0:b0 + batch_size]
                gens = generate(sm, ps, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, generator=gen,
                                eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device=device)
                tmpl = Batch(torch.zeros(1, 1, dtype=torch.long), None, torch.zeros(1, 0, dtype=torch.long),
                             torch.zeros(len(ps), dtype=torch.long), 0)
                bt = build_batch(ps, gens, tmpl, tok.pad_token_id)
                inp = bt.input_ids.to(device)
                mask = (bt.attention_mask if bt.attention_mask is not None else torch.ones_like(bt.input_ids)).to(device)
                lab = bt.labels.to(device)
                valid = lab.ne(-100)
                y = lab[valid]
                tot["tokens"] += float(valid.sum())
                tot["teacher_nll"] += float(_nll(t_model, inp, mask, valid, y, backend).sum())
                tot["student_nll"] += float(_nll(sm, inp, mask, valid, y, backend).sum())
            n = max(tot["tokens"], 1.0)
            out[role][sid] = {"tokens": int(tot["tokens"]), "prompts": len(prompts),
                              "teacher_nll": tot["teacher_nll"] / n, "student_nll": tot["student_nll"] / n}
    return out
