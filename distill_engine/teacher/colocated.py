"""The frozen teacher on every student rank.

:class:`TeacherHead` runs the teacher's base model to its final hidden states and hands them with the
lm_head weight to ``teacher_targets`` — the teacher's [N, V] logits never exist. It runs under
``torch.no_grad()`` (not ``inference_mode``: inference tensors cannot enter the autograd graph of the
student's feature losses and break ZeRO-3's parameter hooks) in eval mode, and is never handed to an
optimizer. Under ZeRO-3 inference it is the module of a DeepSpeed engine; its forward is then collective,
and every rank calls it for every micro-batch (the data plan gives every rank the same number of them).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..data.loader import Batch
from .base import TeacherBatch, TeacherSource, sample_generator


def base_model_of(model: nn.Module) -> nn.Module:
    """The decoder stack plus final norm of a Hugging Face causal LM (everything but the lm_head)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} exposes no base model (base_model_prefix) to take final hidden "
                         f"states from; distill-engine needs a *ForCausalLM model with a separate lm_head")
    return base


def lm_head_of(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight")
    return head


def rows(x: torch.Tensor, valid_index: torch.Tensor) -> torch.Tensor:
    """[B, L, d] states → [n, d]: positions 0..L-2 (each predicts the next token), loss rows only."""
    d = x.shape[-1]
    return x[:, :-1].reshape(-1, d).index_select(0, valid_index)


class TeacherHead(nn.Module):
    def __init__(self, model: nn.Module, *, k: int, temperature: float, method: str, backend: str = "auto",
                 feature_layers: Optional[Sequence[int]] = None, relation: Optional[dict] = None,
                 logit_transform: Optional[tuple] = None):
        super().__init__()
        self.model = model
        self.relation = relation  # trainer.relation.relation_spec: the tensors loss.relation needs (issue 16)
        self.k, self.temperature, self.method, self.backend = k, temperature, method, backend
        if logit_transform is None:  # the family's (logit_scale, softcap), by model_type (trainer/families.py)
            from ..trainer.families import logit_transform as _family_transform

            cfg = getattr(model, "config", None)
            logit_transform = _family_transform(cfg, "teacher") if cfg is not None else (None, None)
        self.logit_scale, self.softcap = logit_transform
        # padded vocabularies (issue 12): targets over the first vocab_limit rows (the tokenizer's tokens) only;
        # the teacher's padding rows are dropped before its softmax, so a target never names a padding id
        self.vocab_limit: Optional[int] = None
        self.feature_layers = list(feature_layers) if feature_layers else None
        self.model.eval()
        self.model.requires_grad_(False)

    def train(self, mode: bool = True):  # the teacher never leaves eval mode (dropout off)
        return super().train(False)

    def forward(self, input_ids, attention_mask, valid_index, generator=None, sampled_ids=None):
        """Top-k/sampled targets of the loss rows; with ``sampled_ids`` [n, 1] (on-policy ``sampled_reverse_kl``)
        instead the teacher's log-prob at each of those ids, as (ids, logprobs [n, 1], None, None, None). Both run
        inside this module's forward, so a ZeRO-3 teacher engine gathers the lm_head (an external parameter)
        for either."""
        from ..ops.teacher_targets import teacher_targets

        from ..trainer.relation import teacher_capture, teacher_relation

        with teacher_capture(self.model, None if sampled_ids is not None else self.relation) as store:
            out = base_model_of(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                            output_hidden_states=self.feature_layers is not None, use_cache=False,
                                            return_dict=True)
        head = lm_head_of(self.model)
        h = rows(out.last_hidden_state, valid_index)  # [n, d_t]
        w, b = head.weight, getattr(head, "bias", None)
        if self.vocab_limit is not None and self.vocab_limit < w.shape[0]:
            w, b = w[:self.vocab_limit], (b[:self.vocab_limit] if b is not None else None)  # [n_tok, d_t]
        if sampled_ids is not None:
            from ..ops.logprobs_at import logprobs_at

            lp = logprobs_at(h, w, sampled_ids.long(), bias=b, temperature=self.temperature, backend=self.backend,
                             logit_scale=self.logit_scale, softcap=self.softcap)  # [n, 1] float32
            return sampled_ids.to(torch.int32), lp, None, None, None
        t = teacher_targets(h, w, self.k, bias=b, temperature=self.temperature,
                            method=self.method, generator=generator, backend=self.backend,
                            logit_scale=self.logit_scale, softcap=self.softcap)
        hidden: Optional[List[torch.Tensor]] = None
        if self.feature_layers is not None:
            hidden = [rows(out.hidden_states[i], valid_index) for i in self.feature_layers]
        # 4th element: the exact teacher rest log-mass (None for sampled targets); 5th: loss.relation tensors
        rel = None
        if self.relation is not None:
            rel = teacher_relation(self.relation, out.last_hidden_state, attention_mask, store)
        return t.ids, t.logprobs, hidden, t.rest_logprob, rel


def runner_rest(out) -> Optional[torch.Tensor]:
    """The teacher rest log-mass of a runner's output tuple (ids, logprobs, hidden[, rest_logprob[, relation]])."""
    return out[3] if len(out) > 3 else None


def runner_relation(out):
    """The loss.relation tensors of a runner's output tuple (issue 16), or None."""
    return out[4] if len(out) > 4 else None


class ColocatedTeacher(TeacherSource):
    """``runner`` is a :class:`TeacherHead` or the DeepSpeed ZeRO-3 inference engine wrapping one."""

    name = "colocated"

    def __init__(self, runner, *, device, seed: int, dp_rank: int, method: str):
        self.runner, self.device = runner, device
        self.seed, self.dp_rank, self.method = seed, dp_rank, method

    @torch.no_grad()
    def compute(self, batch: Batch, dp_rank: Optional[int] = None) -> TeacherBatch:
        b = batch.to(self.device)
        gen = None
        if self.method == "sample":
            gen = sample_generator(self.seed, self.dp_rank if dp_rank is None else dp_rank, batch.micro_step,
                                   self.device)
        out = self.runner(b.input_ids, b.attention_mask, b.valid_index, gen)
        ids, lps, hidden = out[:3]
        return TeacherBatch(ids, lps, batch.micro_step, hidden, runner_rest(out), runner_relation(out))

    def get(self, batch: Batch) -> TeacherBatch:
        return self.compute(batch)

    @torch.no_grad()
    def score(self, batch: Batch, dp_rank: Optional[int] = None) -> TeacherBatch:
        """On-policy ``sampled_reverse_kl``: the teacher's log-prob at each generated token (the batch's labels
        at its loss rows), as a one-slot TeacherBatch: ids [n, 1] = those tokens, logprobs [n, 1]."""
        b = batch.to(self.device)
        x = b.labels.reshape(-1).index_select(0, b.valid_index)[:, None]  # [n, 1]
        ids, lps = self.runner(b.input_ids, b.attention_mask, b.valid_index, None, x)[:2]
        return TeacherBatch(ids, lps, batch.micro_step, None)
