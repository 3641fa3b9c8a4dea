"""The embedded end-to-end demo (``distill-engine demo`` / ``make demo``): the whole job on text every
Python installation ships, in minutes on two CPU cores, with nothing downloaded.

1. Corpus: the standard library's own source (:mod:`distill_engine.data.stdlib_corpus`), in slices —
   ``code``, ``docs_comments`` (docstrings and comments as prose) and a few held-out packages — each split
   into train and held-out files.
2. A byte-level BPE tokenizer (vocabulary 8,192) trained on the training files.
3. A small Llama-style teacher trained on every slice with the engine's trainer (``teacher: none``).
   Cached under ``<out>/cache/teacher-<hash>``; the hash covers the corpus, the tokenizer and every setting
   that shapes the teacher, so a second run skips it and a changed setting retrains it.
4. A half-width, half-depth student distilled through the engine on the ``code`` slice only (co-located
   teacher, top-k targets, the fused loss, DeepSpeed on CPU), and a baseline student of the same size
   and initialization trained on hard labels (``teacher: none``) for the same steps and tokens.
5. Evaluation on held-out text of every slice; the report must show (a) the distilled student closer to
   the teacher than the baseline on the distillation slice, and (b) a coverage warning on slices left out
   of distillation — the silent failure the report exists to catch.
6. Relation distillation (issue 16): a third student, same budget, distilled with the response loss plus
   ``loss.relation`` (similarity relations of mean-pooled final states), and a retrieval slice: docstring →
   code pairs of held-out functions (:mod:`distill_engine.data.retrieval_pairs`: only files no slice trains
   on) on which teacher, the three students' recall@1/@10 and MRR are compared (reported, not an exit
   condition: a tiny LM's embeddings are weak retrievers).
7. On-policy vs off-policy (issue 13), per seed of ``on_policy_seeds``: the seed's off-policy distilled student
   (stage 4's for seed 0; the same recipe from another initialization and data order for the others) is continued
   twice from the same weights at the same budget of trained student tokens — off-policy on the fixed text, and
   on-policy (GKD: on its own continuations of the text's first tokens, scored by the teacher) — and both are
   evaluated on the on-policy metric (the teacher's NLL of each student's own continuations of held-out prompts)
   and held-out KL. GKD continues a student already trained on the task, as the paper and the on-policy recipes do:
   a student distilled from scratch spends its on-policy steps on near-random continuations (measured: it loses).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

DEMO_FORMAT = 1  # bump to invalidate every cached teacher when the demo's recipe changes


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def llama_init(self, vocab_size: int, seq_len: int, tok) -> dict:
        return {
            "vocab_size": vocab_size, "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads, "max_position_embeddings": max(256, seq_len),
            "tie_word_embeddings": False, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }


@dataclass(frozen=True)
class DemoPreset:
    vocab_size: int = 8192
    seq_len: int = 128
    teacher: ModelShape = ModelShape(hidden=128, layers=4, heads=4, intermediate=256)
    student: ModelShape = ModelShape(hidden=64, layers=2, heads=2, intermediate=128)
    teacher_steps: int = 350
    teacher_batch: int = 8
    teacher_lr: float = 5e-3
    student_steps: int = 150
    student_batch: int = 8
    student_lr: float = 3e-3
    top_k: int = 256
    distill_slices: Tuple[str, ...] = ("code",)
    held_out_packages: Tuple[str, ...] = ("email", "json", "xml")
    # training characters kept per slice (documents in a seeded order); the held-out packages stay whole
    max_chars: Tuple[Tuple[str, int], ...] = (("code", 1_200_000), ("docs_comments", 600_000))
    eval_tokens_per_slice: int = 2048
    coverage_factor: float = 2.0
    zero_stage: int = 2
    seed: int = 0
    # relation-distilled student (issue 16): response loss + loss.relation, the student's budget
    relation_kind: str = "similarity"
    relation_weight: float = 1.0
    relation_temperature: float = 0.1
    retrieval_pairs: int = 200
    # on-policy vs off-policy (issue 13): seeds of the pairs; both continue the seed's distilled student for
    # continue_steps off-policy steps' worth of trained tokens (the on-policy one: as many steps as that takes)
    on_policy_seeds: Tuple[int, ...] = (0, 1, 2)
    continue_steps: int = 50
    continue_lr: float = 1e-3
    on_policy_fraction: float = 1.0  # λ
    on_policy_objective: str = "divergence"  # GKD: on_policy_divergence on the generated tokens
    # reverse KL on the student's own samples (mode-seeking), the GKD paper's on-policy choice; forward KL there
    # raised the student's sampling entropy (and so the teacher's NLL of its samples) on every seed
    on_policy_divergence: str = "reverse_kl"
    on_policy_prompt: int = 32
    on_policy_new: int = 64
    on_policy_eval_samples: int = 32  # held-out prompts per slice for the on-policy metric
    on_policy_eval_tokens: int = 4096  # held-out tokens per slice read for the comparison (the prompts' windows)


PRESETS = {
    "default": DemoPreset(),
    # seconds-long plumbing check: tiny models, a few steps (the effects are not expected to show)
    "smoke": DemoPreset(vocab_size=512, seq_len=32, teacher=ModelShape(32, 2, 4, 64), student=ModelShape(16, 1, 2, 32),
                        teacher_steps=4, teacher_batch=4, student_steps=4, student_batch=4, top_k=8,
                        max_chars=(("code", 60_000), ("docs_comments", 30_000), ("email", 20_000), ("json", 20_000),
                                   ("xml", 20_000)),
                        eval_tokens_per_slice=96, zero_stage=0, retrieval_pairs=24, on_policy_seeds=(0, 1),
                        continue_steps=2, on_policy_prompt=8, on_policy_new=8, on_policy_eval_samples=2,
                        on_policy_eval_tokens=96),
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _Stages:
    def __init__(self, total: int):
        self.total = total
        self.i = 0
        self.times: List[Tuple[str, float]] = []
        self.t0 = time.time()
        self.c0 = time.process_time()

    def start(self, title: str) -> None:
        self.i += 1
        self.title = title
        self.ts = time.time()
        self.cs = time.process_time()
        print(f"\n[{self.i}/{self.total}] {title}", flush=True)

    def done(self, note: str = "") -> None:
        dt = time.time() - self.ts
        self.times.append((self.title, dt))
        # CPU seconds beside wall seconds: on a shared machine the wall clock says little about the work
        cpu = time.process_time() - self.cs
        print(f"      done in {dt:.1f}s (CPU {cpu:.1f}s){(' — ' + note) if note else ''}", flush=True)


def _prepare_corpus(preset: DemoPreset, out_dir: str) -> Tuple[dict, str]:
    from ..data.stdlib_corpus import CorpusConfig, build_corpus, corpus_fingerprint, write_jsonl

    cfg = CorpusConfig(held_out_packages=preset.held_out_packages, seed=preset.seed, max_chars=dict(preset.max_chars))
    docs = build_corpus(cfg)
    fp = corpus_fingerprint(docs)
    cdir = os.path.join(out_dir, "cache", f"corpus-{fp}")
    files = {"all_train": os.path.join(cdir, "train_all_slices.jsonl"),
             "distill_train": os.path.join(cdir, "train_distill_slices.jsonl"),
             "heldout": os.path.join(cdir, "heldout.jsonl"),
             "retrieval": os.path.join(cdir, f"retrieval_pairs_{preset.retrieval_pairs}.jsonl")}
    stats: Dict[str, Dict[str, int]] = {}
    for d in docs:
        s = stats.setdefault(d.slice, {"train_files": 0, "train_chars": 0, "eval_files": 0, "eval_chars": 0})
        s[f"{d.split}_files"] += 1
        s[f"{d.split}_chars"] += len(d.text)
    if not all(os.path.isfile(p) for p in files.values()):
        write_jsonl(files["all_train"], ({"text": d.text, "slice": d.slice} for d in docs if d.split == "train"))
        write_jsonl(files["distill_train"], ({"text": d.text, "slice": d.slice} for d in docs
                                             if d.split == "train" and d.slice in preset.distill_slices))
        write_jsonl(files["heldout"], ({"text": d.text, "slice": d.slice, "path": d.path} for d in docs if d.split == "eval"))
        from ..data.retrieval_pairs import retrieval_pairs

        write_jsonl(files["retrieval"], retrieval_pairs(docs, max_pairs=preset.retrieval_pairs, seed=preset.seed))
    return {"fingerprint": fp, "files": files, "stats": stats, "dir": cdir}, fp


def _prepare_tokenizer(preset: DemoPreset, corpus: dict, out_dir: str):
    from ..data.stdlib_corpus import train_tokenizer
    from .models import load_tokenizer

    tdir = os.path.join(out_dir, "cache", f"tokenizer-{_hash([corpus['fingerprint'], preset.vocab_size])}")
    if os.path.isfile(os.path.join(tdir, "tokenizer.json")):
        return load_tokenizer(tdir), tdir, True
    with open(corpus["files"]["all_train"], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = train_tokenizer(texts, vocab_size=preset.vocab_size, out_dir=tdir)
    return tok, tdir, False


def _train(config: dict):
    import distill_engine as de

    return de.train(config)


def _base_config(preset: DemoPreset, run_dir: str, tok_dir: str, files: List[str], student: dict, steps: int,
                 batch: int, lr: float, seed: int = None) -> dict:
    return {
        "run": {"output_dir": run_dir, "seed": preset.seed if seed is None else seed, "progress": "true",
                "tensorboard": False},
        "student": student,
        "data": {"train_files": files, "tokenizer": tok_dir, "seq_len": preset.seq_len, "packing": True},
        "train": {"engine": "deepspeed", "zero_stage": preset.zero_stage, "precision": "fp32",
                  "micro_batch_size": batch, "grad_accum": 1, "max_steps": steps, "lr": lr,
                  "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1, "weight_decay": 0.0,
                  "grad_clip": 1.0, "log_every": max(1, steps // 50), "device": "cpu"},
    }


def _final_dir(run_dir: str) -> str:
    path = os.path.join(run_dir, "final")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RuntimeError(f"training finished without a saved model in {path!r}")
    return path


def _prepare_teacher(preset: DemoPreset, corpus: dict, tok, tok_dir: str, out_dir: str, retrain: bool):
    from ..data.tokenizer import tokenizer_fingerprint

    init = preset.teacher.llama_init(len(tok), preset.seq_len, tok)
    key = _hash({"format": DEMO_FORMAT, "corpus": corpus["fingerprint"], "tokenizer": tokenizer_fingerprint(tok),
                 "init": init, "steps": preset.teacher_steps, "batch": preset.teacher_batch, "lr": preset.teacher_lr,
                 "seq_len": preset.seq_len, "seed": preset.seed, "zero": preset.zero_stage})
    cache = os.path.join(out_dir, "cache", f"teacher-{key}")
    if not retrain and os.path.isfile(os.path.join(cache, "config.json")):
        return cache, True
    run_dir = os.path.join(out_dir, "runs", f"teacher-{key}")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = _base_config(preset, run_dir, tok_dir, [corpus["files"]["all_train"]],
                       {"init": init, "init_seed": preset.seed + 100}, preset.teacher_steps, preset.teacher_batch,
                       preset.teacher_lr)
    cfg["teacher"] = "none"
    _train(cfg)
    final = _final_dir(run_dir)
    # Publish the finished teacher under its cache key with one rename: a killed run leaves no half teacher.
    from ..data.io import atomic_replace_dir, fsync_tree

    tmp = cache + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        shutil.copy(os.path.join(run_dir, "metrics.jsonl"), os.path.join(tmp, "train_metrics.jsonl"))
    fsync_tree(tmp)
    atomic_replace_dir(tmp, cache)
    return cache, False


def _retrieval_sentence(r: dict) -> str:
    m = r["models"]
    t, rel, resp, base = (m[k]["recall@1"] for k in ("teacher", "relation_student", "student", "baseline"))
    gap = lambda x: abs(x - t)  # noqa: E731
    verdict = "closer to" if gap(rel) < gap(base) else ("as far from" if gap(rel) == gap(base) else "further from")
    return (f"Retrieval recall@1: teacher {t:.3f}, relation-distilled student {rel:.3f}, response-distilled student "
            f"{resp:.3f}, baseline {base:.3f}: the relation-distilled student is {verdict} the teacher than the "
            f"baseline (|Δ| {gap(rel):.3f} vs {gap(base):.3f}; similarity-matrix gap to the teacher "
            f"{m['relation_student']['mean_abs_sim_diff_vs_teacher']:.3f} vs "
            f"{m['baseline']['mean_abs_sim_diff_vs_teacher']:.3f}).")


@dataclass
class _Job:
    """What every student run of the demo shares: the preset, the tokenizer, the teacher, the distillation data."""
    p: DemoPreset
    tok_dir: str
    teacher_dir: str
    files: List[str]  # the distillation slices' training text
    heldout: str
    runs: str
    s_init: dict

    def student(self, name: str, *, seed: Optional[int] = None, student: Optional[dict] = None,
                steps: Optional[int] = None, lr: Optional[float] = None, warmup: Optional[int] = None,
                loss: Optional[dict] = None, teacher: bool = True) -> Tuple[str, dict]:
        """Train one student in a fresh ``runs/<name>``; returns (its final model directory, the run's summary).
        Default: the demo's student recipe from the seed's initialization (``init_seed`` = seed + 200, so the
        distilled, relation and baseline students of one seed start from the same weights)."""
        p = self.p
        seed = p.seed if seed is None else seed
        run_dir = os.path.join(self.runs, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = _base_config(p, run_dir, self.tok_dir, self.files, student or {"init": self.s_init, "init_seed": seed + 200},
                           steps or p.student_steps, p.student_batch, lr or p.student_lr, seed)
        if warmup is not None:
            cfg["train"]["warmup_steps"] = warmup
        cfg["teacher"] = ({"source": "colocated", "path": self.teacher_dir, "k": p.top_k, "method": "topk",
                           "dtype": "float32"} if teacher else "none")
        if teacher:
            cfg["loss"] = loss or {"divergence": "forward_kl", "tail": "bucket", "temperature": 1.0, "ce_weight": 0.0}
        summary = _train(cfg)
        return _final_dir(run_dir), summary if isinstance(summary, dict) else {}


def _resolve_preset(preset) -> DemoPreset:
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset] if isinstance(preset, str) else preset


def _prepare(p: DemoPreset, out_dir: str, retrain_teacher: bool, stages: _Stages) -> Tuple[_Job, dict]:
    """Stages 1-3: corpus, tokenizer, teacher (each cached under a key of what shapes it)."""
    stages.start("corpus: the standard library's source, split into slices")
    corpus, _ = _prepare_corpus(p, out_dir)
    for name, s in corpus["stats"].items():
        role = "distill" if name in p.distill_slices else "left out of distillation"
        print(f"      {name:<14} {s['train_files']:>4} train files {s['train_chars'] / 1e6:6.2f} MB | "
              f"{s['eval_files']:>3} held-out files | {role}")
    stages.done()

    stages.start(f"tokenizer: byte-level BPE, vocabulary {p.vocab_size}")
    tok, tok_dir, cached = _prepare_tokenizer(p, corpus, out_dir)
    stages.done(("cached " if cached else "") + f"{len(tok)} tokens")

    stages.start(f"teacher: trained on every slice, {p.teacher_steps} steps × {p.teacher_batch} × {p.seq_len} tokens")
    teacher_dir, cached = _prepare_teacher(p, corpus, tok, tok_dir, out_dir, retrain_teacher)
    stages.done(f"cached at {teacher_dir} (delete it or pass --retrain-teacher to retrain)" if cached else teacher_dir)
    return _Job(p, tok_dir, teacher_dir, [corpus["files"]["distill_train"]], corpus["files"]["heldout"],
                os.path.join(out_dir, "runs"), p.student.llama_init(len(tok), p.seq_len, tok)), corpus


def _train_students(job: _Job, stages: _Stages) -> Dict[str, str]:
    """Stages 4-7: the distilled, relation-distilled and baseline students, and the on-policy/off-policy pairs."""
    p = job.p
    out = {}
    stages.start(f"student: distilled from the teacher on {', '.join(p.distill_slices)} only "
                 f"(co-located teacher, top-{p.top_k} targets, fused loss, DeepSpeed ZeRO-{p.zero_stage} on CPU)")
    out["student"], _ = job.student("student_distilled")
    stages.done()

    stages.start(f"relation student: the same distillation plus loss.relation ({p.relation_kind} relations of "
                 f"mean-pooled final states, τ={p.relation_temperature}), same steps and tokens")
    out["relation"], _ = job.student("student_relation", loss={
        "divergence": "forward_kl", "tail": "bucket", "temperature": 1.0, "ce_weight": 0.0,
        "relation": {"kind": p.relation_kind, "pooling": "mean", "weight": p.relation_weight,
                     "temperature": p.relation_temperature}})
    stages.done()

    stages.start("baseline: the same student trained on hard labels only (teacher: none), same steps and tokens")
    out["baseline"], _ = job.student("student_baseline", teacher=False)
    stages.done()

    from .demo_onpolicy import on_policy_steps, train_pairs

    stages.start(f"on-policy vs off-policy, seeds {', '.join(map(str, p.on_policy_seeds))}: each seed's distilled "
                 f"student continued {p.continue_steps} steps off-policy, and {on_policy_steps(p)} steps on-policy "
                 f"(GKD, λ = {p.on_policy_fraction}, {p.on_policy_objective}: {p.on_policy_divergence}, "
                 f"{p.on_policy_prompt}-token prompts, {p.on_policy_new} new tokens) for the same student-token budget")
    out["pairs"] = train_pairs(job, out["student"])
    stages.done()
    return out


def _eval_kwargs(p: DemoPreset) -> dict:
    return dict(distill_slices=list(p.distill_slices), coverage_factor=p.coverage_factor, max_length=p.seq_len,
                batch_size=8, max_tokens_per_slice=p.eval_tokens_per_slice, objective_k=p.top_k, device="cpu")


def run_demo(out_dir: str = "demo_out", retrain_teacher: bool = False, preset="default") -> bool:
    """Run the demo; returns True when both effects show. Prints the table; writes ``<out>/report``."""
    p = _resolve_preset(preset)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    stages = _Stages(10)
    print(f"distill-engine demo: Python {sys.version.split()[0]} standard library → teacher "
          f"(d={p.teacher.hidden}, {p.teacher.layers} layers) → student (d={p.student.hidden}, {p.student.layers} "
          f"layers) distilled on {', '.join(p.distill_slices)}; output in {out_dir}", flush=True)
    job, corpus = _prepare(p, out_dir, retrain_teacher, stages)
    models = _train_students(job, stages)

    stages.start("eval: held-out text of every slice")
    from .evaluate import evaluate

    report_dir = os.path.join(out_dir, "report")
    metrics = {"student (distilled)": os.path.join(job.runs, "student_distilled", "metrics.jsonl"),
               "baseline (hard labels)": os.path.join(job.runs, "student_baseline", "metrics.jsonl")}
    report = evaluate(job.teacher_dir, models["student"], job.heldout, baseline=models["baseline"],
                      tokenizer=job.tok_dir, out_dir=report_dir, metrics=metrics, **_eval_kwargs(p))
    stages.done()

    from .demo_onpolicy import comparison_lines, evaluate_pairs, write_comparison

    stages.start(f"eval: the on-policy and off-policy continuations ({p.on_policy_eval_samples} held-out prompts "
                 f"per slice, the same prompts and sampling seeds for both)")
    pairs = evaluate_pairs(job, models["pairs"])
    op_lines = comparison_lines(pairs, list(p.distill_slices))
    write_comparison(pairs, op_lines, report_dir, {k: getattr(p, k) for k in (
        "on_policy_seeds", "continue_steps", "continue_lr", "on_policy_fraction", "on_policy_objective",
        "on_policy_divergence", "on_policy_prompt", "on_policy_new", "on_policy_eval_samples", "on_policy_eval_tokens",
        "seq_len")})
    stages.done()

    stages.start("retrieval: docstring → code pairs of held-out functions, mean-pooled embeddings")
    from .retrieval import attach_retrieval, evaluate_retrieval

    retr = evaluate_retrieval(job.teacher_dir, models["student"], corpus["files"]["retrieval"],
                              baseline=models["baseline"], others={"relation_student": models["relation"]},
                              tokenizer=job.tok_dir, pooling="mean", max_length=p.seq_len, batch_size=16, device="cpu")
    report = attach_retrieval(retr, report_dir, report)
    stages.done(f"{retr['n_pairs']} pairs")
    ok = _print_summary(p, report, retr, op_lines)
    total = time.time() - stages.t0
    print("\ntimings: " + ", ".join(f"{t.split(':')[0]} {dt:.0f}s" for t, dt in stages.times)
          + f"; total {total:.0f}s (CPU {time.process_time() - stages.c0:.0f}s)")
    print(f"report: {os.path.join(report_dir, 'report.md')} (plots and on_policy.md beside it)")
    return ok


def _print_summary(p: DemoPreset, report: dict, retr: dict, op_lines: List[str]) -> bool:
    """The tables and the verdicts; True when both effects (a) and (b) show."""
    from .report import summary_text
    from .retrieval import retrieval_markdown

    print("\n" + summary_text(report) + "\n")
    print(retrieval_markdown(retr))
    print(_retrieval_sentence(retr) + "\n")
    f = report["findings"]
    closer = bool(f.get("student_closer_than_baseline_on_distill_slices"))
    left_out = [r["name"] for r in report["slices"] if r["role"] == "held_out"]
    warned = [s for s in f["coverage_warnings"] if s in left_out]
    k = f.get("distill_slices_kl", {})
    print(f"{'✓' if closer else '✗'} (a) on the distillation slices the distilled student is closer to the teacher "
          f"than the baseline (KL {k.get('student', float('nan')):.3f} vs {k.get('baseline', float('nan')):.3f} "
          f"nats/token)")
    print(f"{'✓' if warned else '✗'} (b) coverage warning on slices left out of distillation: "
          f"{', '.join(warned) or 'none'}")
    print("\nOn-policy vs off-policy continuation of the distilled student (same start, same student-token budget):")
    for line in op_lines:
        print(line)
    return bool(closer and warned)
