"""Tiny Hugging Face Llama teacher/student pairs, a byte-level tokenizer and a learnable text corpus, built
from configs on the fly and saved to a directory (the trainer tests load them like any local model)."""
from __future__ import annotations

import json
import os
import random
from typing import Dict, Optional

import torch

VOCAB = 257  # the byte-level tokenizer: 256 bytes + <|endoftext|>

TEACHER_CFG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=False, initializer_range=0.2)
STUDENT_CFG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=True, initializer_range=0.02)


def save_model(path: str, cfg: Dict, seed: int, tokenizer=None) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def corpus_lines(n: int, seed: int = 0):
    """Short, highly regular sentences: a student learns them within a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.sample(_WORDS, 3)
        out.append(f"the {w[0]} sees the {w[1]} and the {w[2]}.")
    return out


def write_jsonl(path: str, n: int, seed: int = 0, *, vary_length: bool = False) -> str:
    rng = random.Random(seed + 1)
    with open(path, "w", encoding="utf-8") as f:
        for line in corpus_lines(n, seed):
            if vary_length:
                line = line[: rng.randint(8, len(line))]
            f.write(json.dumps({"text": line}) + "\n")
    return path


def make_tiny_setup(root: str, *, n_lines: int = 200, student_cfg: Optional[Dict] = None,
                    teacher_cfg: Optional[Dict] = None) -> Dict[str, str]:
    """teacher/, student/ (both with the byte tokenizer) and data.jsonl under ``root``."""
    from distill_engine.data.tokenizer import byte_level_tokenizer

    os.makedirs(root, exist_ok=True)
    tok = byte_level_tokenizer()
    paths = {
        "teacher": save_model(os.path.join(root, "teacher"), teacher_cfg or TEACHER_CFG, 1, tok),
        "student": save_model(os.path.join(root, "student"), student_cfg or STUDENT_CFG, 2, tok),
        "data": write_jsonl(os.path.join(root, "data.jsonl"), n_lines),
    }
    return paths


def base_config(paths: Dict[str, str], out: str, **sections) -> Dict:
    cfg = {
        "run": {"output_dir": out, "seed": 7, "progress": "false", "tensorboard": False},
        "student": {"path": paths["student"]},
        "teacher": {"source": "colocated", "path": paths["teacher"], "k": 8,
                    "backend": os.environ.get("DE_TEST_BACKEND", "auto")},
        "loss": {"temperature": 1.0, "backend": os.environ.get("DE_TEST_BACKEND", "auto")},
        "data": {"train_files": [paths["data"]], "seq_len": 32},
        "train": {"zero_stage": 2, "micro_batch_size": 2, "grad_accum": 1, "max_steps": 4, "lr": 3e-3,
                  "warmup_steps": 1, "log_every": 1, "heartbeat_timeout_s": 20, "dist_timeout_s": 120,
                  "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    }
    for sec, vals in sections.items():
        if vals == "none":
            cfg[sec] = "none"
        else:
            cfg.setdefault(sec, {})
            cfg[sec] = dict(cfg[sec], **vals) if isinstance(cfg[sec], dict) else vals
    return cfg
