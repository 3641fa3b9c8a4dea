"""Relation-based distillation in the trainer (``loss.relation``, issue 16).

Example-level kinds (similarity | similarity_mse | distance | angle): the final hidden states of student
and teacher are pooled (``pooling``: mean | last | cls, over the attention mask) into one embedding per
sequence of the micro-batch, and ``relation_loss`` compares their [B, B] relations (optionally over the
global batch of every student rank: ``gather_across_ranks``).

``kind: token`` (MiniLM v2): for each mapped (student layer, teacher layer) pair, the outputs of the
attention's q_proj, k_proj and v_proj are captured by forward hooks, and ``token_relation_loss`` compares
their self-relations split into ``relation_heads`` heads (whatever the models' attention head counts); the
term is the mean over pairs and the three projections.

The teacher side (``teacher_relation``) runs inside the teacher's forward and yields a list of tensors that
travel with the targets (``TeacherBatch.relation``; colocated in memory, stream in the payload);
:class:`RelationTerm` is the student side, a child of the trained module.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

EXAMPLE_KINDS = ("similarity", "similarity_mse", "distance", "angle")
_PROJ = ("q_proj", "k_proj", "v_proj")


def layer_pairs(spec, student_layers: int, teacher_layers: int) -> List[Tuple[int, int]]:
    """``loss.relation.layer_map`` → [(student layer, teacher layer)] (0-based decoder layers)."""
    if spec in (None, "last"):
        return [(student_layers - 1, teacher_layers - 1)]
    pairs = [tuple(int(x) for x in p) for p in spec]
    for s, t in pairs:
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise ValueError(f"loss.relation.layer_map pair [{s}, {t}] is out of range: the student has "
                             f"{student_layers} layers and the teacher {teacher_layers} (0-based)")
    return pairs


def _decoder_layers(model: nn.Module, key: str):
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(getattr(layers[0], "self_attn", None), p) for p in _PROJ):
        raise ValueError(f"loss.relation.kind 'token' needs {key} decoder layers with self_attn.q_proj/k_proj/v_proj "
                         f"(Llama, Mistral, Qwen style); {type(model).__name__} has none. Use an example-level kind")
    return layers


@contextlib.contextmanager
def capture_qkv(model: nn.Module, layers: Sequence[int], key: str):
    """Within the block, ``store[(layer, proj)]`` receives the [B, L, d] output of that projection."""
    mods = _decoder_layers(model, key)
    store: Dict[Tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer in sorted(set(layers)):
        for p in _PROJ:
            def hook(_m, _inp, out, _k=(layer, p)):
                store[_k] = out
            handles.append(getattr(mods[layer].self_attn, p).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def relation_spec(cfg, student_config, teacher_config) -> Optional[dict]:
    """The resolved relation settings both sides agree on (None when loss.relation is off)."""
    r = cfg.loss.relation
    if r is None:
        return None
    spec = {"kind": r.kind, "pooling": r.pooling}
    if r.kind == "token":
        spec["pairs"] = layer_pairs(r.layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers)
    return spec


@contextlib.contextmanager
def teacher_capture(model: nn.Module, spec: Optional[dict]):
    """Wraps the teacher's forward; yields a dict whose 'qkv' fills in (token kind)."""
    if spec is None or spec["kind"] != "token":
        yield None
        return
    with capture_qkv(model, [t for _, t in spec["pairs"]], "teacher") as store:
        yield store


def teacher_relation(spec: Optional[dict], last_hidden: torch.Tensor, attention_mask, store) -> Optional[List[torch.Tensor]]:
    """The tensors the student side needs: [pooled [B, d_t]] or, per pair, [q, k, v] ([B, L, d] each)."""
    if spec is None:
        return None
    if spec["kind"] != "token":
        from ..ops.relation import pool_hidden

        return [pool_hidden(last_hidden, attention_mask, pooling=spec["pooling"]).float()]
    return [store[(t, p)].detach() for _, t in spec["pairs"] for p in _PROJ]


class RelationTerm(nn.Module):
    """Student side of ``loss.relation``: forward(student, run, attention_mask, teacher_tensors) -> scalar.

    ``run`` is a zero-argument callable running the student's base model (so the Q/K/V hooks wrap it).
    """

    def __init__(self, cfg_relation, spec: dict, backend: str = "auto"):
        super().__init__()
        r = cfg_relation
        self.kind, self.pooling, self.temperature = r.kind, r.pooling, r.temperature
        self.heads, self.gather, self.weight = r.relation_heads, r.gather_across_ranks, r.weight
        self.pairs = spec.get("pairs")
        self.backend = backend

    def run(self, student: nn.Module, call):
        """Runs ``call()`` (the student forward) with the hooks this term needs; returns (out, store)."""
        if self.kind != "token":
            return call(), None
        with capture_qkv(student, [s for s, _ in self.pairs], "student") as store:
            out = call()
        return out, dict(store)

    def forward(self, last_hidden: torch.Tensor, attention_mask, store, teacher: Sequence[torch.Tensor]):
        from ..ops.relation import pool_hidden, relation_loss
        from ..ops.token_relation import token_relation_loss

        if teacher is None:
            raise RuntimeError("loss.relation is on but the teacher source sent no relation tensors; the teacher "
                               "ranks run a different config (loss.relation must match on every rank)")
        dev = last_hidden.device
        with torch.autocast(dev.type, enabled=False):
            if self.kind != "token":
                emb = pool_hidden(last_hidden, attention_mask, pooling=self.pooling).float()
                return relation_loss(emb, teacher[0].to(dev), kind=self.kind, temperature=self.temperature,
                                     gather_across_ranks=self.gather)
            mask = None if attention_mask is None else attention_mask.bool()
            terms = []
            i = 0
            for s, _ in self.pairs:
                for p in _PROJ:
                    x = store[(s, p)]
                    t = teacher[i].to(dev)
                    i += 1
                    terms.append(token_relation_loss(x.float(), t.float(), relation_heads=self.heads, mask=mask,
                                                     causal=True, backend=self.backend))
            return torch.stack(terms).mean()
