"""Docstring → code retrieval pairs from the embedded standard-library corpus (issue 16, the demo's
retrieval slice).

Every function with a docstring gives one natural pair: its docstring (the query) and its body with the
docstring removed (the positive). Pairs come only from *clean* files: files that hold held-out text in some
slice and no training text in any slice (:func:`clean_files`), so neither a pair's docstring nor its code
was seen by any model the demo trains — the corpus is split by file, and the ``code`` and ``docs_comments``
slices of one file are split independently, so a file is clean only when no slice trains on it.
"""
from __future__ import annotations

import ast
import inspect
import os
import random
from typing import Dict, Iterable, List, Optional

from .stdlib_corpus import Document, stdlib_root


def clean_files(docs: Iterable[Document]) -> List[str]:
    """Sorted paths that are held out in some slice and trained on in none."""
    docs = list(docs)
    trained = {d.path for d in docs if d.split == "train"}
    return sorted({d.path for d in docs if d.split == "eval"} - trained)


def _without(lines: List[str], start: int, end: int, skip_from: int, skip_to: int) -> str:
    """Source lines start..end (1-based, inclusive) without skip_from..skip_to."""
    keep = [lines[i - 1] for i in range(start, end + 1) if not (skip_from <= i <= skip_to)]
    return "\n".join(keep).rstrip() + "\n"


def function_pairs(source: str, path: str = "<source>", *, min_doc_chars: int = 20, min_code_lines: int = 2,
                   max_doc_chars: int = 300) -> List[Dict[str, str]]:
    """[{"query": docstring's first paragraph, "positive": the function without its docstring, "path", "name"}]."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc or not node.body or getattr(node, "end_lineno", None) is None:
            continue
        first = inspect.cleandoc(doc).split("\n\n", 1)[0].strip()[:max_doc_chars]
        ds = node.body[0]
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        code = _without(lines, start, node.end_lineno, ds.lineno, ds.end_lineno)
        body_lines = [ln for ln in code.splitlines()[1:] if ln.strip()]
        if len(first) < min_doc_chars or len(body_lines) < min_code_lines:
            continue
        out.append({"query": first, "positive": code, "path": path, "name": node.name})
    return out


def retrieval_pairs(docs: Iterable[Document], *, max_pairs: int = 200, seed: int = 0,
                    root: Optional[str] = None) -> List[Dict[str, str]]:
    """Pairs from every clean file (sorted, then a seeded sample of at most ``max_pairs``)."""
    root = root or stdlib_root()
    pairs: List[Dict[str, str]] = []
    for rel in clean_files(docs):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                pairs.extend(function_pairs(f.read(), rel))
        except (UnicodeDecodeError, OSError):
            continue
    # one pair per distinct query: duplicated docstrings (overloads, copies) would make recall ambiguous
    seen, uniq = set(), []
    for p in pairs:
        if p["query"] not in seen:
            seen.add(p["query"])
            uniq.append(p)
    if len(uniq) > max_pairs:
        uniq = sorted(random.Random(f"{seed}:pairs").sample(uniq, max_pairs), key=lambda p: (p["path"], p["name"]))
    return uniq
