"""One rank of the 2-rank Hugging Face Trainer + DeepSpeed ZeRO-3 run (``torchrun --nproc_per_node 2
_hf_trainer_worker.py OUT``); the assertions live in tests/test_integrations_hf.py::test_hf_trainer_zero3_two_ranks.

What a user writes: TrainingArguments(deepspeed=<ZeRO-3 dict>), the student and the teacher, then
FusedDistillationTrainer(...).train().
"""
import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from distill_engine.integrations.hf import FusedDistillationTrainer

V = 61


def cfg(hidden):
    return LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, initializer_range=0.2)


class Dataset(torch.utils.data.Dataset):
    """A learnable pattern: each row counts upward modulo V from a random start."""

    def __init__(self, n=64, L=12):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, V, (n, 1), generator=g)
        self.ids = (start + torch.arange(L)) % V  # [n, L]

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main(out):
    ds_config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_gather_16bit_weights_on_model_save": True},
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}}
    args = TrainingArguments(output_dir=os.path.join(out, "run"), deepspeed=ds_config, use_cpu=True,
                             per_device_train_batch_size=4, max_steps=8, learning_rate=3e-3, logging_steps=1,
                             report_to=[], save_strategy="no", ddp_backend="gloo", lr_scheduler_type="constant",
                             disable_tqdm=True, seed=0)
    import deepspeed

    # The teacher is built under ZeRO-3 zero.Init (as from_pretrained does once TrainingArguments(deepspeed=ZeRO-3)
    # exists), so it is partitioned over both ranks: the trainer must gather it for its forward. zero.Init needs
    # the process group first.
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    torch.manual_seed(1)
    teacher = LlamaForCausalLM._from_config(cfg(48))
    assert hasattr(teacher.lm_head.weight, "ds_id"), "the teacher was not partitioned by zero.Init"
    torch.manual_seed(0)
    student = LlamaForCausalLM(cfg(32))  # partitioned by the Trainer's deepspeed.initialize
    initial_head = student.lm_head.weight.detach().clone()  # [V, d] (untied): must be trained through the hook
    cb = Losses()
    trainer = FusedDistillationTrainer(model=student, args=args, train_dataset=Dataset(), teacher=teacher, k=8,
                                       divergence="forward_kl", temperature=1.0, ce_weight=0.5, callbacks=[cb])
    trainer.train()
    assert hasattr(student.lm_head.weight, "ds_id"), "ZeRO-3 did not partition the student"
    trainer.save_model(os.path.join(out, "saved"))

    with deepspeed.zero.GatheredParameters([student.lm_head.weight], modifier_rank=None):  # collective: all ranks
        trained_head = student.lm_head.weight.detach().clone()  # [V, d] the full trained lm_head
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # load the saved student the way a user would afterwards: plain, one process
    if trainer.is_world_process_zero():
        reloaded = LlamaForCausalLM.from_pretrained(os.path.join(out, "saved"))
        with torch.no_grad():
            logits = reloaded(input_ids=Dataset().ids[:2]).logits
        # the saved file holds the trained (gathered) weights, not a partition or the initial values
        diff = (reloaded.lm_head.weight - trained_head).abs().max().item()
        res = {"losses": cb.losses, "reloaded_max_abs_diff": diff,
               "head_change": (trained_head - initial_head).abs().max().item(),
               "param_count": sum(p.numel() for p in reloaded.parameters()),
               "finite_logits": bool(torch.isfinite(logits).all())}
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
