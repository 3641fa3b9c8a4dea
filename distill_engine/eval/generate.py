"""Black-box (sequence-level) distillation, step one: write the teacher's completions of a prompt set.

``distill-engine generate --teacher PATH --prompts FILE --out FILE`` samples a completion per prompt and
appends rows ``{"id", "prompt", "completion", "text", "finish_reason", "completion_tokens", "settings"}`` to
a JSONL file; the trainer then fine-tunes a student on the ``text`` column with ``teacher: none`` (plain
cross-entropy on the teacher's text). Only text crosses from teacher to student, so any teacher that can
complete a prompt — including one behind an API — can be distilled this way.

Resumable and exact:

* each batch is appended with a single write and fsync'd before the next starts, and every row carries
  its record id; a rerun reads the file, cuts off a partial trailing line left by a kill, and generates
  only the ids not yet present — nothing duplicated, nothing lost;
* sampling is per row: a row's randomness comes from its own generator seeded by (seed, id), and the
  choice is a Gumbel-max draw over the temperature/top-k/top-p–warped logits, so a row's completion does
  not depend on which other rows shared its batch or on where a previous run stopped;
* rows record a hash of the teacher and sampling settings; resuming with different settings raises
  instead of silently mixing two distributions in one file.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, fields, replace
from typing import List, Optional

import torch

from . import models as _models
from ._io import append_lines_durably, read_jsonl_repairing
from .data import read_records


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0          # 0 = greedy decoding
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    batch_size: int = 8
    seed: int = 0
    prompt_column: str = "prompt"     # for JSON/JSONL/parquet prompts; a .txt file holds one prompt per line
    id_column: Optional[str] = "auto"  # "auto": use an `id` column when present, else the record's index
    limit: Optional[int] = None       # generate at most this many new rows in this run
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    def validate(self) -> "GenerateConfig":
        def bad(key, want, got):
            raise ValueError(f"generate config: {key} must be {want}, got {got!r}")

        for key in ("max_new_tokens", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, "an int ≥ 1", v)
        if not isinstance(self.temperature, (int, float)) or not (0 <= self.temperature < float("inf")):
            bad("temperature", "a finite number ≥ 0 (0 = greedy)", self.temperature)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an int ≥ 0 (0 = off)", self.top_k)
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            bad("top_p", "a number in (0, 1]", self.top_p)
        if not isinstance(self.seed, int):
            bad("seed", "an int", self.seed)
        if not isinstance(self.prompt_column, str) or not self.prompt_column:
            bad("prompt_column", "a column name", self.prompt_column)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            bad("limit", "an int ≥ 0 or None", self.limit)
        return self

    def sampling(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature),
                "top_k": self.top_k, "top_p": float(self.top_p), "seed": self.seed}


def _row_seed(seed: int, rid: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{rid}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class _RowwiseSampler:
    """Logits processor that turns greedy search into per-row sampling.

    scores [B, V] → temperature → top-k mask → top-p mask → + Gumbel noise from each row's own generator.
    argmax(z/T + G) with G ~ Gumbel(0, 1) i.i.d. is a draw from softmax(z/T) (restricted to the kept set).
    """

    def __init__(self, seeds: List[int], temperature: float, top_k: int, top_p: float):
        self.gens = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(s)
            self.gens.append(g)
        self.t, self.k, self.p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        z = scores.float() / self.t                                       # [B, V]
        v = z.shape[1]
        if 0 < self.k < v:
            kth = torch.topk(z, self.k, dim=1).values[:, -1:]            # [B, 1]
            z = z.masked_fill(z < kth, -float("inf"))
        if self.p < 1.0:
            sorted_z, order = torch.sort(z, dim=1, descending=True)
            probs = torch.softmax(sorted_z, dim=1)
            # drop a token when the mass strictly before it already reaches p (the first token always stays)
            drop_sorted = (torch.cumsum(probs, dim=1) - probs) >= self.p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            z = z.masked_fill(drop, -float("inf"))
        u = torch.stack([torch.rand(v, generator=g, dtype=torch.float64) for g in self.gens])  # [B, V]
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        return z + gumbel.to(z.device, torch.float32)


def _fingerprint(teacher) -> str:
    h = hashlib.sha256()
    if isinstance(teacher, torch.nn.Module):
        h.update(type(teacher).__name__.encode())
        h.update(json.dumps(getattr(getattr(teacher, "config", None), "to_dict", dict)(), sort_keys=True, default=str).encode())
        h.update(str(sum(p.numel() for p in teacher.parameters())).encode())
    else:
        path = os.fspath(teacher)
        with open(os.path.join(path, "config.json"), "rb") as f:
            h.update(f.read())
        for name in sorted(os.listdir(path)):
            if name.endswith((".safetensors", ".bin")):
                h.update(f"{name}:{os.path.getsize(os.path.join(path, name))}".encode())
    return h.hexdigest()[:16]


def _prompt_rows(prompts, cfg: GenerateConfig):
    if isinstance(prompts, list):
        if not prompts:
            raise ValueError("prompts: the list is empty")
        recs = [p if isinstance(p, dict) else {cfg.prompt_column: p} for p in prompts]
    else:
        path = os.fspath(prompts)
        recs = read_records(path, "prompts")
        if path.lower().endswith((".txt", ".text", ".md")):
            recs = [{cfg.prompt_column: r["text"]} for r in recs]
    id_col = cfg.id_column
    if id_col == "auto":
        id_col = "id" if all("id" in r for r in recs) else None
    rows = []
    seen = set()
    for i, r in enumerate(recs):
        if cfg.prompt_column not in r:
            cols = sorted(r)
            raise ValueError(f"prompts: record {i} has no {cfg.prompt_column!r} column (columns: {cols}); pass --prompt-column")
        text = r[cfg.prompt_column]
        if not isinstance(text, str):
            raise ValueError(f"prompts: record {i} has a {type(text).__name__} prompt, expected a string")
        if id_col is not None and id_col not in r:
            raise ValueError(f"prompts: record {i} has no id column {id_col!r}")
        rid = str(r[id_col]) if id_col is not None else str(i)
        if rid in seen:
            raise ValueError(f"prompts: id {rid!r} appears twice; record ids must be unique so a resumed run can skip done rows")
        seen.add(rid)
        rows.append((rid, text))
    return rows


def _done_ids(out: str, rows, settings_hash: str):
    """(ids already in ``out``, bytes of a cut-off partial line): an existing file must have been written with the
    same settings, for the same prompt set, without duplicate ids."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    existing, dropped = read_jsonl_repairing(out)
    done = set()
    for i, r in enumerate(existing):
        if r.get("settings") != settings_hash:
            raise ValueError(
                f"out: {out!r} already holds rows written with other teacher/sampling settings (row {i}: "
                f"{r.get('settings')!r}, now {settings_hash!r}); resume with the same settings or write to a new file"
            )
        rid = str(r.get("id"))
        if rid in done:
            raise ValueError(f"out: {out!r} holds id {rid!r} twice; the file was edited by hand — deduplicate it first")
        done.add(rid)
    unknown_ids = done - {rid for rid, _ in rows}
    if unknown_ids:
        raise ValueError(f"out: {out!r} holds ids not in the prompts file (e.g. {sorted(unknown_ids)[:3]}); "
                         "it belongs to another prompt set — write to a new file")
    return done, dropped


def _generation_tokenizer(tokenizer, teacher):
    """The tokenizer object, directory, or (None) the teacher directory's own; always with a pad token."""
    if tokenizer is None:
        if isinstance(teacher, torch.nn.Module):
            raise ValueError("tokenizer is required when the teacher is a module rather than a model directory")
        tok = _models.load_tokenizer(os.fspath(teacher), "teacher tokenizer")
    elif isinstance(tokenizer, (str, os.PathLike)):
        tok = _models.load_tokenizer(os.fspath(tokenizer))
    else:
        tok = tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _generate_batch(model, tok, batch, cfg: GenerateConfig, device, settings_hash: str) -> List[str]:
    """One JSON line per (id, prompt) of ``batch``: the prompt continued by ``model`` (left-padded ``tok``),
    cut at the first eos; sampling is seeded per row id so a resumed run reproduces every row."""
    from transformers import GenerationConfig, LogitsProcessorList

    eos = tok.eos_token_id
    enc = tok([t for _, t in batch], return_tensors="pt", padding=True, add_special_tokens=True)
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=cfg.max_new_tokens,
                               pad_token_id=tok.pad_token_id, eos_token_id=eos, bos_token_id=tok.bos_token_id)
    procs = LogitsProcessorList()
    if cfg.temperature > 0:
        procs.append(_RowwiseSampler([_row_seed(cfg.seed, rid) for rid, _ in batch],
                                     float(cfg.temperature), cfg.top_k, float(cfg.top_p)))
    with torch.no_grad():
        seqs = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                              generation_config=gen_cfg, logits_processor=procs)
    new = seqs[:, enc["input_ids"].shape[1]:].cpu()  # [B, ≤ max_new_tokens]
    lines = []
    for (rid, prompt), ids in zip(batch, new.tolist()):
        finish = "length"
        if eos is not None and eos in ids:
            ids = ids[:ids.index(eos)]
            finish = "stop"
        completion = tok.decode(ids, skip_special_tokens=True)
        lines.append(json.dumps({"id": rid, "prompt": prompt, "completion": completion,
                                 "text": prompt + completion, "finish_reason": finish,
                                 "completion_tokens": len(ids), "settings": settings_hash}, ensure_ascii=False))
    return lines


def generate(teacher, prompts, out: str, *, tokenizer=None, config: Optional[GenerateConfig] = None, **overrides) -> dict:
    """Append teacher completions for every prompt not yet in ``out``; returns a summary dict."""
    cfg = config or GenerateConfig()
    unknown = sorted(set(overrides) - {f.name for f in fields(GenerateConfig)})
    if unknown:
        raise ValueError(f"generate got unknown option(s) {unknown}; valid: {[f.name for f in fields(GenerateConfig)]}")
    cfg = replace(cfg, **overrides).validate()
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError("out must be an output .jsonl path")
    out = os.fspath(out)
    if os.path.isdir(out):
        raise ValueError(f"out: {out!r} is a directory; pass a .jsonl file path")

    rows = _prompt_rows(prompts, cfg)
    if not isinstance(teacher, torch.nn.Module):
        _models.check_model_dir(teacher, "teacher")
    settings = dict(cfg.sampling(), teacher=_fingerprint(teacher))
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    done, dropped = _done_ids(out, rows, settings_hash)
    todo = [(rid, text) for rid, text in rows if rid not in done]
    if cfg.limit is not None:
        todo = todo[:cfg.limit]
    summary = {"out": out, "total": len(rows), "already_present": len(done), "written": 0,
               "dropped_partial_bytes": dropped, "settings": settings, "settings_hash": settings_hash}
    if not todo:
        summary["remaining"] = len(rows) - len(done)
        return summary

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = _models.resolve_dtype(cfg.dtype, device)
    tok = _generation_tokenizer(tokenizer, teacher)
    model = _models.load_causal_lm(teacher, "teacher", dtype=dtype, device=device)

    from tqdm.auto import tqdm

    old_side = tok.padding_side
    tok.padding_side = "left"  # decoder-only generation continues from the right end of every row
    bar = tqdm(total=len(todo), desc="generate", unit="row", disable=not cfg.progress, dynamic_ncols=True)
    started = time.time()
    try:
        for b0 in range(0, len(todo), cfg.batch_size):
            batch = todo[b0:b0 + cfg.batch_size]
            lines = _generate_batch(model, tok, batch, cfg, device, settings_hash)
            append_lines_durably(out, lines)  # one write + fsync per batch: a kill loses at most this batch
            summary["written"] += len(batch)
            bar.update(len(batch))
    finally:
        tok.padding_side = old_side
        bar.close()
    summary["remaining"] = len(rows) - len(done) - summary["written"]
    summary["seconds"] = time.time() - started
    return summary
