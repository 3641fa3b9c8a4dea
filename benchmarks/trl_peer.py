"""TRL as a benchmark peer (benchmarks only; the library never imports TRL): one timed run of
``trl.experimental.gkd.GKDTrainer`` on the engine's own token samples, for ``bench_train.py`` (λ = 0, off-policy:
the dataset's sequences, full logits of both models, ``generalized_jsd_loss``) and ``bench_onpolicy.py`` (λ = 1:
the student's generations).

TRL 1.16's stable ``trl.DistillationTrainer`` always generates (its chunked divergence is on-policy only), so the
off-policy peer is ``GKDTrainer(lmbda=0)``, whose training step then never generates (``random() <= 0`` is false)
and whose ``beta = 0`` is the forward KL(teacher ‖ student) that the engine's ``forward_kl`` computes.

Timing and memory as the engine's workers measure them: step 1 (the first optimizer step) is the warm-up; the
resident-set high-water mark is reset after it (``harness._reset_peak_rss``), and the clock runs from its end to
the end of the last step. Tokens are the trained (label) positions each step saw, counted after an on-policy swap.
"""
from __future__ import annotations

import gc
import os
import time
from typing import List


def engine_rows(paths: dict, seq: int, max_samples: int, length: int) -> List[List[int]]:
    """The engine's packed token samples (its tokenizer, ``tokenize`` with packing and eos, as the trainer
    builds them), each cut to ``length`` tokens."""
    from distill_engine.data import load_texts, load_tokenizer, tokenize

    tok = load_tokenizer(paths["student"], key="student")
    samples = tokenize(load_texts([paths["data"]]), tok, seq_len=seq, packing=True, add_eos=True,
                       max_samples=max_samples)
    return [samples.sample(i)[:length].tolist() for i in range(len(samples))]


def gkd_run(paths: dict, rows: List[List[int]], *, workdir: str, mb: int, steps: int, lmbda: float, beta: float,
            prompt: int = 0, new: int = 0, lr: float = 1e-4) -> dict:
    """``steps`` timed GKDTrainer steps after one warm-up step, 1 process, CPU, fp32, AdamW, no grad clipping.

    ``prompt`` = 0 trains on every position of ``rows`` (off-policy); > 0 masks the first ``prompt`` tokens out of
    the labels and hands them to the trainer as the prompts that λ > 0 continues by ``new`` sampled tokens
    (temperature 1, top-p 1, top-k off). Returns seconds, steps, tokens, base (RSS after the warm-up), peak, and
    the trained student and the teacher (for a metric after the measurement)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from harness import _reset_peak_rss, _rss_bytes
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill_engine.data import load_tokenizer

    def collate(batch):
        ids = torch.tensor([b["ids"] for b in batch], dtype=torch.long)  # [B, L]
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :prompt] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompts": ids[:, :max(prompt, 1)],
                "prompt_attention_mask": mask[:, :max(prompt, 1)]}

    counted = {"tokens": 0}

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # after training_step's on-policy swap: these are the labels the loss sees
            counted["tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1:  # end of the warm-up step: reset the peak, start the clock
                gc.collect()
                _reset_peak_rss()
                marks.update(base=_rss_bytes("VmRSS"), t0=time.perf_counter(), tok0=counted["tokens"])
            marks["t1"] = time.perf_counter()

    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    cfg = GKDConfig(output_dir=os.path.join(workdir, "trl_out"), per_device_train_batch_size=mb, max_steps=steps + 1,
                    learning_rate=lr, lr_scheduler_type="constant", lmbda=lmbda, beta=beta, temperature=1.0,
                    max_new_tokens=max(new, 1), report_to="none", use_cpu=True, save_strategy="no",
                    logging_steps=1000, disable_dropout=True, max_grad_norm=0.0, seed=3, dataloader_num_workers=0)
    trainer = Counting(model=student, teacher_model=teacher, args=cfg, data_collator=collate,
                       train_dataset=Dataset.from_list([{"ids": r} for r in rows]),
                       processing_class=load_tokenizer(paths["student"], key="student"), callbacks=[Clock()])
    trainer.generation_config.top_k = 0
    trainer.generation_config.top_p = 1.0
    trainer.train()
    return {"seconds": marks["t1"] - marks["t0"], "steps": steps, "tokens": counted["tokens"] - marks["tok0"],
            "base": marks["base"], "peak": _rss_bytes("VmHWM"), "student": trainer.model, "teacher": teacher}
