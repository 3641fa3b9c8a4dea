"""Loading Hugging Face causal LMs for evaluation and generation, with the checks that make a wrong
input fail loudly: a path that holds no model, and a teacher/student pair with different vocabularies.

Evaluation never asks a model for logits: :func:`final_hidden` runs the model's base (decoder stack plus
final norm) and returns its last hidden states together with the lm_head weight and bias, which the
chunked metrics and the engine's ops consume.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple, Union

import torch

# the shared loaders (distill_engine/loading.py), under the names evaluation, generation and the demo use
from ..loading import check_model_dir, load_tokenizer_dir  # noqa: F401 (check_model_dir: for callers)
from ..loading import has_tokenizer_files as has_tokenizer


def load_tokenizer(path: str, role: str = "tokenizer"):
    """AutoTokenizer from a local directory, with a pad token (eos when the tokenizer has none)."""
    return load_tokenizer_dir(path, key=role, fix="pass --tokenizer DIR")


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)} or 'auto', got {dtype!r}")
    return table[dtype]


def load_causal_lm(model, role: str, *, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A path (checked) or an already-built module → a frozen eval-mode model on ``device``."""
    if isinstance(model, torch.nn.Module):
        m = model
    else:
        from ..loading import load_causal_lm as load_pretrained

        m = load_pretrained(model, key=role, dtype=dtype)
    m = m.to(device=device)
    if not isinstance(model, torch.nn.Module):
        m = m.to(dtype=dtype)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    check_logit_path(m, role)
    return m


def check_logit_path(model: torch.nn.Module, role: str) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None:  # by model_type (issue 12): Falcon-H1's lm_head_multiplier is no key of the old list
        from ..trainer.families import logit_transform

        logit_transform(cfg, role)  # raises for a transform key on a family it does not know; known ones are fused
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(f"{role}: model {type(model).__name__} has no output embedding (lm_head); pass a causal LM")
    if not hasattr(model, "base_model_prefix") or not hasattr(model, getattr(model, "base_model_prefix", "")):
        raise ValueError(f"{role}: model {type(model).__name__} exposes no base model to take final hidden states from")


def lm_head(model: torch.nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def vocab_size(model: torch.nn.Module) -> int:
    return int(lm_head(model)[0].shape[0])


def check_same_vocab(teacher: torch.nn.Module, student: torch.nn.Module, student_role: str = "student",
                     teacher_tok_dir: Optional[str] = None, student_tok_dir: Optional[str] = None) -> None:
    """Refuse a pair whose next-token distributions are not over the same ids."""
    vt, vs = vocab_size(teacher), vocab_size(student)
    if vt != vs:
        raise ValueError(
            f"teacher and {student_role} have different vocabularies: the teacher's lm_head has {vt} rows, the "
            f"{student_role}'s {vs}. Distillation and evaluation compare the two next-token distributions id by "
            f"id, so both must use the same tokenizer (train the {student_role} with the teacher's tokenizer)"
        )
    if teacher_tok_dir and student_tok_dir and has_tokenizer(teacher_tok_dir) and has_tokenizer(student_tok_dir):
        vocab_t = _tokenizer_vocab(teacher_tok_dir)
        vocab_s = _tokenizer_vocab(student_tok_dir)
        if vocab_t is not None and vocab_s is not None and vocab_t != vocab_s:
            diff = sorted(set(vocab_t.items()) ^ set(vocab_s.items()))[:3]
            raise ValueError(
                f"teacher and {student_role} tokenizers differ (same size {vt}, but e.g. {diff} are mapped "
                f"differently); use the teacher's tokenizer for the {student_role}"
            )


def _tokenizer_vocab(path: str):
    f = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(f):
        return None
    with open(f, encoding="utf-8") as fh:
        data = json.load(fh)
    vocab = dict((data.get("model") or {}).get("vocab") or {})
    for tok in data.get("added_tokens") or []:
        vocab[tok["content"]] = tok["id"]
    return vocab


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, d] last hidden states of the base model (after its final norm), no logits."""
    base = getattr(model, model.base_model_prefix)
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def model_source(model) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
