"""``de.evaluate``: compare a student (and optionally a baseline student) with its teacher on held-out
text, slice by slice, and flag the silent failures of distillation.

Per slice and overall, for each student: teacher and student perplexity, the student/teacher perplexity
ratio, exact forward KL(teacher‖student) per token over the full vocabulary, top-1 and top-5 agreement,
and — through the engine's own ops — the top-k + tail-bucket KL that a top-k distillation run optimizes.
Nothing of size [tokens, vocabulary] is formed (see :mod:`distill_engine.eval.metrics`).

Flags, in words:

* **coverage warning** — a slice outside the distillation slices where the student's gap to the teacher
  (KL per token) exceeds ``coverage_factor`` × its gap on the distillation slices: the student copied the
  teacher where it was shown the teacher, not elsewhere.
* **suspicious** — a slice where the student's perplexity is below the teacher's (by more than
  ``suspicious_margin``, 1% by default, so noise-level ties stay quiet): leakage of evaluation text into the
  student's training data, or a weak teacher there.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from . import data as _data
from . import models as _models
from .metrics import engine_ops_available, objective_kl, token_metrics

STUDENT_ROLES = ("student", "baseline")


@dataclass(frozen=True)
class EvalConfig:
    """Options of :func:`evaluate`; each is validated with an error naming it."""

    text_column: str = "text"
    slice_column: Optional[str] = "auto"       # "auto": use a `slice` column when present; None: one slice
    distill_slices: Optional[Sequence[str]] = None  # slices the student was distilled on (needed for coverage)
    coverage_factor: float = 2.0               # warn when a slice's KL > factor × the distillation slices' KL
    coverage_min_gap: float = 0.02             # ... and exceeds this many nats/token (ignores noise-level gaps)
    suspicious_margin: float = 0.01            # suspicious when student ppl < teacher ppl × (1 − margin)
    max_length: int = 256                      # predicted tokens per window
    batch_size: int = 8
    max_tokens_per_slice: Optional[int] = None
    objective_k: int = 64                      # k of the top-k bucket KL through the engine's ops; 0 = skip
    chunk_rows: Optional[int] = None
    vocab_tile: Optional[int] = None
    device: str = "auto"                       # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"                        # "auto" (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    backend: str = "auto"                      # backend of the engine ops
    progress: bool = True
    on_policy_samples: int = 0                 # prompts per slice for the on-policy metric (0 = skip)
    on_policy_prompt_tokens: int = 16          # ... each the first tokens of a held-out window
    on_policy_max_new_tokens: int = 32         # ... continued by each student (temperature 1, top-p 1)

    def validate(self) -> "EvalConfig":
        def bad(key, want, got):
            raise ValueError(f"eval config: {key} must be {want}, got {got!r}")

        if not isinstance(self.text_column, str) or not self.text_column:
            bad("text_column", "a non-empty column name", self.text_column)
        if self.slice_column is not None and (not isinstance(self.slice_column, str) or not self.slice_column):
            bad("slice_column", "a column name, 'auto' or None", self.slice_column)
        if self.distill_slices is not None:
            if isinstance(self.distill_slices, str) or not all(isinstance(s, str) and s for s in self.distill_slices):
                bad("distill_slices", "a list of slice names", self.distill_slices)
        if not isinstance(self.coverage_factor, (int, float)) or not self.coverage_factor >= 1.0 or math.isinf(self.coverage_factor):
            bad("coverage_factor", "a finite number ≥ 1", self.coverage_factor)
        if not isinstance(self.coverage_min_gap, (int, float)) or not self.coverage_min_gap >= 0:
            bad("coverage_min_gap", "a number ≥ 0", self.coverage_min_gap)
        if not isinstance(self.suspicious_margin, (int, float)) or not 0 <= self.suspicious_margin < 1:
            bad("suspicious_margin", "a number in [0, 1)", self.suspicious_margin)
        for key in ("max_length", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, "an int ≥ 1", v)
        if self.max_tokens_per_slice is not None and (not isinstance(self.max_tokens_per_slice, int) or self.max_tokens_per_slice < 1):
            bad("max_tokens_per_slice", "an int ≥ 1 or None", self.max_tokens_per_slice)
        if not isinstance(self.on_policy_samples, int) or isinstance(self.on_policy_samples, bool) or self.on_policy_samples < 0:
            bad("on_policy_samples", "an int ≥ 0 (0 skips the on-policy metric)", self.on_policy_samples)
        for key in ("on_policy_prompt_tokens", "on_policy_max_new_tokens"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, "an int ≥ 1", v)
        if not isinstance(self.objective_k, int) or self.objective_k < 0:
            bad("objective_k", "an int ≥ 0 (0 skips the top-k objective KL)", self.objective_k)
        for key in ("chunk_rows", "vocab_tile"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(key, "an int ≥ 1 or None", v)
        if self.backend not in ("auto", "triton", "cpu", "torch"):
            bad("backend", "one of auto, triton, cpu, torch", self.backend)
        return self


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"eval config: device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("eval config: device='cuda' but CUDA is not available; use device='cpu'")
    return dev


class _Sums:
    """Per-slice float64 sums for one student."""

    KEYS = ("s_nll", "kl", "top1", "top5", "kl_obj")

    def __init__(self, n_slices: int):
        self.v = {k: torch.zeros(n_slices, dtype=torch.float64) for k in self.KEYS}

    def add(self, sid: torch.Tensor, key: str, values: torch.Tensor) -> None:
        self.v[key].index_add_(0, sid, values.to(torch.float64).cpu())


def _ppl(nll_sum: float, n: float) -> Optional[float]:
    # exp capped so a hopeless model still gives a finite (JSON-safe) number
    return float(math.exp(min(nll_sum / n, 700.0))) if n else None


def _summarize(tokens: float, t_nll: float, sums: Mapping[str, float], has_obj: bool) -> dict:
    if not tokens:
        return {}
    ppl_t, ppl_s = _ppl(t_nll, tokens), _ppl(sums["s_nll"], tokens)
    return {
        "ppl": ppl_s,
        "ppl_ratio": ppl_s / ppl_t,
        "kl": sums["kl"] / tokens,
        "top1": sums["top1"] / tokens,
        "top5": sums["top5"] / tokens,
        "kl_topk_bucket": (sums["kl_obj"] / tokens) if has_obj else None,
    }


def evaluate(
    teacher,
    student,
    data,
    *,
    baseline=None,
    tokenizer=None,
    out_dir: Optional[str] = None,
    metrics: Union[None, str, Mapping[str, str]] = None,
    config: Optional[EvalConfig] = None,
    **overrides,
) -> dict:
    """Evaluate ``student`` (and ``baseline``) against ``teacher`` on held-out ``data``.

    teacher, student, baseline: Hugging Face model directories (checked: a path without a model raises)
      or already-built causal-LM modules. They must share one vocabulary.
    data: a .jsonl/.json/.txt/.parquet file, or a list of dict records, with a text column and
      optionally a slice column.
    tokenizer: a tokenizer object or directory; default: the student's directory, else the teacher's.
    out_dir: when given, writes report.json, report.md and PNG plots there (atomically).
    metrics: the trainer's metrics JSONL (or {label: path}) for the training-curve plot.
    config / overrides: :class:`EvalConfig` fields.
    Returns the report as a dict (the content of report.json).
    """
    cfg = config or EvalConfig()
    unknown = sorted(set(overrides) - {f.name for f in fields(EvalConfig)})
    if unknown:
        raise ValueError(f"evaluate got unknown option(s) {unknown}; valid: {[f.name for f in fields(EvalConfig)]}")
    cfg = replace(cfg, **overrides).validate()
    device = _resolve_device(cfg.device)
    dtype = _models.resolve_dtype(cfg.dtype, device)
    started = time.time()

    if student is None:
        raise ValueError("student is required: a model directory or a causal-LM module")
    # Cheap checks first: data and paths fail before any model is loaded.
    _check_outputs(out_dir, metrics)
    groups, distill = _read_slices(data, cfg)
    for role, m in (("teacher", teacher), ("student", student), ("baseline", baseline)):
        if m is not None and not isinstance(m, torch.nn.Module):
            _models.check_model_dir(m, role)

    tok = _resolve_tokenizer(tokenizer, student, teacher)
    t_model, students = _load_models(teacher, student, baseline, dtype=dtype, device=device)
    v = _models.vocab_size(t_model)
    if len(tok) > v:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the models' vocabulary has {v}; pass the models' own tokenizer")

    names, windows = _data.make_windows(groups, tok, max_length=cfg.max_length, max_tokens_per_slice=cfg.max_tokens_per_slice)
    if not windows:
        raise ValueError("data: no document has two or more tokens; nothing to evaluate")
    use_obj = cfg.objective_k > 0 and engine_ops_available()
    obj_k = min(cfg.objective_k, v)
    tokens, t_nll, sums = _accumulate(windows, len(names), t_model, students, tok, cfg, device,
                                      obj_k if use_obj else 0)
    onpol = None
    if cfg.on_policy_samples > 0:  # the teacher's NLL of each student's own continuations, per slice
        from .onpolicy import on_policy_metrics

        onpol = on_policy_metrics(windows, len(names), t_model, students, tok, samples=cfg.on_policy_samples,
                                  prompt_tokens=cfg.on_policy_prompt_tokens,
                                  max_new_tokens=cfg.on_policy_max_new_tokens, batch_size=cfg.batch_size,
                                  device=device, backend=cfg.backend)

    report = _build_report(
        cfg, names, tokens, t_nll, sums, use_obj, obj_k, distill,
        sources={"teacher": _models.model_source(teacher), "student": _models.model_source(student),
                 "baseline": None if baseline is None else _models.model_source(baseline),
                 "data": os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<records>"},
        seconds=time.time() - started,
    )
    if onpol is not None:
        _add_on_policy(report, onpol)
    if out_dir is not None:
        from .report import write_report

        write_report(report, out_dir, metrics=metrics)
    return report


def _read_slices(data, cfg: EvalConfig):
    """(texts per slice, the distillation slices or None) of ``data``, checked before any model loads."""
    records = data if isinstance(data, list) else _data.read_records(data, "data")
    if isinstance(data, list) and not data:
        raise ValueError("data: the record list is empty")
    groups = _data.slice_texts(records, text_column=cfg.text_column, slice_column=cfg.slice_column)
    distill = list(cfg.distill_slices) if cfg.distill_slices is not None else None
    if distill is not None:
        missing = [s for s in distill if s not in groups]
        if missing:
            raise ValueError(f"distill_slices {missing} are not slices of the data (slices: {list(groups)})")
    return groups, distill


def _load_models(teacher, student, baseline, *, dtype, device):
    """The frozen teacher and {role: student} (student, optional baseline), each checked to share its vocabulary."""
    t_model = _models.load_causal_lm(teacher, "teacher", dtype=dtype, device=device)
    students: Dict[str, torch.nn.Module] = {}
    for role, m in (("student", student), ("baseline", baseline)):
        if m is None:
            continue
        sm = _models.load_causal_lm(m, role, dtype=dtype, device=device)
        _models.check_same_vocab(
            t_model, sm, role,
            teacher_tok_dir=None if isinstance(teacher, torch.nn.Module) else os.fspath(teacher),
            student_tok_dir=None if isinstance(m, torch.nn.Module) else os.fspath(m),
        )
        students[role] = sm
    return t_model, students


@torch.no_grad()
def _accumulate(windows, n_slices: int, t_model, students, tok, cfg: EvalConfig, device, obj_k: int):
    """Per-slice float64 sums over every window: (tokens [S], teacher NLL [S], {role: _Sums}).
    ``obj_k`` > 0 adds the top-k objective KL through the engine's ops (0: skipped)."""
    from ..trainer.families import check_logits_path, logit_transform  # issue 12: each family's transform

    tokens = torch.zeros(n_slices, dtype=torch.float64)
    t_nll = torch.zeros(n_slices, dtype=torch.float64)
    sums = {role: _Sums(n_slices) for role in students}
    teacher = (t_model, *_models.lm_head(t_model), logit_transform(t_model.config, "teacher"))
    heads = {role: (sm, *_models.lm_head(sm), logit_transform(sm.config, role)) for role, sm in students.items()}
    guarded = False
    progress = _progress(total=sum(len(w.ids) - 1 for w in windows), enabled=cfg.progress)
    for inp, mask, lab, sid in _data.batches(windows, cfg.batch_size, tok.pad_token_id):
        inp, mask, lab = inp.to(device), mask.to(device), lab.to(device)
        valid = lab.ne(-100)                                    # [B, L]
        rows_sid = sid.to(device)[:, None].expand_as(lab)[valid].cpu()  # [N]
        if not guarded:  # first batch: the hidden-state path must reproduce each model's own logits
            for role, mm in (("teacher", t_model), *students.items()):
                check_logits_path(mm, inp, mask, key=role)
            guarded = True
        n = int(valid.sum())
        tokens.index_add_(0, rows_sid, torch.ones(n, dtype=torch.float64))
        t_nll.index_add_(0, rows_sid, _batch_metrics(inp, mask, valid, lab[valid], teacher, heads, sums, rows_sid,
                                                     cfg, obj_k))
        progress.update(n)
    progress.close()
    return tokens, t_nll, sums


def _batch_metrics(inp, mask, valid, y, teacher, heads, sums, rows_sid, cfg: EvalConfig, obj_k: int):
    """Add one batch's per-token metrics of every student (``heads``: role → (model, W, b, transform)) to
    ``sums``; returns the teacher's NLL per token [N] (the same for every student: taken once)."""
    t_model, tw, tb, t_tr = teacher
    h_t = _models.final_hidden(t_model, inp, mask)[valid]   # [N, d_t]
    targets = None
    if obj_k:  # the teacher's top-k once per batch, shared by every student
        from ..ops.teacher_targets import teacher_targets

        targets = teacher_targets(h_t, tw, obj_k, bias=tb, backend=cfg.backend, logit_scale=t_tr[0], softcap=t_tr[1])
    t_nll = torch.zeros(len(y), dtype=torch.float64)
    for i, (role, (sm, sw, sb, s_tr)) in enumerate(heads.items()):
        h_s = _models.final_hidden(sm, inp, mask)[valid]    # [N, d_s]
        m = token_metrics(h_t, tw, h_s, sw, y, teacher_bias=tb, student_bias=sb, chunk_rows=cfg.chunk_rows,
                          vocab_tile=cfg.vocab_tile, teacher_transform=t_tr, student_transform=s_tr)
        if i == 0:
            t_nll = m.teacher_nll.cpu()
        s = sums[role]
        s.add(rows_sid, "s_nll", m.student_nll)
        s.add(rows_sid, "kl", m.kl)
        s.add(rows_sid, "top1", m.top1)
        s.add(rows_sid, "top5", m.topk)
        if obj_k:
            s.add(rows_sid, "kl_obj", objective_kl(h_t, tw, h_s, sw, k=obj_k, teacher_bias=tb, student_bias=sb,
                                                   backend=cfg.backend, targets=targets, student_transform=s_tr))
    return t_nll


def _add_on_policy(report: dict, onpol: dict) -> None:
    """report["slices"][i][role]["on_policy"] and report["overall"][role]["on_policy"] (token-weighted)."""
    for i, r in enumerate(report["slices"]):
        for role, per in onpol.items():
            if r.get(role) and per[i] is not None:
                r[role]["on_policy"] = per[i]
    for role, per in onpol.items():
        got = [p for p in per if p is not None]
        n = sum(p["tokens"] for p in got)
        if report["overall"].get(role) and n:
            report["overall"][role]["on_policy"] = {
                "tokens": n, "prompts": sum(p["prompts"] for p in got),
                "teacher_nll": sum(p["teacher_nll"] * p["tokens"] for p in got) / n,
                "student_nll": sum(p["student_nll"] * p["tokens"] for p in got) / n}


def _resolve_tokenizer(tokenizer, student, teacher):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        tok = tokenizer
    else:
        tok_dir = tokenizer
        if tok_dir is None:
            for cand in (student, teacher):
                if isinstance(cand, (str, os.PathLike)) and _models.has_tokenizer(os.fspath(cand)):
                    tok_dir = cand
                    break
        if tok_dir is None:
            raise ValueError("no tokenizer: neither the student's nor the teacher's directory holds one; pass tokenizer=")
        return _models.load_tokenizer(tok_dir)
    if getattr(tok, "pad_token_id", None) is None:
        if getattr(tok, "eos_token", None) is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="tok", disable=not enabled, dynamic_ncols=True)


def _build_report(cfg, names, tokens, t_nll, sums, use_obj, obj_k, distill, sources, seconds) -> dict:
    roles = list(sums)

    def row(mask: torch.Tensor) -> dict:
        n = float(tokens[mask].sum())
        tn = float(t_nll[mask].sum())
        r = {"tokens": int(n), "teacher": {"ppl": _ppl(tn, n)}}
        for role in roles:
            r[role] = _summarize(n, tn, {k: float(v[mask].sum()) for k, v in sums[role].v.items()}, use_obj)
        return r

    slices = []
    for i, name in enumerate(names):
        mask = torch.zeros(len(names), dtype=torch.bool)
        mask[i] = True
        r = {"name": name, "role": "unknown" if distill is None else ("distill" if name in distill else "held_out")}
        r.update(row(mask))
        slices.append(r)
    overall = row(torch.ones(len(names), dtype=torch.bool))

    reference = {}
    if distill:
        dmask = torch.tensor([n in distill for n in names])
        ref = row(dmask)
        reference = {role: ref[role]["kl"] for role in roles if ref[role]}
    flags: List[dict] = []
    notes: List[str] = []
    if cfg.objective_k > 0 and not use_obj:
        notes.append("The top-k objective KL was skipped: this build exports no de.teacher_targets / de.fused_distill_loss.")
    if distill is None:
        notes.append("No distillation slices were given (distill_slices / --distill-slices), so coverage "
                     "warnings cannot be computed: they compare each slice with the slices the student was distilled on.")
    elif len(distill) == len(names):
        notes.append("Every evaluated slice is a distillation slice: there is no slice left out of distillation to check coverage on.")
    for r in slices:
        r["flags"] = []
        for role in roles:
            m = r[role]
            if not m:
                continue
            if distill is not None and r["role"] == "held_out" and role in reference:
                ref = reference[role]
                threshold = max(cfg.coverage_factor * ref, cfg.coverage_min_gap)
                if m["kl"] > threshold:
                    ratio = m["kl"] / ref if ref > 0 else float("inf")
                    msg = (f"coverage warning — slice '{r['name']}': the {role}'s KL to the teacher is "
                           f"{m['kl']:.3f} nats/token, {ratio:.1f}× its {ref:.3f} on the distillation slices "
                           f"(threshold {cfg.coverage_factor:g}×). The {role} copied the teacher where it was shown "
                           f"the teacher's outputs, not here; add text like this slice to the distillation data "
                           f"before trusting the {role} on it.")
                    flags.append({"kind": "coverage_warning", "slice": r["name"], "model": role, "message": msg})
                    r["flags"].append("coverage warning" + ("" if role == "student" else f" ({role})"))
            if m["ppl"] < r["teacher"]["ppl"] * (1.0 - cfg.suspicious_margin):
                msg = (f"suspicious — slice '{r['name']}': the {role}'s perplexity {m['ppl']:.2f} is below the "
                       f"teacher's {r['teacher']['ppl']:.2f}. A student rarely beats its teacher on held-out text: "
                       f"check that this slice's evaluation text did not leak into the {role}'s training data, "
                       f"and whether the teacher is weak on this slice.")
                flags.append({"kind": "suspicious", "slice": r["name"], "model": role, "message": msg})
                r["flags"].append("suspicious" + ("" if role == "student" else f" ({role})"))

    findings = {}
    if "baseline" in roles and distill:
        d = [r for r in slices if r["role"] == "distill" and r["student"] and r["baseline"]]
        toks = sum(r["tokens"] for r in d)
        if toks:
            kl_s = sum(r["student"]["kl"] * r["tokens"] for r in d) / toks
            kl_b = sum(r["baseline"]["kl"] * r["tokens"] for r in d) / toks
            findings["distill_slices_kl"] = {"student": kl_s, "baseline": kl_b}
            findings["student_closer_than_baseline_on_distill_slices"] = kl_s < kl_b
    findings["coverage_warnings"] = sorted({f["slice"] for f in flags if f["kind"] == "coverage_warning" and f["model"] == "student"})
    findings["suspicious"] = sorted({f["slice"] for f in flags if f["kind"] == "suspicious" and f["model"] == "student"})

    cfg_dict = asdict(cfg)
    if cfg_dict.get("distill_slices") is not None:
        cfg_dict["distill_slices"] = list(cfg_dict["distill_slices"])
    return {
        "format": "distill_engine.eval/1",
        "sources": sources,
        "models": roles,
        "config": cfg_dict,
        "objective_k": obj_k if use_obj else None,
        "distill_slices": distill,
        "coverage_reference_kl": reference,
        "slices": slices,
        "overall": overall,
        "flags": flags,
        "notes": notes,
        "findings": findings,
        "seconds": seconds,
    }


def _check_outputs(out_dir, metrics) -> None:
    """The report directory must be creatable/writable and every metrics file must exist — checked before any
    model is loaded or metric computed, so a typo costs seconds, not an evaluation."""
    if out_dir is not None:
        from ..trainer.guards import check_output_dir

        check_output_dir(os.fspath(out_dir), "out_dir (--out)")
    if metrics is not None:
        items = {"student": metrics}.items() if isinstance(metrics, (str, os.PathLike)) else dict(metrics).items()
        for label, path in items:
            if not os.path.isfile(os.fspath(path)):
                raise ValueError(f"metrics (--metrics) {label}={os.fspath(path)!r} does not exist; pass the trainer's "
                                 f"output_dir/metrics.jsonl")
