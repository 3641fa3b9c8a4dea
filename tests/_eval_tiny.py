"""Tiny Hugging Face models and a tiny tokenizer for the eval / generate / demo-corpus tests."""
from __future__ import annotations

import json
import random

import torch

TEXTS = {
    "code": [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i * i)\n",
        "class Box:\n    def __init__(self, x):\n        self.x = x\n",
        "import os\npath = os.path.join('a', 'b')\n",
        "while n > 0:\n    n -= 1\n    total += n\n",
        "if value is None:\n    raise ValueError('value is required')\n",
    ],
    "prose": [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "A parser reads the input text and builds a tree of nodes for later stages.",
        "Return the number of items in the container, counting duplicates once.",
        "This module provides helpers to read and write simple configuration files.",
        "Each request is retried three times before the client gives up and reports an error.",
        "The cache keeps the most recently used entries and drops the oldest ones first.",
    ],
}


def make_tokenizer(out_dir=None, vocab_size=320):
    from distill_engine.data.stdlib_corpus import train_tokenizer

    texts = [t for group in TEXTS.values() for t in group] * 4
    return train_tokenizer(texts, vocab_size=vocab_size, out_dir=out_dir)


def make_llama(vocab_size, hidden=32, layers=2, seed=0, tie=False, intermediate=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the logits a little so the distributions are not near-uniform
        model.lm_head.weight.mul_(8.0) if not tie else None
    return model.eval()


def save_model(model, tok, path):
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return str(path)


def write_eval_data(path, per_slice=3, seed=0):
    rng = random.Random(seed)
    rows = []
    for name, texts in TEXTS.items():
        for t in rng.sample(texts, per_slice):
            rows.append({"text": t, "slice": name})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)
