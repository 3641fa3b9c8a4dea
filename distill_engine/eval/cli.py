"""The ``eval``, ``generate`` and ``demo`` subcommands of ``distill-engine``.

``distill_engine/cli.py`` owns the top-level parser; it registers every entry of :data:`COMMANDS`
(name → (help, add_arguments(parser), run(args) → exit code)) with its ``register`` hook.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

_EVAL_DESCRIPTION = ("Per slice and overall: teacher/student perplexity, exact KL(teacher||student) per token, "
                     "top-1/top-5 agreement, the student/teacher perplexity ratio, the same for an optional "
                     "baseline; flags coverage warnings and suspicious slices. Writes report.json, report.md, PNGs.")
_GENERATE_DESCRIPTION = ("Samples one completion per prompt and appends rows {id, prompt, completion, text, ...} "
                         "to a JSONL file, one fsync'd batch at a time; rerunning resumes where it stopped. Train a "
                         "student on the `text` column with `teacher: none`.")


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _metrics_arg(values: Optional[List[str]]):
    if not values:
        return None
    out = {}
    for v in values:
        label, sep, path = v.partition("=")
        if not sep:
            label, path = ("student" if not out else f"run{len(out)}"), v
        out[label] = path
    return out


EVAL_HELP = "compare a student (and a baseline) with the teacher on held-out data, per slice"
GENERATE_HELP = "write teacher completions for black-box (sequence-level) distillation"
DEMO_HELP = "the embedded end-to-end demo: stdlib corpus → teacher → distilled + baseline student → eval"


def _add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how the models run (eval and generate)."""
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-progress", action="store_true")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.description = _EVAL_DESCRIPTION
    p.add_argument("--teacher", required=True, help="teacher model directory (save_pretrained output)")
    p.add_argument("--student", required=True, help="student model directory")
    p.add_argument("--baseline", help="optional baseline student (e.g. trained on hard labels only)")
    p.add_argument("--data", help="held-out .jsonl/.json/.txt/.parquet file (required unless --retrieval is given)")
    p.add_argument("--retrieval", metavar="PAIRS.jsonl",
                   help="also (or only) evaluate retrieval: {query, positive} rows; recall@1/@10, MRR per model")
    p.add_argument("--retrieval-pooling", default="mean", choices=("mean", "last", "cls"))
    p.add_argument("--query-column", default="query")
    p.add_argument("--positive-column", default="positive")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the student's, else the teacher's)")
    p.add_argument("--out", help="report directory (report.json, report.md, *.png)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--slice-column", default="auto",
                   help="slice column; 'auto' uses `slice` when present; '' evaluates everything as one slice")
    p.add_argument("--distill-slices", type=_csv, help="comma-separated slices the student was distilled on")
    p.add_argument("--coverage-factor", type=float, default=2.0,
                   help="coverage warning when a slice's KL exceeds this × the distillation slices' KL")
    p.add_argument("--max-length", type=int, default=256, help="predicted tokens per window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens-per-slice", type=int)
    p.add_argument("--objective-k", type=int, default=64, help="k of the top-k objective KL (0 = skip)")
    p.add_argument("--metrics", action="append", metavar="[LABEL=]JSONL",
                   help="trainer metrics JSONL for the training-curve plot (repeatable)")
    p.add_argument("--on-policy-samples", type=int, default=0,
                   help="prompts per slice for the on-policy metric: the teacher's NLL of each student's own "
                        "continuations (0 = skip)")
    p.add_argument("--on-policy-prompt-tokens", type=int, default=16)
    p.add_argument("--on-policy-max-new-tokens", type=int, default=32)
    _add_runtime_arguments(p)


def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    g.description = _GENERATE_DESCRIPTION
    g.add_argument("--teacher", required=True, help="teacher model directory")
    g.add_argument("--prompts", required=True, help=".jsonl/.json/.parquet with a prompt column, or .txt (one per line)")
    g.add_argument("--out", required=True, help="output .jsonl (appended to; resumable)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the teacher's)")
    g.add_argument("--prompt-column", default="prompt")
    g.add_argument("--id-column", default="auto", help="record id column ('auto': `id` when present, else the index)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, help="generate at most this many new rows now")
    _add_runtime_arguments(g)


def add_demo_arguments(d: argparse.ArgumentParser) -> None:
    d.description = ("Builds a corpus from the Python standard library, trains a tokenizer and a small teacher "
                    "(cached), distills a half-size student through the engine on some slices, trains a "
                    "hard-label baseline, and evaluates all of them on held-out text of every slice; exits 1 "
                     "when the report does not show both effects the demo exists to show.")
    d.add_argument("--out", default="demo_out", help="demo directory (caches and reports)")
    d.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    d.add_argument("--preset", default="default", choices=("default", "smoke"),
                   help="'smoke' is a seconds-long run with tiny models, to check the plumbing")


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .report import summary_text

    if not args.data and not args.retrieval:
        raise ValueError("eval needs --data HELD_OUT (per-slice metrics) and/or --retrieval PAIRS.jsonl")
    if not args.data:
        return _run_retrieval(args, None)
    report = evaluate(
        args.teacher, args.student, args.data, baseline=args.baseline, tokenizer=args.tokenizer,
        out_dir=args.out, metrics=_metrics_arg(args.metrics),
        text_column=args.text_column, slice_column=(args.slice_column or None),
        distill_slices=args.distill_slices, coverage_factor=args.coverage_factor, max_length=args.max_length,
        batch_size=args.batch_size, max_tokens_per_slice=args.max_tokens_per_slice, objective_k=args.objective_k,
        device=args.device, dtype=args.dtype, progress=not args.no_progress,
        on_policy_samples=args.on_policy_samples, on_policy_prompt_tokens=args.on_policy_prompt_tokens,
        on_policy_max_new_tokens=args.on_policy_max_new_tokens,
    )
    print(summary_text(report))
    if args.retrieval:
        return _run_retrieval(args, report)
    if args.out:
        print(f"\nreport: {args.out}/report.md, {args.out}/report.json")
    return 0


def _run_retrieval(args: argparse.Namespace, report) -> int:
    """``--retrieval PAIRS.jsonl`` (issue 16): adds the retrieval section to report.json / report.md."""
    from .retrieval import attach_retrieval, evaluate_retrieval, retrieval_markdown

    r = evaluate_retrieval(args.teacher, args.student, args.retrieval, baseline=args.baseline,
                           tokenizer=args.tokenizer, pooling=args.retrieval_pooling, query_column=args.query_column,
                           positive_column=args.positive_column, max_length=args.max_length,
                           batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    attach_retrieval(r, args.out, report)
    print(retrieval_markdown(r))
    if args.out:
        print(f"report: {args.out}/report.md, {args.out}/report.json")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    s = generate(
        args.teacher, args.prompts, args.out, tokenizer=args.tokenizer, prompt_column=args.prompt_column,
        id_column=(args.id_column or None), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, limit=args.limit,
        device=args.device, dtype=args.dtype, progress=not args.no_progress,
    )
    print(f"{args.out}: {s['written']} rows written, {s['already_present']} already present, "
          f"{s['remaining']} remaining of {s['total']}"
          + (f" (cut off a partial last line of {s['dropped_partial_bytes']} bytes)" if s["dropped_partial_bytes"] else ""))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as _run

    ok = _run(out_dir=args.out, retrain_teacher=args.retrain_teacher, preset=args.preset)
    return 0 if ok else 1


COMMANDS = {
    "eval": (EVAL_HELP, add_eval_arguments, run_eval),
    "generate": (GENERATE_HELP, add_generate_arguments, run_generate),
    "demo": (DEMO_HELP, add_demo_arguments, run_demo),
}
