"""Checkpoints: the engine's state (DeepSpeed: module, ZeRO optimizer partitions, LR scheduler) plus what
makes a resume continue bit for bit — the data position (optimizer step; the data order is a pure function
of it), every rank's RNG states — and the final student as a normal Hugging Face model.

Layout under ``output_dir/checkpoints``::

    latest                  # the tag of the newest complete checkpoint (replaced atomically)
    step00000040/           # DeepSpeed's files, trainer_state.json, rng/rank{r}.pt
    .staging-step00000040/  # exists only while a save is in progress

A save writes everything into the staging directory, fsyncs it, moves the tag directory into place with one
rename, then replaces ``latest``. A run killed mid-save leaves ``latest`` on the previous checkpoint.

No shared file system is assumed: the staging directory is created, finalized and pruned by the *writer* of
each file system (:mod:`.storage` probes which ranks share one), so on nodes with local disks every node holds a
complete checkpoint of its own ranks' files, its own ``trainer_state.json`` and ``latest``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data.io import atomic_replace_dir, atomic_write_bytes, atomic_write_json, fsync_tree

STATE_FILE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def latest_tag(output_dir: str) -> Optional[str]:
    path = os.path.join(checkpoint_root(output_dir), "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path, encoding="utf-8").read().strip()
    if not tag or not os.path.isfile(os.path.join(checkpoint_root(output_dir), tag, STATE_FILE)):
        return None
    return tag


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(engine, output_dir: str, step: int, trainer_state: dict, *, rank: int, world: int, keep: int = 2,
         writer: Optional[bool] = None) -> str:
    """Collective. ``writer``: this rank finalizes the checkpoint on its file system (default: ``rank == 0``,
    right for one shared file system; the trainer passes its probed :class:`~.storage.StorageLayout`'s)."""
    writer = rank == 0 if writer is None else writer
    root = checkpoint_root(output_dir)
    tag = f"step{step:08d}"
    staging = os.path.join(root, f".staging-{tag}")
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging, exist_ok=True)
    _barrier()
    engine.save_checkpoint(staging, tag)
    import io

    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    atomic_write_bytes(os.path.join(staging, tag, "rng", f"rank{rank}.pt"), buf.getvalue())
    _barrier()
    if writer:
        state = dict(trainer_state, step=step, world_size=world, tag=tag)
        atomic_write_json(os.path.join(staging, tag, STATE_FILE), state)
        fsync_tree(os.path.join(staging, tag))
        atomic_replace_dir(os.path.join(staging, tag), os.path.join(root, tag))
        atomic_write_bytes(os.path.join(root, "latest"), (tag + "\n").encode())
        shutil.rmtree(staging, ignore_errors=True)
        _prune(root, keep, tag)
    _barrier()
    return os.path.join(root, tag)


def _prune(root: str, keep: int, current: str) -> None:
    if keep <= 0:
        return
    tags = sorted(t for t in os.listdir(root) if t.startswith("step") and os.path.isdir(os.path.join(root, t)))
    for t in tags[:-keep]:
        if t != current:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def load(engine, output_dir: str, *, rank: int, world: int, tag: Optional[str] = None) -> dict:
    root = checkpoint_root(output_dir)
    tag = tag or latest_tag(output_dir)
    if tag is None:
        raise ValueError(f"run.resume is set but {root!r} holds no complete checkpoint; start without --resume "
                         f"(or set run.resume: auto)")
    with open(os.path.join(root, tag, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    if state.get("world_size") != world:
        raise ValueError(f"checkpoint {tag} was written by {state.get('world_size')} data-parallel ranks but this run "
                         f"has {world}; resume with the same number of student ranks")
    engine.load_checkpoint(root, tag)
    rng_path = os.path.join(root, tag, "rng", f"rank{rank}.pt")
    set_rng_state(torch.load(rng_path, weights_only=False))
    return state


def save_final_model(model, tokenizer, out_dir: str, *, rank: int, zero3: bool) -> Optional[str]:
    """``save_pretrained`` of the student (+ tokenizer) into ``out_dir``, atomically; ZeRO-3 partitions are
    gathered one parameter at a time onto rank 0, so no rank ever holds two full copies."""
    state_dict = None
    if zero3:
        import deepspeed

        state_dict = {}
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    state_dict[name] = p.detach().cpu().clone()
        if rank == 0:
            for name, b in model.named_buffers():
                state_dict.setdefault(name, b.detach().cpu().clone())
    path = None
    if rank == 0:
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(out_dir)}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        atomic_replace_dir(tmp, out_dir)
        path = out_dir
    _barrier()
    return path
