"""Local text data → token samples: loading (JSONL / text / parquet through ``datasets``), tokenization with
the shared tokenizer, sequence packing, and the dataset fingerprint a teacher cache is keyed on.

A :class:`TokenSamples` is the whole tokenized training set of one run, held as one flat int32 array plus
offsets (sample ``i`` is ``tokens[offsets[i]:offsets[i+1]]``). With packing, documents (each followed by eos)
are concatenated and cut into blocks of exactly ``seq_len`` tokens; without it, each document is one sample,
truncated to ``seq_len``. Sample ids are positions in this list, and are what the teacher cache indexes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".md": "text", ".parquet": "parquet"}


def _format_of(path: str, fmt: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise ValueError(f"{key}: cannot tell the format of {path!r} from its extension; set data.format to "
                         f"'json', 'text' or 'parquet'")
    return _FORMATS[ext]


def load_texts(files: Sequence[str], *, fmt: str = "auto", text_field: str = "text", sample_by: str = "document",
               cache_dir: Optional[str] = None, key: str = "data.train_files") -> List[str]:
    """Documents of local files, in file order, through ``datasets.load_dataset`` (json / text / parquet)."""
    ds, kind = _load_dataset(files, fmt, sample_by, cache_dir, key)
    field = "text" if kind == "text" else text_field
    if field not in ds.column_names:
        raise ValueError(f"data.text_field: column {field!r} not found in {files[0]!r} (columns: {ds.column_names})")
    texts = [t for t in ds[field] if isinstance(t, str) and t]
    if not texts:
        raise ValueError(f"{key}: no non-empty text in column {field!r}")
    return texts


def load_prompts(files: Sequence[str], *, fmt: str = "auto", text_field: str = "text", prompt_field: str = "prompt",
                 cache_dir: Optional[str] = None, key: str = "data.train_files") -> Optional[List[str]]:
    """The ``prompt_field`` column, one entry per document of :func:`load_texts` (same files, same rows kept), or
    None when the data has no such column (text files never do). An empty or missing prompt in a row that has
    text raises a one-line ValueError naming the file and the row."""
    if {_format_of(f, fmt, key) for f in files} == {"text"}:
        return None  # text files have no columns
    ds, kind = _load_dataset(files, fmt, "document", cache_dir, key)
    if prompt_field not in ds.column_names:
        return None
    out = []
    for row, (t, p) in enumerate(zip(ds[text_field], ds[prompt_field])):
        if not (isinstance(t, str) and t):
            continue  # no text: not a document (load_texts drops it too)
        if not isinstance(p, str) or not p:
            path, r = _row_origin(files, kind, cache_dir, row)
            raise ValueError(f"data.prompt_field: row {r} of {path!r} has an empty, missing or non-string "
                             f"{prompt_field!r} prompt; fill it in with text or drop the row (or set data.prompt_field "
                             f"to a column the data does not have: prompts are then the first "
                             f"loss.on_policy.prompt_tokens tokens)")
        out.append(p)
    return out


def _row_origin(files: Sequence[str], kind: str, cache_dir: Optional[str], row: int):
    """(file, 0-based row in that file) of row ``row`` of the concatenated data (error messages only)."""
    import datasets

    for f in files:
        n = datasets.load_dataset(kind, data_files=[f], split="train", cache_dir=cache_dir).num_rows
        if row < n:
            return f, row
        row -= n
    return files[-1], row


def _load_dataset(files: Sequence[str], fmt: str, sample_by: str, cache_dir: Optional[str], key: str):
    """(datasets.Dataset of all files, its kind json | text | parquet), with one-line errors for bad files."""
    if not files:
        raise ValueError(f"{key} is empty; list at least one .jsonl, .txt or .parquet file")
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"{key}: file {f!r} does not exist")
    kinds = {_format_of(f, fmt, key) for f in files}
    if len(kinds) != 1:
        raise ValueError(f"{key} mixes formats {sorted(kinds)}; use one format per run")
    kind = kinds.pop()
    for f in files:
        _precheck_file(f, kind, key)
    import datasets

    datasets.disable_progress_bars()
    kwargs = {"sample_by": sample_by} if kind == "text" else {}
    try:
        ds = datasets.load_dataset(kind, data_files=list(files), split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # errors from deep inside datasets/pyarrow: one line naming the files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{key}: could not read {list(files)!r} as {kind} ({type(e).__name__}: {first}); check "
                         f"the files' format or set data.format") from None
    return ds, kind


def _precheck_file(path: str, kind: str, key: str) -> None:
    """Cheap checks before ``datasets`` sees a file: not empty, and JSON files start like JSON (the first
    non-blank lines of a JSONL file must each be a JSON object)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{key}: file {path!r} is empty; it must hold at least one document")
    if kind != "json":
        return
    import json

    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    text = head.decode("utf-8", errors="replace").lstrip()
    if not text:
        raise ValueError(f"{key}: file {path!r} holds only whitespace; it must hold at least one document")
    if text[0] not in "[{":
        raise ValueError(f"{key}: file {path!r} is not JSON/JSONL (it starts with {text[:20]!r}); convert it or "
                         f"set data.format: text")
    if text[0] == "{":  # JSONL: check the complete lines of the head
        lines = text.splitlines()
        for lineno, line in enumerate(lines[:-1] if len(head) == 1 << 16 else lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}: file {path!r} line {lineno} is not valid JSON ({e.msg}); fix the line or "
                                 f"set data.format: text") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{key}: file {path!r} line {lineno} is a JSON {type(rec).__name__}, expected an "
                                 f"object with a text field")


@dataclass
class TokenSamples:
    tokens: np.ndarray    # [T] int32, all samples back to back
    offsets: np.ndarray   # [M + 1] int64
    seq_len: int
    packing: bool
    doc_index: Optional[np.ndarray] = None  # [M] int64: the text (document) holding each sample's first token

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def rows(self, i: int) -> int:
        """Number of next-token predictions (loss rows) of sample ``i``."""
        return int(self.offsets[i + 1] - self.offsets[i]) - 1

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"seq_len={self.seq_len};packing={self.packing};".encode())
        h.update(np.ascontiguousarray(self.offsets, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.tokens, dtype=np.int32).tobytes())
        return h.hexdigest()


def tokenize(texts: Sequence[str], tokenizer, *, seq_len: int, packing: bool = True, add_eos: bool = True,
             max_samples: Optional[int] = None, batch: int = 64) -> TokenSamples:
    if seq_len < 2:
        raise ValueError(f"data.seq_len must be >= 2 (one input and one target token), got {seq_len}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("data.add_eos is true but the tokenizer has no eos token; set data.add_eos: false")
    docs: List[np.ndarray] = []
    doc_ids: List[int] = []  # the text each kept document came from
    # Small batches, ids only: a batch's Python int lists stay in the allocator's arenas after it is freed, so a
    # 1,000-document batch (with its attention masks) kept ~45 MiB more resident for the whole run (bench_onpolicy).
    for s in range(0, len(texts), batch):
        enc = tokenizer(list(texts[s:s + batch]), add_special_tokens=True, return_attention_mask=False)
        for j, ids in enumerate(enc["input_ids"]):
            if add_eos and (not ids or ids[-1] != eos):
                ids = list(ids) + [eos]
            if len(ids) >= 2 or packing:
                docs.append(np.asarray(ids, dtype=np.int32))
                doc_ids.append(s + j)
    if packing:
        flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        m = len(flat) // seq_len
        if max_samples is not None:
            m = min(m, max_samples)
        flat = flat[: m * seq_len]
        offsets = np.arange(m + 1, dtype=np.int64) * seq_len
        starts = np.cumsum([0] + [len(d) for d in docs[:-1]]) if docs else np.zeros(0, np.int64)
        doc_index = np.asarray(doc_ids, dtype=np.int64)[np.searchsorted(starts, offsets[:-1], side="right") - 1] \
            if m else np.zeros(0, np.int64)
    else:
        keep = [i for i, d in enumerate(docs) if len(d) >= 2][:max_samples]
        docs = [docs[i][:seq_len] for i in keep]
        doc_index = np.asarray([doc_ids[i] for i in keep], dtype=np.int64)
        flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(d) for d in docs])
    if len(offsets) < 2:
        raise ValueError(f"the data yields no training sample of seq_len={seq_len} tokens "
                         f"({sum(len(d) for d in docs)} tokens in all); add data or lower data.seq_len")
    return TokenSamples(tokens=flat, offsets=offsets, seq_len=seq_len, packing=packing, doc_index=doc_index)
