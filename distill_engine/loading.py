"""The one place that loads Hugging Face tokenizers, model configs and causal LMs from local directories.

Every loader of the package (the trainer's student/teacher, the cache writer, evaluation, generation, the demo)
goes through here, so a wrong path fails the same way everywhere: a one-line ``ValueError`` that names the
config key or role (``key``) and says what to pass instead, before transformers is asked (its own errors are
long tracebacks, or a download attempt for a name that is not a directory). Loads are local-only: a model or
tokenizer is a directory written by ``save_pretrained``. Callers add their own context (the byte tokenizer of
``data/tokenizer.py``, the trainer's ZeRO-3 switch and ``init`` dicts in ``trainer/models.py``, the frozen
eval-mode copy in ``eval/models.py``).
"""
from __future__ import annotations

import os

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(path) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer_dir(path, *, key: str, fix: str):
    """AutoTokenizer from the local directory ``path``, always with a pad token (eos when it has none).

    ``key`` names the setting in errors, ``fix`` says what to pass instead of a directory without tokenizer files."""
    path = os.fspath(path)
    if not has_tokenizer_files(path):
        raise ValueError(f"{key}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {path!r}; {fix}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"{key}: the tokenizer in {path!r} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def _subdirs_with_model(path: str):
    found = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if os.path.isdir(sub) and os.path.isfile(os.path.join(sub, "config.json")):
            found.append(sub)
    return found


def check_model_dir(path, key: str) -> str:
    """``path`` as a string; ValueError unless it is a directory written by ``save_pretrained`` (config + weights).
    A DeepSpeed checkpoint directory, or one that holds model directories, is recognized and said so."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{key} must be a path to a Hugging Face model directory or a torch.nn.Module, "
                         f"got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{key}: {path!r} does not exist; pass a directory written by save_pretrained")
    if not os.path.isdir(path):
        raise ValueError(f"{key}: {path!r} is a file, not a model directory; pass the directory that holds "
                         f"config.json and the weights")
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    has_weights = any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES)
    if has_config and has_weights:
        return path
    hints = []
    if os.path.isfile(os.path.join(path, "latest")) or any(n.startswith("global_step") for n in os.listdir(path)):
        hints.append("it looks like a DeepSpeed checkpoint (training state), not a saved model")
    subs = _subdirs_with_model(path)
    if subs:
        hints.append("model directories inside it: " + ", ".join(repr(s) for s in subs[:5]))
    missing = "config.json" if not has_config else "model weights (" + " / ".join(WEIGHT_FILES[::2]) + ")"
    hint = ("; " + "; ".join(hints)) if hints else ""
    raise ValueError(
        f"{key}: checkpoint path {path!r} holds no model: {missing} missing{hint}. Pass the directory the "
        f"trainer's final save_pretrained wrote (or any Hugging Face model directory)"
    )


def load_config(path, *, key: str):
    """The model config (``config.json``) of the local directory ``path``, without its weights."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{key}: {path!r} is not a Hugging Face model directory (no config.json); pass a "
                         f"directory written by save_pretrained")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_causal_lm(path, *, key: str, dtype, **kwargs):
    """AutoModelForCausalLM from the checked local directory ``path`` in ``dtype`` (``kwargs``: e.g.
    ``attn_implementation``)."""
    path = check_model_dir(path, key)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
