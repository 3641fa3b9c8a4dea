"""Held-out text for evaluation: reading it (JSONL, JSON, text, parquet), checking it, and cutting it
into next-token windows that never cross a document or a slice boundary."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

AUTO = "auto"
DEFAULT_SLICE_COLUMN = "slice"
ALL = "all"


def _check_readable(path, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what} must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{what}: {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path!r} is a directory; pass a .jsonl, .json, .txt or .parquet file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what}: {path!r} is not readable (permissions)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what}: {path!r} is empty; it must hold at least one record")
    return path


def jsonl_objects(lines, where) -> Iterator[Tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (``lines``: the open file); a line that is
    not a JSON object raises one ValueError that starts with ``where(line number)`` (file and line)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where(lineno)} is not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where(lineno)} is a JSON {type(rec).__name__}, expected an object")
        yield lineno, rec


def read_records(path, what: str = "data") -> List[dict]:
    """Records (dicts) of a local data file; ValueError for a missing, empty or unreadable file."""
    path = _check_readable(path, what)
    ext = os.path.splitext(path)[1].lower()
    records: List[dict] = []
    try:
        if ext in (".jsonl", ".ndjson") or (ext == ".json" and _first_char(path) == "{"):
            with open(path, encoding="utf-8") as f:
                records = [rec for _, rec in jsonl_objects(f, lambda n: f"{what}: {path!r} line {n}")]
        elif ext == ".json":
            with open(path, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{what}: {path!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise ValueError(f"{what}: {path!r} must hold a JSON list of objects (or be JSONL)")
            records = data
        elif ext in (".txt", ".text", ".md"):
            with open(path, encoding="utf-8") as f:
                records = [{"text": line.rstrip("\n")} for line in f if line.strip()]
        elif ext == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:  # pragma: no cover - pyarrow comes with datasets
                raise ValueError(f"{what}: reading parquet needs pyarrow (installed with `datasets`)") from None
            try:
                records = pq.read_table(path).to_pylist()
            except Exception as exc:
                raise ValueError(f"{what}: {path!r} is not a readable parquet file ({exc})") from None
        else:
            raise ValueError(f"{what}: unsupported file type {ext!r} for {path!r}; use .jsonl, .json, .txt or .parquet")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path!r} ({exc.strerror or exc})") from None
    if not records:
        raise ValueError(f"{what}: {path!r} holds no records")
    return records


def _first_char(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            ch = f.read(1)
            if not ch or not ch.isspace():
                return ch


def slice_texts(records: Sequence[dict], *, text_column: str = "text", slice_column: Optional[str] = AUTO,
                source: str = "data") -> Dict[str, List[str]]:
    """Group document texts by slice, in first-seen slice order.

    ``slice_column="auto"`` uses a ``slice`` column when every record has one and otherwise puts all
    records in one slice named ``all``; any other name must exist in every record; None means one slice.
    """
    cols = sorted({k for r in records[:1000] for k in r})
    if not all(text_column in r for r in records):
        raise ValueError(f"{source}: text column {text_column!r} is missing (columns: {cols}); pass text_column / --text-column")
    use = slice_column
    if slice_column == AUTO:
        have = [DEFAULT_SLICE_COLUMN in r for r in records]
        use = DEFAULT_SLICE_COLUMN if all(have) else None
        if any(have) and not all(have):  # never silently evaluate a sliced file as one slice
            raise ValueError(f"{source}: record {have.index(False)} has no {DEFAULT_SLICE_COLUMN!r} field although "
                             f"other records do; add it, or pass slice_column=None / --slice-column '' to evaluate "
                             f"everything as one slice")
    elif slice_column is not None:
        missing = [i for i, r in enumerate(records) if slice_column not in r]
        if missing:
            raise ValueError(
                f"{source}: slice column {slice_column!r} does not exist"
                + (f" in record {missing[0]}" if len(missing) < len(records) else "")
                + f" (columns: {cols}); pass slice_column=None / --slice-column '' to evaluate everything as one slice"
            )
    groups: Dict[str, List[str]] = {}
    for i, r in enumerate(records):
        text = r[text_column]
        if not isinstance(text, str):
            raise ValueError(f"{source}: record {i} has a {type(text).__name__} in {text_column!r}, expected a string")
        name = ALL if use is None else str(r[use])
        groups.setdefault(name, []).append(text)
    return groups


@dataclass
class Window:
    slice_id: int
    ids: List[int]  # L+1 tokens: inputs ids[:-1], labels ids[1:]


def make_windows(groups: Dict[str, List[str]], tokenizer, *, max_length: int,
                 max_tokens_per_slice: Optional[int] = None) -> Tuple[List[str], List[Window]]:
    """Tokenize each document and cut it into windows of ≤ max_length predicted tokens.

    Window i covers tokens [i·L, i·L + L] (L+1 tokens) so every token after a document's first is
    predicted exactly once; windows never span two documents. ``max_tokens_per_slice`` caps the
    predicted tokens taken from each slice (documents in file order).
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int ≥ 1, got {max_length!r}")
    names = list(groups)
    windows: List[Window] = []
    for sid, name in enumerate(names):
        budget = max_tokens_per_slice
        for text in groups[name]:
            if budget is not None and budget <= 0:
                break
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            for start in range(0, max(len(ids) - 1, 0), max_length):
                chunk = ids[start:start + max_length + 1]
                if budget is not None:
                    chunk = chunk[:budget + 1]
                if len(chunk) < 2:
                    continue
                windows.append(Window(sid, chunk))
                if budget is not None:
                    budget -= len(chunk) - 1
                    if budget <= 0:
                        break
    return names, windows


def batches(windows: Sequence[Window], batch_size: int, pad_id: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids [B, L], attention_mask [B, L], labels [B, L] with -100 on padding, slice_id [B]) batches, right-padded."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
    for b0 in range(0, len(windows), batch_size):
        group = windows[b0:b0 + batch_size]
        width = max(len(w.ids) - 1 for w in group)
        inp = torch.full((len(group), width), pad_id, dtype=torch.long)
        lab = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, w in enumerate(group):
            n = len(w.ids) - 1
            inp[i, :n] = torch.tensor(w.ids[:-1])
            lab[i, :n] = torch.tensor(w.ids[1:])
            mask[i, :n] = 1
        yield inp, mask, lab, torch.tensor([w.slice_id for w in group], dtype=torch.long)
