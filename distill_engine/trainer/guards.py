"""What keeps a run from failing silently: the resume point (verified checkpoints, unchanged settings), the
per-step agreement on non-finite losses and preemption signals, and the exceptions that carry exit codes.

Per optimizer step the student ranks all-reduce one small vector ``[local loss sum, stop requested]``: every
rank then sees the same verdict at the same step, so they stop together (a checkpoint is a collective).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Optional, Tuple

import torch

from ..loading import WEIGHT_FILES
from . import checkpoint as ckpt

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect of a job that stopped on their signal

# Launchers forward the signal they receive to their workers, so a worker often gets the same signal twice
# within milliseconds (e.g. the scheduler signals the whole process group, torchrun forwards it again). Only
# a second signal later than this counts as "stop now".
SECOND_SIGNAL_AFTER_S = 2.0


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm; the last good checkpoint is kept."""

    exit_code = EXIT_NON_FINITE


class Preempted(RuntimeError):
    """A SIGTERM/SIGINT stopped the run after a checkpoint was written."""

    exit_code = EXIT_PREEMPTED


# ---------------------------------------------------------------------------------------------- resume point
def resume_point(cfg, topo, rank: int, world: int, device, layout=None) -> Tuple[int, Optional[str]]:
    """(start step, checkpoint tag or None) for ``run.resume``. Student ranks agree on the newest checkpoint
    verified on all of them; stream-mode teacher ranks read the step student rank 0 publishes in the store."""
    out = cfg.run.output_dir
    key = "de/resume_step"  # not the path: nodes with local disks may each use another output_dir
    if getattr(topo, "role", "student") == "teacher":
        return int(topo.store.get(key).decode()), None
    tag = ckpt.select_resume(out, rank=rank, world=world, mode=cfg.run.verify_checkpoint, device=device,
                             writer=layout.is_writer if layout is not None else None,
                             ranks=layout.group if layout is not None else None)
    if tag is None:
        if cfg.run.resume is True:
            raise ValueError(f"run.resume is set but {ckpt.checkpoint_root(out)!r} holds no complete checkpoint; "
                             f"start without --resume (or use --resume auto)")
        step = 0
    else:
        step = int(tag[4:])
        refusal = ""
        tag_dir = os.path.join(ckpt.checkpoint_root(out), tag)
        if not cfg.run.allow_config_change and os.path.isfile(os.path.join(tag_dir, ckpt.STATE_FILE)):
            try:
                ckpt.check_resume_config(ckpt.read_state(tag_dir), ckpt.resume_config(cfg), tag_dir)
            except ValueError as e:
                refusal = str(e)
        if ckpt._agree(0 if refusal else 1, device) == 0:
            raise ValueError(refusal or f"resuming {tag_dir}: student rank 0 refused the changed settings (see "
                                        f"its message)")
    if getattr(topo, "teacher_ranks", 0) and rank == 0 and topo.store is not None:
        topo.store.set(key, str(step))
    return step, tag


# ---------------------------------------------------------------------------------------------- per-step checks
def agree_step(local_loss_sum: float, stop: bool, device) -> Tuple[float, bool]:
    """One all-reduce: (global loss sum of the step, whether any rank was asked to stop)."""
    import torch.distributed as dist

    t = torch.tensor([local_loss_sum, 1.0 if stop else 0.0], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t[0]), bool(t[1] > 0)


def non_finite_message(step: int, loss_sum: float, grad_norm: Optional[float], *, first_step: bool,
                       bad_targets: bool, last_ckpt: Optional[str]) -> str:
    what = (f"loss is {loss_sum}" if not math.isfinite(loss_sum) else f"gradient norm is {grad_norm}")
    if bad_targets:
        cause = "the teacher targets hold NaN/+inf or positive log-probs (check the teacher or its cache)"
    elif first_step:
        cause = ("the student's weights hold a non-finite value (corrupted model or checkpoint) or the inputs "
                 "overflow; rerun with loss.validate: always to name the tensor")
    elif not math.isfinite(loss_sum):
        cause = "training diverged (lower train.lr or set train.grad_clip > 0); rerun with loss.validate: always"
    else:
        cause = "the gradients overflowed (lower train.lr or set train.grad_clip > 0)"
    kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written by this run"
    return (f"non-finite values at optimizer step {step}: the {what}; likely cause: {cause}; stopped without "
            f"writing final/, {kept}")


def targets_bad(logprobs: Optional[torch.Tensor]) -> bool:
    """NaN, +inf or > 0 among the teacher's log-probs ([N, k]; -inf marks empty slots)."""
    if logprobs is None or logprobs.numel() == 0:
        return False
    lp = logprobs.float()
    return bool(torch.isnan(lp).any() or (lp > 0).any())


# ---------------------------------------------------------------------------------------------- preemption
class PreemptionHandler:
    """SIGTERM/SIGINT set :attr:`requested` (the loop checkpoints at the end of the current optimizer step
    and exits 143); a second signal more than :data:`SECOND_SIGNAL_AFTER_S` later exits at once."""

    def __init__(self):
        self.requested: Optional[int] = None
        self._t = 0.0
        self._old = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._t = signum, now
            sys.stderr.write(f"distill-engine: {signal.Signals(signum).name} received: finishing the current "
                             f"optimizer step and writing a checkpoint (signal again to stop at once)\n")
            sys.stderr.flush()
        elif now - self._t > SECOND_SIGNAL_AFTER_S:
            sys.stderr.write(f"distill-engine: second {signal.Signals(signum).name}: stopping now without a "
                             f"checkpoint\n")
            sys.stderr.flush()
            os._exit(EXIT_PREEMPTED)

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


# ---------------------------------------------------------------------------------------------- pre-flight
# Checked before any model is built, so a typo costs a second, not a model load.
def check_output_dir(path: str, key: str = "run.output_dir") -> None:
    """``path`` is a writable directory, or can be created as one."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise ValueError(f"{key}: {path!r} is a file, not a directory; choose another output directory")
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{key}: {path!r} cannot be created: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{key}: {path!r} is not writable ({probe!r} denies write permission); choose another "
                         f"output directory")


def check_safetensors(path: str, key: str) -> None:
    """The header parses and the file is as long as its tensors say (a truncated download/copy is named)."""
    import json
    import struct

    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError
            header = json.loads(f.read(n))
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0])
    except (ValueError, KeyError, TypeError, struct.error):
        raise ValueError(f"{key}: {path} is not a readable safetensors file (corrupted or truncated); re-save or "
                         f"re-copy the model") from None
    if 8 + n + end != size:
        raise ValueError(f"{key}: {path} is truncated or padded ({size} bytes, its header describes {8 + n + end}); "
                         f"re-save or re-copy the model")


def check_model_files(path: str, key: str) -> None:
    """A Hugging Face model directory with config.json and complete weights."""
    import json

    if not os.path.isdir(path):
        raise ValueError(f"{key}: {path!r} is not a directory; pass a directory written by save_pretrained")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{key}: {path!r} has no config.json; pass a directory written by save_pretrained")
    present = [w for w in WEIGHT_FILES if os.path.isfile(os.path.join(path, w))]
    if not present:
        raise ValueError(f"{key}: {path!r} holds config.json but no weights ({' / '.join(WEIGHT_FILES[::2])}); copy "
                         f"the weight files too")
    shards = []
    if "model.safetensors" in present:
        shards = ["model.safetensors"]
    elif "model.safetensors.index.json" in present:
        idx = os.path.join(path, "model.safetensors.index.json")
        try:
            shards = sorted(set(json.load(open(idx, encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{key}: {idx} is unreadable or truncated; re-save the model") from None
    for s in shards:
        sp = os.path.join(path, s)
        if not os.path.isfile(sp):
            raise ValueError(f"{key}: {sp} is missing (listed in the model's index); copy every shard")
        check_safetensors(sp, key)


def check_init(init, key: str) -> None:
    """``init`` builds a model config: its ``model_type`` (default llama) picks the config class, every key must be
    known to that class (no typos), and the values must be ones it accepts."""
    if init is None:
        return
    from .families import init_config

    cfg = init_config(init, key[:-len(".init")] if key.endswith(".init") else key)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        v = getattr(cfg, name, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{key}.{name} must be a positive integer, got {v!r}")
    kv, heads = getattr(cfg, "num_key_value_heads", None), getattr(cfg, "num_attention_heads", None)
    if isinstance(kv, int) and isinstance(heads, int) and (kv < 1 or heads % kv):
        raise ValueError(f"{key}.num_key_value_heads={kv!r} must be a positive divisor of num_attention_heads={heads}")
    hidden = getattr(cfg, "hidden_size", None)
    if ("head_dim" not in init and isinstance(hidden, int) and isinstance(heads, int) and heads > 0
            and hidden % heads):
        raise ValueError(f"{key}.hidden_size={hidden} is not divisible by num_attention_heads={heads}")


def preflight(cfg) -> None:
    """Every check that needs no model: output directory, model directories, init dicts."""
    check_output_dir(cfg.run.output_dir)
    check_init(cfg.student.init, "student.init")
    check_init(cfg.teacher.init, "teacher.init")
    if cfg.student.path is not None:
        check_model_files(cfg.student.path, "student.path")
    if cfg.teacher.path is not None and cfg.teacher.source in ("colocated", "stream"):
        check_model_files(cfg.teacher.path, "teacher.path")
