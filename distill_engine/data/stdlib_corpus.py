"""The embedded demo corpus: the Python standard library's own source files, which every Python
installation ships — no download, deterministic for a given Python build.

Slices (each a list of documents, one per source file):

* ``code``: program text of the packages not held out, with docstrings and comments removed;
* ``docs_comments``: the docstrings and comments of those same files, as prose;
* one slice per held-out top-level package (default ``email``, ``json``, ``xml``): its whole source.

Every slice is split by file into train and eval documents (a seeded shuffle of the sorted file list), so
held-out evaluation text is never text any model trained on. :func:`train_tokenizer` trains a byte-level
BPE tokenizer on the training documents (the ``tokenizers`` library) and wraps it for transformers.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

CODE = "code"
DOCS = "docs_comments"
# Directories that hold tests, generated tables, bundled wheels or third-party code, not library source.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                           "encodings", "pydoc_data", "ensurepip", "lib2to3", "turtledemo"})
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class CorpusConfig:
    held_out_packages: Tuple[str, ...] = ("email", "json", "xml")
    seed: int = 0
    eval_fraction: float = 0.1          # share of each slice's files kept for evaluation
    max_file_bytes: int = 200_000       # skip larger files (generated tables)
    max_chars: Optional[Dict[str, int]] = None  # per-slice cap on training characters (documents in shuffled order)

    def validate(self) -> "CorpusConfig":
        if isinstance(self.held_out_packages, str) or not all(isinstance(p, str) and p for p in self.held_out_packages):
            raise ValueError(f"corpus config: held_out_packages must be a list of package names, got {self.held_out_packages!r}")
        clash = {CODE, DOCS} & set(self.held_out_packages)
        if clash:
            raise ValueError(f"corpus config: held_out_packages may not be named {sorted(clash)} (slice names)")
        if not (0 < self.eval_fraction < 1):
            raise ValueError(f"corpus config: eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if not isinstance(self.max_file_bytes, int) or self.max_file_bytes < 1:
            raise ValueError(f"corpus config: max_file_bytes must be an int ≥ 1, got {self.max_file_bytes!r}")
        return self


@dataclass
class Document:
    slice: str
    path: str      # relative to the standard library root, posix separators
    text: str
    split: str     # "train" | "eval"


def stdlib_root() -> str:
    """Directory of the running interpreter's pure-Python standard library."""
    return sysconfig.get_paths()["stdlib"]


def list_source_files(root: Optional[str] = None, max_file_bytes: int = 200_000) -> List[str]:
    """Sorted relative paths of the library's .py files (tests, generated tables and site-packages excluded)."""
    root = root or stdlib_root()
    if not os.path.isdir(root):
        raise ValueError(f"standard library directory {root!r} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(("config-", ".")))
        for name in filenames:
            if not name.endswith(".py"):
                continue
            full = os.path.join(dirpath, name)
            if os.path.getsize(full) > max_file_bytes:
                continue
            out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


# Strings (any prefix, triple or single quoted) and comments, in one left-to-right scan. Matching them
# together means a '#' inside a string is never taken for a comment and a quote inside a comment never
# opens a string. Pure `re` (C speed): far faster than the tokenize module on the whole library.
_STR_OR_COMMENT = re.compile(
    r'(?P<str>(?<![A-Za-z0-9_])[rRbBuUfF]{0,2}'
    r'(?:"""(?:\\.|[^\\])*?"""'
    r"|'''(?:\\.|[^\\])*?'''"
    r'|"(?:\\.|[^"\\\n])*"'
    r"|'(?:\\.|[^'\\\n])*'))"
    r"|(?P<com>\#[^\n]*)",
    re.S,
)
_PREFIX = re.compile(r"^[rRbBuUfF]{0,2}")


def _string_value(literal: str) -> str:
    body = _PREFIX.sub("", literal, count=1)
    q = 3 if body[:3] in ('"""', "'''") else 1
    return body[q:-q]


def split_source(source: str) -> Tuple[str, str]:
    """Split Python source into (code without docstrings/comments, the docstrings and comments as prose).

    One regular-expression scan finds every string literal and comment. A string is taken as a docstring
    when it owns its lines (only whitespace before it on its first line, nothing but whitespace or ';'
    after it on its last) and the previous significant character is the ':' of a block header, or
    nothing (the module docstring). Docstrings and full-line comments are removed from the code; trailing
    comments are cut off their line. The prose keeps file order; consecutive comment lines form one paragraph.
    """
    pieces: List[Tuple[int, str]] = []    # (offset, prose)
    removals: List[Tuple[int, int]] = []  # [start, end) character spans removed from the code
    last_sig = ""                         # previous significant (non-space, non-comment) character
    pos = 0
    block: List[str] = []
    block_at = 0
    block_end = -1
    for m in _STR_OR_COMMENT.finditer(source):
        gap = source[pos:m.start()].strip()
        if gap:
            last_sig = gap[-1]
        line_start = source.rfind("\n", 0, m.start()) + 1
        line_end = source.find("\n", m.end())
        line_end = len(source) if line_end < 0 else line_end
        owns_start = not source[line_start:m.start()].strip()
        if m.group("com") is not None:
            body = m.group("com").lstrip("#").strip()
            if m.start() == 0 and body.startswith("!"):
                body = ""  # shebang
            if body and not body.startswith(("-*-", "noqa", "type:", "pragma")):
                # full-line comments on consecutive lines form one paragraph; anything else starts a new one
                if block and not (owns_start and block_end >= 0 and source[block_end:line_start] == "\n"):
                    pieces.append((block_at, " ".join(block)))
                    block = []
                if not block:
                    block_at = m.start()
                block.append(body)
                block_end = line_end if owns_start else -1
            if owns_start:
                removals.append((line_start, min(line_end + 1, len(source))))
            else:
                removals.append((m.start(), line_end))
        else:
            rest = source[m.end():line_end].strip()
            if owns_start and rest in ("", ";") and last_sig in ("", ":"):
                text = inspect.cleandoc(_string_value(m.group("str"))).strip()
                if text:
                    pieces.append((m.start(), text))
                removals.append((line_start, min(line_end + 1, len(source))))
            last_sig = "s"
        pos = m.end()
    if block:
        pieces.append((block_at, " ".join(block)))

    out = []
    cur = 0
    for a, b in sorted(removals):
        a = max(a, cur)
        if b <= a:
            continue
        out.append(source[cur:a])
        cur = b
    out.append(source[cur:])
    code = "".join(out)
    code = re.sub(r"[ \t]+\n", "\n", code)
    code = re.sub(r"\n{4,}", "\n\n\n", code)  # collapse the blank-line runs the removals leave behind
    pieces.sort(key=lambda p: p[0])
    return code.strip("\n") + "\n", "\n\n".join(p[1] for p in pieces)


def _top_package(rel: str) -> str:
    head = rel.split("/", 1)[0]
    return head[:-3] if head.endswith(".py") else head


def build_corpus(config: Optional[CorpusConfig] = None, root: Optional[str] = None) -> List[Document]:
    """All documents of every slice, with their train/eval split; same input, same output."""
    cfg = (config or CorpusConfig()).validate()
    root = root or stdlib_root()
    files = list_source_files(root, cfg.max_file_bytes)
    if not files:
        raise ValueError(f"no .py files under {root!r}")
    present = {_top_package(f) for f in files}
    missing = [p for p in cfg.held_out_packages if p not in present]
    if missing:
        raise ValueError(f"held_out_packages {missing} are not top-level packages of {root!r}")
    by_slice: Dict[str, List[Tuple[str, str]]] = {CODE: [], DOCS: []}
    for p in cfg.held_out_packages:
        by_slice[p] = []
    for rel in files:
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                source = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        pkg = _top_package(rel)
        if pkg in cfg.held_out_packages:
            if source.strip():
                by_slice[pkg].append((rel, source))
            continue
        try:
            code, docs = split_source(source)
        except ValueError:
            continue
        if code.strip():
            by_slice[CODE].append((rel, code))
        if docs.strip():
            by_slice[DOCS].append((rel, docs))

    docs_out: List[Document] = []
    for name, items in by_slice.items():
        # A seeded shuffle of the sorted list, separately per slice: the split does not move when
        # another slice changes.
        order = sorted(items)
        random.Random(f"{cfg.seed}:{name}").shuffle(order)
        n_eval = max(1, int(round(cfg.eval_fraction * len(order)))) if len(order) > 1 else 0
        budget = (cfg.max_chars or {}).get(name)
        for i, (rel, text) in enumerate(order):
            split = "eval" if i < n_eval else "train"
            if split == "train" and budget is not None:
                if budget <= 0:
                    continue
                budget -= len(text)
            docs_out.append(Document(name, rel, text, split))
    return docs_out


def slice_names(docs: Iterable[Document]) -> List[str]:
    seen: Dict[str, None] = {}
    for d in docs:
        seen.setdefault(d.slice, None)
    return list(seen)


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.slice}\x00{d.path}\x00{d.split}\x00".encode())
        h.update(hashlib.sha256(d.text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, out_dir: Optional[str] = None):
    """Byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers PreTrainedTokenizerFast.

    Special tokens: ``<pad>`` (0), ``<s>`` (1, BOS — prepended by the post-processor), ``</s>`` (2, EOS),
    ``<unk>`` (3, never produced by a byte-level model, kept for tools that expect one). Saved with
    ``save_pretrained`` to ``out_dir`` when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int ≥ 300 (256 byte symbols + merges), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    if out_dir is not None:
        _save_tokenizer_atomically(fast, out_dir)
    return fast


def _save_tokenizer_atomically(tok, out_dir: str) -> None:
    # save_pretrained writes several files: write them to a sibling temporary directory, then publish it
    # with one rename, so a reader sees the whole tokenizer or none of it.
    import shutil
    import tempfile

    from .io import atomic_replace_dir, fsync_tree

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tok-", dir=parent)
    try:
        tok.save_pretrained(tmp)
        fsync_tree(tmp)
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines atomically; returns their count."""
    from .io import atomic_write_bytes

    rows = list(rows)
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    return len(rows)
