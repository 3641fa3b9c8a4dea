"""The optimizer engine under the training loop: DeepSpeed (ZeRO 0-3, bf16/fp32, clipping, accumulation), or
a plain-PyTorch single-process engine used where DeepSpeed is not installed (a ZeRO-0 equivalent: AdamW,
the same warmup-cosine schedule, clipping and accumulation; checkpoints with torch.save).

Both take one ``backward`` and one ``step`` per micro-batch; the optimizer runs at the accumulation boundary.
Losses arrive already normalized by the optimizer step's token count, so neither engine rescales them.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Optional

import torch
from torch import nn

from ..data.io import atomic_write
from .config import Config


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup from 0 to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    return f


def make_optimizer(params, cfg: Config, device: torch.device):
    tr = cfg.train
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = {}
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps, **kw)


def deepspeed_config(cfg: Config, dp_size: int, hidden_size: Optional[int] = None) -> dict:
    """The DeepSpeed config of the run; ``train.deepspeed`` entries override every key set here.

    ``hidden_size`` (the student's) sizes ZeRO's communication buckets as transformers' ``"auto"`` does
    (reduce bucket d², ZeRO-3 prefetch bucket 0.9·d², parameters under 10·d elements kept whole). DeepSpeed's own
    defaults (5e8-element buckets) allocate a gradient bucket as large as a small model itself, which on a
    rank that holds 1/world of the states undoes most of what ZeRO-3 saves."""
    tr = cfg.train
    zero = {"stage": tr.zero_stage}
    if hidden_size and tr.zero_stage >= 2:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    if tr.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
        if hidden_size:
            zero.update({"stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                         "stage3_param_persistence_threshold": 10 * hidden_size})
    ds = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum * dp_size,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": tr.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, copy.deepcopy(tr.deepspeed))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _merge(base[k], v)
        else:
            base[k] = v
    return base


def quiet_deepspeed() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory CPU all-reduce at init (a 5-minute C++ build on first
    use, and only used by tensor-parallel inference), and from logging every step."""
    import importlib
    import logging

    # Not `import deepspeed.comm.torch as m`: deepspeed.comm's `torch` attribute is the torch package itself.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def init_deepspeed_comm(backend: str) -> None:
    """Point ``deepspeed.comm`` at the process group :func:`topology.setup` created, before anything asks it for
    the world size.

    Why: ``deepspeed.zero.Init`` (a ZeRO-3 student built partitioned, ``student.zero_init``) and a ZeRO-3 teacher
    read the data-parallel world size from ``deepspeed.comm`` while validating their config. Before
    ``deepspeed.initialize`` has run once in the process, ``deepspeed.comm`` is not initialized and reports a
    world of 1, so a ZeRO-3 run failed its batch-size check (``16 != 4 * 2 * 1``) in every fresh launch — and
    passed only in a process where an earlier run had initialized DeepSpeed. Idempotent.
    """
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("init_deepspeed_comm: torch.distributed must be initialized first (topology.setup)")
    if not ds_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    # DeepSpeed's view must agree with the group the run trains in (the students' group in stream mode).
    if ds_dist.get_world_size() != dist.get_world_size():
        raise RuntimeError(f"deepspeed.comm sees {ds_dist.get_world_size()} ranks but the run's process group has "
                           f"{dist.get_world_size()}: DeepSpeed was initialized on another group before this run")


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, module: nn.Module, cfg: Config, ds_config: dict, device: torch.device):
        import deepspeed

        opt = make_optimizer(module.parameters(), cfg, device)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
        self.device = self.engine.device
        self.module = self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss) -> None:
        # DeepSpeed hooks every forward output to divide its gradient by grad_accum unless the backward was
        # started by engine.backward, which it detects with a hook it registers on the tensor it is given.
        # When that tensor *is* the forward's output, the output hook fires first and ZeRO-0 gradients come out
        # divided by grad_accum; backpropagating from a fresh node (· 1.0) lets the engine's hook fire first.
        self.engine.backward(loss * 1.0, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()

    def train(self) -> None:
        self.engine.train()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> Optional[float]:
        try:
            g = self.engine.get_global_grad_norm()
        except Exception:
            return None
        if g is None:
            return None
        return float(g.item() if hasattr(g, "item") else g)

    def save_checkpoint(self, save_dir: str, tag: str) -> list:
        """Save; returns the files this rank wrote (DeepSpeed's checkpoint engine is wrapped to see them)."""
        ce = self.engine.checkpoint_engine
        written, orig = [], ce.save

        def save(state_dict, path, *a, **kw):
            written.append(path)
            return orig(state_dict, path, *a, **kw)

        ce.save = save
        try:
            self.engine.save_checkpoint(save_dir, tag=tag, client_state={}, save_latest=False)
        finally:
            del ce.save  # back to the class method
        return written

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        ce = self.engine.checkpoint_engine
        orig = ce.load

        def load(path, *a, **kw):
            try:
                return orig(path, *a, **kw)
            except Exception as e:  # truncated zip, EOF, garbage: name the file, not a zip-reader traceback
                raise ValueError(f"checkpoint file {path} is unreadable ({type(e).__name__}); it is corrupted or "
                                 f"truncated — delete its checkpoint directory to resume from an earlier one") from None

        ce.load = load
        try:
            path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            del ce.load
        if path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {tag!r} from {load_dir!r}")


class TorchEngine:
    """Single process, no ZeRO; bf16 precision uses autocast over fp32 master weights."""

    kind = "torch"

    def __init__(self, module: nn.Module, cfg: Config, device: torch.device):
        self.module = module.to(device)
        self.device = device
        self.cfg = cfg
        self.optimizer = make_optimizer(module.parameters(), cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio))
        self.micro = 0
        self._norm: Optional[float] = None
        self.autocast = cfg.train.precision == "bf16"

    def __call__(self, *args, **kwargs):
        if self.autocast:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.module(*args, **kwargs)
        return self.module(*args, **kwargs)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.cfg.train.grad_accum:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.cfg.train.grad_clip > 0:
            self._norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip))
        else:
            self._norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self) -> None:
        self.module.train()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> Optional[float]:
        return self._norm

    def save_checkpoint(self, save_dir: str, tag: str) -> list:
        path = os.path.join(save_dir, tag, "engine_state.pt")
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "micro": self.micro}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return [path]

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        path = os.path.join(load_dir, tag, "engine_state.pt")
        try:
            st = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:
            raise ValueError(f"checkpoint file {path} is unreadable ({type(e).__name__}); it is corrupted or "
                             f"truncated — delete its checkpoint directory to resume from an earlier one") from None
        self.module.load_state_dict(st["module"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.micro = st["micro"]
