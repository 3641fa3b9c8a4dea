"""Atomic file writes and careful appends for eval, generate and the demo.

Every file this package writes for a user is either replaced atomically (write a temporary file in the
same directory, flush, fsync, ``os.replace``) so a reader never sees half a report, or — for the
resumable generation output — appended one whole batch at a time with fsync, so an interrupted run
leaves at most one partial trailing line, which the next run cuts off before it appends.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Tuple

from ..data.io import atomic_write_bytes, atomic_write_json  # noqa: F401  (re-exported for report.py)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines atomically; returns their count."""
    rows = list(rows)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def read_jsonl_repairing(path: str) -> Tuple[List[dict], int]:
    """Read a JSONL file that this package appends to; cut off a partial trailing line.

    Returns ``(rows, dropped_bytes)``. A line that is not the last one and fails to parse is real
    corruption and raises ValueError; only the tail after the last newline (an interrupted append)
    is dropped, and the file is truncated to its last complete line so the next append starts clean.
    """
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    dropped = len(data) - end
    rows: List[dict] = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: line {lineno} is not valid JSON ({exc.msg}); the file is corrupt beyond an "
                f"interrupted append — move it away or pass a new output path"
            ) from None
    if dropped:
        with open(path, "rb+") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return rows, dropped


def append_lines_durably(path: str, lines: List[str]) -> None:
    """Append whole lines with one write call and fsync them before returning."""
    if not lines:
        return
    payload = "".join(line if line.endswith("\n") else line + "\n" for line in lines).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(payload)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
