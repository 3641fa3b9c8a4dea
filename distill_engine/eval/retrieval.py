"""Retrieval evaluation of embedding behaviour (issue 16): ``distill-engine eval --retrieval PAIRS.jsonl``.

PAIRS.jsonl holds one {"query": ..., "positive": ...} object per line (column names selectable). Every
model (teacher, student, optional baseline) embeds the queries and the positives with the same pooling of
its final hidden states; query i ranks all positives by cosine similarity, and the report gives
recall@1, recall@10 and the mean reciprocal rank of its own positive, plus — for the students — the mean
absolute difference between the model's [N, N] query–positive similarity matrix and the teacher's.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from . import models as _models
from .data import jsonl_objects

__all__ = ["load_pairs", "evaluate_retrieval", "retrieval_markdown", "plot_retrieval", "attach_retrieval"]


def load_pairs(path: str, query_column: str = "query", positive_column: str = "positive") -> Tuple[List[str], List[str]]:
    """(queries, positives) from a JSONL file; a malformed line raises one ValueError naming file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"--retrieval: no such file {path!r}; give a JSONL file of "
                         f"{{\"{query_column}\": ..., \"{positive_column}\": ...}} rows")
    qs, ps = [], []
    with open(path, encoding="utf-8") as f:
        for no, row in jsonl_objects(f, lambda n: f"--retrieval: {path}:{n}"):
            q, p = row.get(query_column), row.get(positive_column)
            if not isinstance(q, str) or not isinstance(p, str) or not q or not p:
                raise ValueError(f"--retrieval: {path}:{no} needs non-empty string fields {query_column!r} and "
                                 f"{positive_column!r} (set --query-column / --positive-column)")
            qs.append(q)
            ps.append(p)
    if len(qs) < 2:
        raise ValueError(f"--retrieval: {path} has {len(qs)} pair(s); retrieval needs at least 2")
    return qs, ps


@torch.no_grad()
def _embed(model, tok, texts: List[str], *, pooling: str, max_length: int, batch_size: int, device) -> torch.Tensor:
    from ..ops.relation import pool_hidden

    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        ids = enc["input_ids"].to(device)
        am = enc["attention_mask"].to(device)
        h = _models.final_hidden(model, ids, am)  # [b, L, d]
        out.append(pool_hidden(h.float(), am, pooling=pooling).cpu())
    return torch.cat(out)  # [N, d]


def _similarity(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    qn = torch.nn.functional.normalize(q.double(), dim=1)
    pn = torch.nn.functional.normalize(p.double(), dim=1)
    return qn @ pn.t()  # [N, N]


def _scores(sim: torch.Tensor) -> Dict[str, float]:
    n = sim.shape[0]
    pos = sim.diagonal()[:, None]
    rank = (sim > pos).sum(1) + 1  # 1 = the positive is the best match (ties resolved in its favour)
    return {"recall@1": float((rank <= 1).double().mean()), "recall@10": float((rank <= min(10, n)).double().mean()),
            "mrr": float((1.0 / rank.double()).mean())}


def evaluate_retrieval(teacher, student, pairs: str, *, baseline=None, others=None, tokenizer=None, pooling: str = "mean",
                       query_column: str = "query", positive_column: str = "positive", max_length: int = 256,
                       batch_size: int = 16, device: str = "auto", dtype: str = "auto") -> dict:
    """Retrieval metrics of every model on ``pairs``; returns the ``retrieval`` section of report.json.

    ``others``: optional {role: model} evaluated beside the student and baseline (e.g. a second student).
    """
    from ..ops.relation import POOLINGS
    from .evaluate import _resolve_device, _resolve_tokenizer

    if pooling not in POOLINGS:
        raise ValueError(f"--retrieval-pooling must be one of {POOLINGS}, got {pooling!r}")
    qs, ps = load_pairs(pairs, query_column, positive_column)
    dev = _resolve_device(device)
    dt = _models.resolve_dtype(dtype, dev)
    tok = _resolve_tokenizer(tokenizer, student, teacher)
    roles = [("teacher", teacher), ("student", student)] + ([("baseline", baseline)] if baseline is not None else [])
    roles += list((others or {}).items())
    sims, rows = {}, {}
    for role, m in roles:
        model = _models.load_causal_lm(m, role, dtype=dt, device=dev)
        kw = dict(pooling=pooling, max_length=max_length, batch_size=batch_size, device=dev)
        sims[role] = _similarity(_embed(model, tok, qs, **kw), _embed(model, tok, ps, **kw))
        rows[role] = dict(_scores(sims[role]), source=_models.model_source(m))
        del model
    for role in rows:
        if role != "teacher":
            rows[role]["mean_abs_sim_diff_vs_teacher"] = float((sims[role] - sims["teacher"]).abs().mean())
    return {"pairs": os.fspath(pairs), "n_pairs": len(qs), "pooling": pooling, "models": rows}


def retrieval_markdown(r: dict) -> str:
    lines = [f"## Retrieval ({r['n_pairs']} query → positive pairs, {r['pooling']} pooling, cosine)", "",
             "| model | recall@1 | recall@10 | MRR | mean abs sim diff vs teacher |", "|---|---:|---:|---:|---:|"]
    for role, m in r["models"].items():
        diff = m.get("mean_abs_sim_diff_vs_teacher")
        lines.append(f"| {role} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} | "
                     f"{'—' if diff is None else f'{diff:.4f}'} |")
    return "\n".join(lines) + "\n"


def plot_retrieval(r: dict, out_dir: str) -> Optional[str]:
    """retrieval.png: recall@1, recall@10 and MRR per model, grouped bars."""
    try:
        from .report import _plt, _savefig

        plt = _plt()
    except Exception:  # matplotlib missing: the tables still carry every number
        return None
    roles = list(r["models"])
    keys = ["recall@1", "recall@10", "mrr"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    w = 0.8 / len(roles)
    for i, role in enumerate(roles):
        ax.bar([k + i * w for k in range(len(keys))], [r["models"][role][k] for k in keys], w, label=role)
    ax.set_xticks([k + w * (len(roles) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels(keys)
    ax.set_ylim(0, 1)
    ax.set_title(f"retrieval, {r['n_pairs']} pairs")
    ax.legend()
    path = os.path.join(out_dir, "retrieval.png")
    _savefig(fig, path)
    plt.close(fig)
    return path


def attach_retrieval(r: dict, out_dir: Optional[str], report: Optional[dict] = None) -> dict:
    """Adds the section to ``report`` (or a new one); rewrites report.json and report.md in ``out_dir``."""
    from ._io import atomic_write_text

    report = dict(report or {})
    report["retrieval"] = r
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2, default=str))
        md_path = os.path.join(out_dir, "report.md")
        md = open(md_path, encoding="utf-8").read() if os.path.isfile(md_path) else "# Evaluation report\n\n"
        png = plot_retrieval(r, out_dir)
        md = md.rstrip("\n") + "\n\n" + retrieval_markdown(r) + ("\n![retrieval](retrieval.png)\n" if png else "")
        atomic_write_text(md_path, md)
    return report
