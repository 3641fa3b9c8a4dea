"""The run's shared tokenizer: loading, a built-in byte-level tokenizer for tiny runs, a fingerprint, and
the vocabulary check between teacher and student.

Sparse teacher targets are token *ids*: they only mean something to the student when both models index
the same vocabulary. :func:`check_shared_vocab` refuses a pair whose tokenizers or embedding sizes differ.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

from ..loading import has_tokenizer_files, load_tokenizer_dir

BYTE_TOKENIZER = "byte"
BYTE_VOCAB_SIZE = 257  # 256 byte tokens + <|endoftext|> (a prime, which keeps tiny runs off block-size multiples)
_EOS = "<|endoftext|>"


def byte_level_tokenizer():
    """A 257-token byte-level tokenizer (every byte is a token, plus <|endoftext|> as eos and pad).

    Built in memory with the ``tokenizers`` library: a BPE model with no merges over the 256-symbol
    byte alphabet, so any text round-trips exactly. Used by the on-the-fly example run and the tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[_EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([_EOS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=_EOS, pad_token=_EOS)
    return fast


def load_tokenizer(spec: str, *, key: str = "data.tokenizer"):
    """``spec`` is a local tokenizer directory or ``"byte"``. The result always has a pad token."""
    if spec == BYTE_TOKENIZER:
        return byte_level_tokenizer()
    return load_tokenizer_dir(spec, key=key,
                              fix=f"point {key} at a directory saved by save_pretrained, or use {BYTE_TOKENIZER!r}")


def tokenizer_fingerprint(tok) -> str:
    """sha256 over the id→token map and the special tokens: equal fingerprints, same token ids."""
    h = hashlib.sha256()
    vocab = tok.get_vocab()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode("utf-8"))
    specials = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    h.update(json.dumps(specials, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def check_shared_vocab(tokenizer, student_config, teacher_config=None, teacher_tokenizer=None,
                       *, teacher_where: str = "teacher.path", allow_padded: bool = False) -> None:
    """Refuse a teacher/student pair that does not index one vocabulary, and a tokenizer larger than the model.

    ``allow_padded`` (colocated teacher, issue 12): vocab sizes may differ when both cover the tokenizer —
    embedding rows beyond it are padding (Qwen pads to multiples of 128/256); the caller then restricts the
    teacher's targets to the tokenizer's tokens (TeacherHead.vocab_limit)."""
    n_tok = len(tokenizer)
    v_s = int(student_config.vocab_size)
    if n_tok > v_s:
        raise ValueError(f"the tokenizer has {n_tok} tokens but the student's embedding has vocab_size={v_s}: "
                         f"token ids would fall outside the student's vocabulary; use the student's own tokenizer "
                         f"(data.tokenizer) or resize the student's embeddings")
    if teacher_config is not None:
        v_t = int(teacher_config.vocab_size)
        if v_t != v_s and allow_padded and n_tok <= v_t:
            pass  # padded vocabularies: targets over the tokenizer's n_tok tokens only
        elif v_t != v_s:
            raise ValueError(f"teacher vocab_size={v_t} ({teacher_where}) differs from student vocab_size={v_s}: "
                             f"distillation on token ids needs one shared vocabulary; build the student with the "
                             f"teacher's tokenizer and vocab_size")
    if teacher_tokenizer is not None:
        a, b = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(teacher_tokenizer)
        if a != b:
            va, vb = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
            diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
            raise ValueError(f"the teacher's tokenizer ({teacher_where}) differs from the run's tokenizer "
                             f"(data.tokenizer): e.g. {diff}; teacher and student must share one tokenizer")


def tokenizer_for_model(path: Optional[str]):
    """The tokenizer saved next to a model, or None when the directory has none."""
    if path and has_tokenizer_files(path):
        return load_tokenizer(path, key=path)
    return None
