"""The demo's on-policy vs off-policy comparison (issue 13; stages 7 and 9 of ``distill-engine demo``).

Per seed: the seed's off-policy distilled student is continued twice from the same weights, with the same
learning rate, warm-up and budget of trained student tokens —

* off-policy: ``continue_steps`` more steps of forward KL on the fixed text (``seq_len − 1`` trained tokens per
  sample);
* on-policy (GKD): λ = ``on_policy_fraction`` of the micro-batches replaced by the student's own continuations of
  the text's first ``on_policy_prompt`` tokens (``on_policy_new`` sampled tokens, temperature 1, top-p 1), the loss
  on the generated tokens only (``on_policy_objective``; with ``divergence``, ``on_policy_divergence``: reverse KL
  by default, the GKD paper's on-policy choice). A micro-batch then trains on fewer tokens, so this run
  gets proportionally more steps; the trainer's token counts of both runs are reported.

Both are then evaluated in one ``evaluate`` call (the same held-out windows, and the same per-slice sampling
generator for every model): the on-policy metric — the teacher's per-token NLL of each student's own
continuations of held-out prompts, and the student's own NLL of them — and held-out KL on the distillation slices.
"""
from __future__ import annotations

import math
import os
from typing import List

from ._io import atomic_write_json, atomic_write_text


def on_policy_steps(p) -> int:
    """Steps of the on-policy continuation that train as many student tokens as ``continue_steps`` off-policy."""
    per_step = p.on_policy_fraction * p.on_policy_new + (1 - p.on_policy_fraction) * (p.seq_len - 1)
    return max(1, round(p.continue_steps * (p.seq_len - 1) / per_step))


def train_pairs(job, first_student: str) -> List[dict]:
    """For each seed: the seed's distilled student (``first_student`` for the demo's own seed), then its off- and
    on-policy continuations. ``job.student(name, ...)`` trains one student and returns (final dir, summary)."""
    p = job.p
    loss = {"divergence": "forward_kl", "tail": "bucket", "temperature": 1.0, "ce_weight": 0.0}
    on = {"fraction": p.on_policy_fraction, "prompt_tokens": p.on_policy_prompt, "max_new_tokens": p.on_policy_new,
          "temperature": 1.0, "top_p": 1.0, "objective": p.on_policy_objective}
    # the same number of warm-up steps in both branches: they start from trained weights with fresh AdamW state
    warmup = max(1, p.continue_steps // 10)
    pairs = []
    for seed in p.on_policy_seeds:
        start = first_student if seed == p.seed else job.student(f"student_distilled_seed{seed}", seed=seed)[0]
        common = dict(seed=seed, student={"path": start}, lr=p.continue_lr, warmup=warmup)
        off_dir, off_sum = job.student(f"seed{seed}_offpolicy", steps=p.continue_steps, loss=loss, **common)
        on_loss = dict(loss, divergence=p.on_policy_divergence, on_policy=on)
        on_dir, on_sum = job.student(f"seed{seed}_onpolicy", steps=on_policy_steps(p), loss=on_loss, **common)
        pairs.append({"seed": seed, "start": start, "off": off_dir, "on": on_dir,
                      "trained_tokens": {"off": off_sum.get("tokens"), "on": on_sum.get("tokens")},
                      "steps": {"off": p.continue_steps, "on": on_policy_steps(p)}})
    return pairs


def _metrics(report: dict, role: str, distill: List[str]) -> dict:
    rows = [r for r in report["slices"] if r["name"] in distill and r.get(role)]
    n = sum(r["tokens"] for r in rows)
    kl = sum(r[role]["kl"] * r["tokens"] for r in rows) / n if n else float("nan")
    op = [r[role]["on_policy"] for r in rows if r[role].get("on_policy")]
    m = sum(o["tokens"] for o in op)
    overall = report["overall"][role].get("on_policy") or {}
    return {"teacher_nll": overall.get("teacher_nll", float("nan")),
            "student_nll": overall.get("student_nll", float("nan")),
            "teacher_nll_distill": sum(o["teacher_nll"] * o["tokens"] for o in op) / m if m else float("nan"),
            "kl_distill": kl, "on_policy_tokens": overall.get("tokens", 0)}


def evaluate_pairs(job, pairs: List[dict]) -> List[dict]:
    """Adds ``metrics`` {"off": ..., "on": ...} to each pair (one evaluate call per seed, both students in it)."""
    from .evaluate import evaluate

    p = job.p
    distill = list(p.distill_slices)
    for pr in pairs:
        # "student" and "baseline" are only the two slots of one evaluate call here: off- and on-policy
        rep = evaluate(job.teacher_dir, pr["off"], job.heldout, baseline=pr["on"], tokenizer=job.tok_dir,
                       distill_slices=distill, max_length=p.seq_len, batch_size=8,
                       max_tokens_per_slice=p.on_policy_eval_tokens, objective_k=p.top_k, device="cpu",
                       on_policy_samples=p.on_policy_eval_samples, on_policy_prompt_tokens=p.on_policy_prompt,
                       on_policy_max_new_tokens=p.on_policy_new, progress=False)
        pr["metrics"] = {"off": _metrics(rep, "student", distill), "on": _metrics(rep, "baseline", distill)}
    return pairs


def comparison_lines(pairs: List[dict], distill: List[str]) -> List[str]:
    """The per-seed table and, in words, which student did better on each measure and over all seeds."""
    d = ", ".join(f"`{s}`" for s in distill)
    # own NLL of own samples estimates the student's sampling entropy H(S); teacher-NLL − own NLL estimates the
    # reverse KL(S ‖ T) on its own samples: teacher-NLL = H(S) + KL(S ‖ T) splits the metric into the two
    out = [f"| seed | student | teacher-NLL of own samples (all slices) | … ({d}) | own NLL of own samples | "
           f"teacher − own NLL | held-out KL ({d}) | trained student tokens |", "|---|---|---|---|---|---|---|---|"]
    for pr in pairs:
        for k, name in (("off", "off-policy"), ("on", "on-policy (GKD)")):
            m = pr["metrics"][k]
            tok = pr["trained_tokens"][k]
            out.append(f"| {pr['seed']} | {name} | {m['teacher_nll']:.3f} | {m['teacher_nll_distill']:.3f} | "
                       f"{m['student_nll']:.3f} | {m['teacher_nll'] - m['student_nll']:.3f} | {m['kl_distill']:.3f} | "
                       f"{'' if tok is None else f'{tok:,.0f}'} |")
    won_nll = [pr["seed"] for pr in pairs if pr["metrics"]["on"]["teacher_nll"] < pr["metrics"]["off"]["teacher_nll"]]
    won_kl = [pr["seed"] for pr in pairs if pr["metrics"]["on"]["kl_distill"] < pr["metrics"]["off"]["kl_distill"]]
    gap = lambda m: m["teacher_nll"] - m["student_nll"]  # noqa: E731
    won_rkl = [pr["seed"] for pr in pairs if gap(pr["metrics"]["on"]) < gap(pr["metrics"]["off"])]
    mean = lambda k, key: sum(pr["metrics"][k][key] for pr in pairs) / len(pairs)  # noqa: E731
    n = len(pairs)
    out.append(
        f"On the on-policy metric (the teacher's NLL of each student's own samples, all slices) the on-policy "
        f"student did better on {len(won_nll)} of {n} seeds{_which(won_nll, pairs)} (mean "
        f"{mean('on', 'teacher_nll'):.3f} vs {mean('off', 'teacher_nll'):.3f} nats/token off-policy); on held-out "
        f"KL ({d}) it did better on {len(won_kl)} of {n}{_which(won_kl, pairs)} (mean {mean('on', 'kl_distill'):.3f} "
        f"vs {mean('off', 'kl_distill'):.3f}). Its sampled reverse KL to the teacher (teacher − own NLL of its own "
        f"samples) was lower on {len(won_rkl)} of {n}{_which(won_rkl, pairs)}; its own NLL of its samples (its "
        f"sampling entropy) was {mean('on', 'student_nll'):.3f} vs {mean('off', 'student_nll'):.3f} off-policy.")
    return out


def _which(won: List[int], pairs: List[dict]) -> str:
    if not won or len(won) == len(pairs):
        return ""
    return " (seed " + ", ".join(str(s) for s in won) + ")"


def write_comparison(pairs: List[dict], lines: List[str], report_dir: str, settings: dict) -> None:
    """``<report>/on_policy.json`` and ``on_policy.md`` (atomic writes)."""
    os.makedirs(report_dir, exist_ok=True)
    clean = [{k: v for k, v in pr.items()} for pr in pairs]
    for pr in clean:  # JSON has no NaN: a missing measure is null
        pr["metrics"] = {k: {a: (None if isinstance(b, float) and math.isnan(b) else b) for a, b in m.items()}
                         for k, m in pr["metrics"].items()}
    atomic_write_json(os.path.join(report_dir, "on_policy.json"), {"settings": settings, "pairs": clean})
    atomic_write_text(os.path.join(report_dir, "on_policy.md"),
                      "# On-policy vs off-policy continuation of the distilled student\n\n" + "\n".join(lines) + "\n")
