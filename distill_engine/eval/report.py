"""Turning an evaluation report (the dict :func:`distill_engine.eval.evaluate` returns) into
report.json, report.md, a terminal table, and PNG plots. Every file is written atomically."""
from __future__ import annotations

import io
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Union

from ._io import atomic_write_bytes, atomic_write_json, atomic_write_text

PREFERRED_CURVES = ("loss", "kl", "divergence", "ce", "tokens_per_s")
ROLE_COLORS = {"student": ("#1f77b4", "#9ecae1"), "baseline": ("#ff7f0e", "#fdd0a2")}


def _f(x, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, fmt)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def table_markdown(report: dict) -> str:
    """The per-slice table as Markdown (readable as plain text too)."""
    roles = report["models"]
    has_b = "baseline" in roles
    has_obj = report.get("objective_k") is not None
    head = ["slice", "role", "tokens", "teacher ppl", "student ppl", "ppl ratio", "KL", "top-1", "top-5"]
    if has_obj:
        head.append(f"KL top-{report['objective_k']}")
    if has_b:
        head += ["baseline ppl", "baseline KL", "baseline top-1"]
    head.append("flags")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "--:" for i in range(len(head) - 1)) + "|---|"]

    def cells(name, role, r, flags):
        s = r.get("student") or {}
        out = [name, role, str(r["tokens"]), _f(r["teacher"]["ppl"], ".2f"), _f(s.get("ppl"), ".2f"),
               _f(s.get("ppl_ratio"), ".2f"), _f(s.get("kl")), _pct(s.get("top1")), _pct(s.get("top5"))]
        if has_obj:
            out.append(_f(s.get("kl_topk_bucket")))
        if has_b:
            b = r.get("baseline") or {}
            out += [_f(b.get("ppl"), ".2f"), _f(b.get("kl")), _pct(b.get("top1"))]
        out.append(", ".join(flags) if flags else "")
        return "| " + " | ".join(out) + " |"

    for r in report["slices"]:
        role = {"distill": "distilled on", "held_out": "left out", "unknown": "–"}[r["role"]]
        lines.append(cells(f"`{r['name']}`", role, r, r["flags"]))
    lines.append(cells("**overall**", "", report["overall"], []))
    return "\n".join(lines)


def flags_text(report: dict) -> List[str]:
    out = [f["message"] for f in report["flags"]]
    if not out:
        out = ["No slice is flagged."]
    return out + list(report.get("notes", []))


def summary_text(report: dict) -> str:
    """The table plus every flag in words, for the terminal."""
    parts = [table_markdown(report), ""]
    f = report.get("findings", {})
    if "distill_slices_kl" in f:
        k = f["distill_slices_kl"]
        verdict = "closer to" if f["student_closer_than_baseline_on_distill_slices"] else "NOT closer to"
        parts.append(f"On the distillation slices the distilled student is {verdict} the teacher than the baseline: "
                     f"KL {k['student']:.3f} vs {k['baseline']:.3f} nats/token.")
    parts += ["- " + m for m in flags_text(report)]
    return "\n".join(parts)


def on_policy_markdown(report: dict) -> List[str]:
    """The on-policy metric table (eval with on_policy_samples > 0), else nothing."""
    roles = [r for r in report["models"] if (report["overall"].get(r) or {}).get("on_policy")]
    if not roles:
        return []
    cfg = report["config"]
    lines = ["## On-policy: the teacher's NLL of each student's own continuations", "",
             f"Each student continues the first {cfg['on_policy_prompt_tokens']} tokens of up to "
             f"{cfg['on_policy_samples']} held-out windows per slice ({cfg['on_policy_max_new_tokens']} new tokens, "
             "temperature 1); lower teacher NLL = the student's own text looks more like the teacher's.", "",
             "| slice | " + " | ".join(f"{r} teacher-NLL | {r} self-NLL" for r in roles) + " |",
             "|---|" + "---|---|" * len(roles)]
    for row in report["slices"] + [dict(report["overall"], name="**overall**")]:
        cells = []
        for r in roles:
            m = (row.get(r) or {}).get("on_policy")
            cells += [f"{m['teacher_nll']:.3f}", f"{m['student_nll']:.3f}"] if m else ["–", "–"]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown_report(report: dict, plots: Mapping[str, str]) -> str:
    src = report["sources"]
    cfg = report["config"]
    lines = ["# Distillation evaluation report", ""]
    lines.append(f"- teacher: `{src['teacher']}`")
    lines.append(f"- student: `{src['student']}`")
    if src.get("baseline"):
        lines.append(f"- baseline: `{src['baseline']}`")
    lines.append(f"- data: `{src['data']}`; distillation slices: "
                 + (", ".join(f"`{s}`" for s in report["distill_slices"]) if report["distill_slices"] else "not given"))
    lines.append(f"- coverage factor {cfg['coverage_factor']:g}×, window {cfg['max_length']} tokens, "
                 f"{report['overall']['tokens']} evaluated tokens, {report['seconds']:.1f} s")
    lines += ["", "## Per slice", "", table_markdown(report), ""]
    lines += ["## Flags", ""] + ["- " + m for m in flags_text(report)] + [""]
    f = report.get("findings", {})
    if "distill_slices_kl" in f:
        k = f["distill_slices_kl"]
        lines += [f"On the distillation slices the distilled student's KL to the teacher is {k['student']:.3f} "
                  f"nats/token against the baseline's {k['baseline']:.3f}: the student is "
                  + ("closer to" if f["student_closer_than_baseline_on_distill_slices"] else "**not** closer to")
                  + " the teacher.", ""]
    lines += on_policy_markdown(report)
    lines += [
        "## How to read this", "",
        "- **ppl**: perplexity on the held-out text (exp of the mean next-token negative log-likelihood); "
        "**ppl ratio** = student ppl / teacher ppl.",
        "- **KL**: forward KL(teacher ‖ student) per token over the full vocabulary, exact, in nats: how far the "
        "student's next-token distribution is from the teacher's. This is the gap the coverage warning uses.",
        "- **KL top-k**: the same divergence over the teacher's top-k ids plus one tail bucket — what a top-k "
        "distillation run optimizes; a lower bound of the exact KL.",
        "- **top-1**: how often the student's most probable next token is the teacher's; **top-5**: how often the "
        "teacher's most probable token is among the student's five most probable.",
        "- **coverage warning**: a slice left out of distillation where the student's KL exceeds the coverage factor "
        "times its KL on the distillation slices. A student copies the teacher on the data it was shown, not the "
        "teacher's full capability.",
        "- **suspicious**: the student's perplexity is below the teacher's — held-out text leaking into the "
        "student's training data, or a weak teacher on that slice.",
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({os.path.basename(path)})" for name, path in plots.items()] + [""]
    return "\n".join(lines)


def _savefig(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_slices(report: dict, out_dir: str) -> Dict[str, str]:
    plt = _plt()
    roles = report["models"]
    names = [r["name"] for r in report["slices"]]
    x = list(range(len(names)))
    width = 0.8 / max(len(roles), 1)
    paths = {}

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.8))
    for j, role in enumerate(roles):
        vals = [(r[role] or {}).get("kl") or 0.0 for r in report["slices"]]
        ax.bar([i + (j - (len(roles) - 1) / 2) * width for i in x], vals, width, label=role,
               color=ROLE_COLORS.get(role, ("#555555",))[0])
    ref = (report.get("coverage_reference_kl") or {}).get("student")
    if ref is not None:
        thr = max(report["config"]["coverage_factor"] * ref, report["config"]["coverage_min_gap"])
        ax.axhline(thr, color="crimson", linestyle="--", linewidth=1, label="coverage threshold (student)")
    ax.set_xticks(x, [n + (" *" if r["role"] == "distill" else "") for n, r in zip(names, report["slices"])],
                  rotation=20, ha="right")
    ax.set_ylabel("KL(teacher ‖ model), nats/token")
    ax.set_title("KL to the teacher per slice (* = distillation slice)")
    ax.legend(fontsize=8)
    paths["kl_by_slice"] = os.path.join(out_dir, "kl_by_slice.png")
    _savefig(fig, paths["kl_by_slice"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.8))
    series = [(role, key) for role in roles for key in ("top1", "top5")]
    width = 0.8 / len(series)
    for j, (role, key) in enumerate(series):
        vals = [100 * ((r[role] or {}).get(key) or 0.0) for r in report["slices"]]
        dark, light = ROLE_COLORS.get(role, ("#555555", "#bbbbbb"))
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in x], vals, width,
               label=f"{role} {key.replace('top', 'top-')}", color=dark if key == "top1" else light)
    ax.set_xticks(x, [n + (" *" if r["role"] == "distill" else "") for n, r in zip(names, report["slices"])],
                  rotation=20, ha="right")
    ax.set_ylabel("agreement with the teacher, %")
    ax.set_ylim(0, 100)
    ax.set_title("Top-1 / top-5 agreement per slice (* = distillation slice)")
    ax.legend(fontsize=8, ncol=2)
    paths["agreement_by_slice"] = os.path.join(out_dir, "agreement_by_slice.png")
    _savefig(fig, paths["agreement_by_slice"])
    plt.close(fig)
    return paths


def read_metrics_jsonl(path: str) -> List[dict]:
    """Rows of a trainer metrics JSONL; unreadable lines (a run killed mid-write) are skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                rows.append(rec)
    return rows


def plot_training_curves(metrics: Mapping[str, str], out_dir: str) -> Optional[str]:
    runs = {}
    for label, path in metrics.items():
        if path and os.path.isfile(path):
            rows = [r for r in read_metrics_jsonl(path) if isinstance(r.get("step"), (int, float))]
            if rows:
                runs[label] = rows
    if not runs:
        return None
    numeric = set()
    for rows in runs.values():
        for r in rows:
            numeric |= {k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    keys = [k for k in PREFERRED_CURVES if k in numeric] or sorted(numeric)[:4]
    keys = keys[:4]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.suptitle("Training curves", y=1.03)
    fig.tight_layout()
    path = os.path.join(out_dir, "training_curves.png")
    _savefig(fig, path)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str, *, metrics: Union[None, str, Mapping[str, str]] = None) -> Dict[str, str]:
    """Write report.json, report.md and the plots under ``out_dir``; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(metrics, (str, os.PathLike)):
        metrics = {"student": os.fspath(metrics)}
    plots = plot_slices(report, out_dir)
    if metrics:
        curve = plot_training_curves(metrics, out_dir)
        if curve:
            plots["training_curves"] = curve
    report["files"] = {k: os.path.basename(v) for k, v in plots.items()}
    paths = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md")}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["markdown"], markdown_report(report, plots))
    paths.update(plots)
    return paths
