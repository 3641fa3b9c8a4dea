"""Progress and metrics, written by rank 0 only: a tqdm bar (loss, KL, tokens/s), one JSON line per logged
step in ``output_dir/metrics.jsonl`` (appended, flushed and fsynced per line, so a killed run keeps every
line it logged; a resumed run first drops lines past the step it resumes at), and TensorBoard scalars.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict


class MetricsLogger:
    def __init__(self, output_dir: str, *, enabled: bool, total_steps: int, start_step: int, progress: str,
                 tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._f = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._truncate_after(start_step)
        self._f = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
            except Exception as exc:  # tensorboard missing or broken: metrics still go to the JSONL
                sys.stderr.write(f"[distill-engine] TensorBoard disabled ({type(exc).__name__}: {exc})\n")
        show = progress == "true" or (progress == "auto" and sys.stderr.isatty())
        if show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="distill", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Keep the lines of steps <= ``step`` (a resumed run rewrites what followed its checkpoint)."""
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        from ..data.io import atomic_write_bytes

        atomic_write_bytes(self.path, "".join(keep).encode("utf-8"))

    def log(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": step}
        rec.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            shown = {k: values[k] for k in ("loss", "kl", "tokens_per_s") if k in values}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._f is not None:
            self._f.close()
        self._f = self._tb = self._bar = None


def format_summary(s: Dict) -> str:
    lines = ["distill-engine: training finished"]
    for k in ("steps", "tokens", "first_loss", "final_loss", "tokens_per_s", "elapsed_s", "peak_memory_gb",
              "final_model", "checkpoint"):
        if s.get(k) is not None:
            v = s[k]
            lines.append(f"  {k:>15}: {v:.4g}" if isinstance(v, float) else f"  {k:>15}: {v}")
    return "\n".join(lines)
