"""Fused white-box distillation inside a Hugging Face ``Trainer`` (requires transformers + accelerate).

    from distill_engine.integrations.hf import FusedDistillationTrainer
    trainer = FusedDistillationTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
                                       teacher=teacher, k=64, divergence="forward_kl", temperature=1.0)
    trainer.train()

How ``compute_loss`` works (no [tokens × vocab] logits tensor is ever formed for the student):
  1. The teacher (frozen, eval mode, on the student's device, not a submodule of the student so the optimizer and
     the checkpoint never see it) runs to its final hidden states; :func:`teacher_targets` turns the rows that
     have a label into top-k (or sampled) ids and log-probabilities with the teacher's lm_head, chunked.
  2. The student runs through the (possibly DeepSpeed-wrapped) model with ``logits_to_keep`` = an empty index
     tensor, so its lm_head projects zero positions. A forward hook on the student's base model takes the final
     hidden states and calls a parameter-less child module (:class:`FusedHeadLoss`, shared with the engine's own
     trainer) that computes :func:`fused_distill_loss` with the student's lm_head *weight*.
  3. ZeRO-3 (``TrainingArguments(deepspeed=...)``): the hook runs inside the wrapped model's forward, and the
     lm_head weight (and bias) are registered as external parameters of that child module, so DeepSpeed gathers
     them for its forward and backward and reduce-scatters dW into the owning partitions. A teacher that was
     itself partitioned (built under ZeRO-3 ``zero.Init``) is gathered whole for its forward (it must fit on
     one device).

Labels follow the HF causal-LM convention: ``labels`` (default: ``input_ids`` with padding set to -100) are
shifted by one inside; rows whose label is -100 get no loss. The loss is the mean over labelled rows, or the
sum divided by ``num_items_in_batch`` when the Trainer supplies it (its gradient-accumulation convention).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch import nn
from transformers import Trainer

from ..ops.distill_loss import DistillOptions
from ..ops.teacher_targets import teacher_targets
from ..teacher.colocated import base_model_of, lm_head_of
from ..trainer.student import FusedHeadLoss

__all__ = ["FusedDistillationTrainer", "shifted_rows"]

_HEAD_NAME = "_distill_engine_head"


def shifted_rows(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                 ignore_index: int = -100):
    """Causal-LM rows: position t predicts token t+1. Returns (valid_index [n] into the [B·(L−1)] rows,
    labels of those rows [n])."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape)}; pass per-token causal-LM labels (-100 = no loss)")
    target = labels[:, 1:].reshape(-1)  # [B·(L−1)]
    valid_index = (target != ignore_index).nonzero().squeeze(1)  # [n]
    return valid_index, target.index_select(0, valid_index)


def _rows(x: torch.Tensor, valid_index: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return x[:, :-1].reshape(-1, d).index_select(0, valid_index)  # [n, d]


def _is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _vocab(weight: torch.Tensor) -> int:
    return int(weight.ds_shape[0]) if hasattr(weight, "ds_shape") else int(weight.shape[0])


class FusedDistillationTrainer(Trainer):
    """``transformers.Trainer`` whose ``compute_loss`` is the fused distillation loss against ``teacher``.

    Args (keyword-only, besides every ``Trainer`` argument):
        teacher: a causal LM with the student's vocabulary (its lm_head may differ in width).
        k: teacher slots per token. divergence / beta / temperature / ce_weight / tail: as in
            :func:`distill_engine.fused_distill_loss`. teacher_method: "topk" | "sample".
        backend: "auto" | "triton" | "cpu" | "torch" for both ops. validate: value checks in the ops (host syncs).
    """

    def __init__(self, model=None, args=None, *trainer_args, teacher: nn.Module, k: int = 64,
                 divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 ce_weight: float = 0.0, tail: str = "bucket", teacher_method: str = "topk",
                 backend: str = "auto", validate: bool = False, **trainer_kwargs):
        if model is None or not isinstance(model, nn.Module):
            raise ValueError("model must be a Hugging Face *ForCausalLM student (an nn.Module); got "
                             f"{type(model).__name__}")
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be a Hugging Face *ForCausalLM model, got {type(teacher).__name__}")
        DistillOptions(divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight,
                       tail=tail, backend=backend).check()  # fail here, not at the first batch
        if teacher_method not in ("topk", "sample"):
            raise ValueError(f"teacher_method must be 'topk' or 'sample', got {teacher_method!r}")
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"{type(model).__name__}.forward has no logits_to_keep argument; the fused trainer "
                             f"needs it to skip the student's [tokens × vocab] logits")
        v_s, v_t = _vocab(lm_head_of(model).weight), _vocab(lm_head_of(teacher).weight)
        if v_t > v_s:
            raise ValueError(f"teacher vocabulary ({v_t}) is larger than the student's ({v_s}); distillation "
                             f"needs a shared tokenizer (resize the student's embeddings to {v_t})")
        if not 1 <= k <= v_t:
            raise ValueError(f"k must be in [1, {v_t}] (the teacher's vocabulary), got {k}")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        # Teacher: frozen, eval mode, on the student's device; held on the trainer, so it is no submodule of the
        # model the optimizer and the checkpoint are built from.
        teacher.eval()
        teacher.requires_grad_(False)
        self._teacher_partitioned = _is_partitioned(teacher)
        if not self._teacher_partitioned:
            teacher.to(self.args.device)
        self.teacher = teacher
        self.k, self.teacher_method, self.backend, self.validate = k, teacher_method, backend, validate
        self.temperature = temperature
        student = self.model
        head = FusedHeadLoss(lm_head_of(student), divergence=divergence, beta=beta, temperature=temperature,
                             ce_weight=ce_weight, tail=tail, backend=backend, zero3=is_deepspeed_zero3_enabled())
        # A parameter-less child: the state dict is unchanged, and DeepSpeed (which builds its engine later, in
        # train()) installs its ZeRO-3 hooks on it like on any other submodule.
        student.add_module(_HEAD_NAME, head)
        self._pending = None  # (valid_index, ids, logprobs, rest, labels) while compute_loss runs the student
        self._loss = None
        base_model_of(student).register_forward_hook(self._on_final_hidden)

    # ---- the loss -------------------------------------------------------------------------------------------
    def _teacher_targets(self, input_ids, attention_mask, valid_index):
        t = self.teacher
        gather = contextlib.nullcontext()
        if self._teacher_partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(t.parameters()), modifier_rank=None)
        with torch.no_grad(), gather:
            out = base_model_of(t)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                   return_dict=True)
            head = lm_head_of(t)
            h = _rows(out.last_hidden_state, valid_index)  # [n, d_t]
            w = head.weight
            b = getattr(head, "bias", None)
            if h.dtype != w.dtype:  # e.g. an autocast context: the op wants one dtype
                h = h.to(w.dtype)
            tt = teacher_targets(h, w, self.k, bias=b, temperature=self.temperature, method=self.teacher_method,
                                 backend=self.backend, validate=self.validate)
        return tt.ids, tt.logprobs, tt.rest_logprob  # [n, k], [n, k], [n] exact rest log-mass (None: sampled)

    def _on_final_hidden(self, module, args, output):
        if self._pending is None:  # plain use of the model (eval, generate): nothing to do
            return None
        valid_index, ids, lps, rest, labels = self._pending
        hs = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # [B, L, d]
        head = getattr(self.accelerator.unwrap_model(self.model), _HEAD_NAME)
        self._loss, _ = head(_rows(hs, valid_index), ids, lps, labels, self.validate, False, rest)  # Σ over rows
        return None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        valid_index, labels = shifted_rows(input_ids, attention_mask, inputs.get("labels"))
        ids, lps, rest = self._teacher_targets(input_ids, attention_mask, valid_index)
        self._pending, self._loss = (valid_index, ids, lps, rest, labels), None
        try:
            # logits_to_keep = no position: the student's lm_head projects nothing; the hook computes the loss.
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
        finally:
            self._pending = None
        loss, self._loss = self._loss, None
        if loss is None:
            raise ValueError(f"{type(self.accelerator.unwrap_model(model)).__name__} did not run its base model "
                             f"(model.base_model) in forward; the fused trainer needs it to reach the final hidden "
                             f"states")
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            # the Trainer's convention: Σ / (labelled tokens of all accumulated micro-batches [and ranks])
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / max(int(valid_index.numel()), 1)
        return (loss, outputs) if return_outputs else loss
