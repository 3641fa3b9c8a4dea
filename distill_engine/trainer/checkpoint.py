"""Checkpoints you can trust: the engine's state (DeepSpeed: module, ZeRO optimizer partitions, LR scheduler)
plus what makes a resume continue bit for bit — the data position (optimizer step; the data order is a pure
function of it), every rank's RNG states — and the final student as a normal Hugging Face model.

Layout under ``output_dir/checkpoints``::

    latest                      # a hint: the tag of the newest checkpoint (resume scans the step dirs anyway)
    step00000040/               # DeepSpeed's files, trainer_state.json (rank 0), rng/rank{r}.pt
    step00000040/manifest/rank{r}.json   # written LAST, atomically, by rank r: {file: {size, sha256}}
    step00000020.corrupt/       # a checkpoint that failed verification, moved aside (never loaded again)

No shared file system is assumed. Each rank records the files *it* wrote (DeepSpeed's checkpoint engine is
wrapped to see them), fsyncs them, and then writes its manifest with their sizes and sha256. A checkpoint is
complete only when every rank's manifest is present: a run killed mid-save leaves a directory without some
manifest, which is never loaded. On resume every rank verifies its own manifest (``run.verify_checkpoint``:
``full`` hashes, ``size`` sizes only, ``none`` presence only); the ranks agree with one all-reduce, and the
newest checkpoint good on every rank is loaded. A bad one is reported in one line naming the file, moved
aside, and the next older complete checkpoint is tried. Pruning keeps the ``keep`` newest complete checkpoints
and never the one just written.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..data.io import atomic_replace_dir, atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree, sha256_file

STATE_FILE = "trainer_state.json"
MANIFEST_DIR = "manifest"
_TAG_RE = re.compile(r"^step(\d{8})$")

# Settings that change the data order or the math: a resume with any of them changed would not continue the
# run it claims to continue (the world size is checked separately).
RESUME_KEYS = ("run.seed", "data.seq_len", "data.packing", "data.add_eos", "data.shuffle", "data.max_samples",
               "data.train_files", "train.micro_batch_size", "train.grad_accum", "loss.divergence", "loss.beta",
               "loss.temperature", "loss.ce_weight", "loss.tail", "loss.features", "teacher.k", "teacher.method",
               "loss.on_policy")


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _warn(msg: str) -> None:
    sys.stderr.write(f"distill-engine: warning: {msg}\n")
    sys.stderr.flush()


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def step_tags(root: str) -> List[str]:
    """Every ``stepNNNNNNNN`` directory under ``root``, newest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    return sorted((t for t in os.listdir(root) if _TAG_RE.match(t) and os.path.isdir(os.path.join(root, t))),
                  reverse=True)


def is_complete(tag_dir: str, world: Optional[int] = None, ranks: Optional[List[int]] = None) -> bool:
    """Every rank's manifest is present (as seen from this file system). ``ranks``: the ranks that write to this
    file system (:class:`~.storage.StorageLayout.group`; nodes with local disks each hold their own ranks')."""
    mdir = os.path.join(tag_dir, MANIFEST_DIR)
    try:
        names = os.listdir(mdir)
    except OSError:
        return False
    if ranks is not None:
        return all(f"rank{r}.json" in names for r in ranks)
    if world is None:
        try:
            with open(os.path.join(mdir, "rank0.json"), encoding="utf-8") as f:
                world = int(json.load(f)["world"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return all(f"rank{r}.json" in names for r in range(world))


def latest_tag(output_dir: str, ranks: Optional[List[int]] = None) -> Optional[str]:
    """The newest complete step directory (by scanning; ``latest`` is only a hint). No hashes are checked."""
    root = checkpoint_root(output_dir)
    for t in step_tags(root):
        if is_complete(os.path.join(root, t), ranks=ranks):
            return t
    return None


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


# ---------------------------------------------------------------------------------------------- saving
def _file_entry(path: str) -> Dict[str, object]:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def save(engine, output_dir: str, step: int, trainer_state: dict, *, rank: int, world: int, keep: int = 2,
         writer: Optional[bool] = None, ranks: Optional[List[int]] = None) -> str:
    """Write checkpoint ``step`` from every rank; returns its directory. Collective over the student ranks.

    ``writer``: this rank writes what each file system needs once (``trainer_state.json``, ``latest``) and prunes
    there; ``ranks``: the ranks writing to this rank's file system. Both come from the trainer's probed
    :class:`~.storage.StorageLayout`; the defaults (rank 0, all ranks) fit one shared file system."""
    writer = rank == 0 if writer is None else writer
    root = checkpoint_root(output_dir)
    tag = tag_of(step)
    tag_dir = os.path.join(root, tag)
    manifest = os.path.join(tag_dir, MANIFEST_DIR, f"rank{rank}.json")
    # Re-saving a step (after a fallback resume): the old copy stops counting as complete before any file of
    # the new one is written.
    if os.path.exists(manifest):
        os.unlink(manifest)
    _barrier()
    if writer and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir, ignore_errors=True)
    _barrier()
    os.makedirs(tag_dir, exist_ok=True)
    written = list(engine.save_checkpoint(root, tag) or [])
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    rng_path = os.path.join(tag_dir, "rng", f"rank{rank}.pt")
    atomic_write_bytes(rng_path, buf.getvalue())
    written.append(rng_path)
    if writer:  # one copy per file system: every node resumes from its own disk
        state = dict(trainer_state, step=step, world_size=world, tag=tag)
        atomic_write_json(os.path.join(tag_dir, STATE_FILE), state)
        written.append(os.path.join(tag_dir, STATE_FILE))
    files = {}
    for p in written:
        p = os.path.abspath(p)
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
        files[os.path.relpath(p, tag_dir)] = _file_entry(p)
    for d in sorted({os.path.dirname(os.path.join(tag_dir, rel)) for rel in files} | {tag_dir}):
        fsync_dir(d)  # only this rank's files: peers on a shared file system are still writing theirs
    atomic_write_json(manifest, {"rank": rank, "world": world, "step": step, "tag": tag, "files": files})
    _barrier()  # every manifest is written: the checkpoint is complete
    if writer:  # once per file system: no shared file system is assumed
        atomic_write_bytes(os.path.join(root, "latest"), (tag + "\n").encode())
        prune(root, keep, tag, ranks=ranks)
    _barrier()
    return tag_dir


def prune(root: str, keep: int, current: str, ranks: Optional[List[int]] = None) -> None:
    """Delete step directories older than the ``keep`` newest complete ones; never ``current``."""
    if keep <= 0:
        return
    tags = step_tags(root)
    keep_set = set([t for t in tags if is_complete(os.path.join(root, t), ranks=ranks)][:keep]) | {current}
    for t in tags:
        if t not in keep_set and t < current:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- resuming
def verify_own(tag_dir: str, rank: int, mode: str) -> Tuple[bool, str, Optional[int]]:
    """Check rank ``rank``'s manifest of ``tag_dir`` and the files it lists. Returns (ok, reason, world)."""
    mpath = os.path.join(tag_dir, MANIFEST_DIR, f"rank{rank}.json")
    if not os.path.isfile(mpath):
        return False, f"{mpath} is missing (the save did not finish)", None
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
        files, world = dict(man["files"]), int(man["world"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"{mpath} is unreadable ({type(e).__name__})", None
    for rel, ent in sorted(files.items()):
        p = os.path.join(tag_dir, rel)
        if not os.path.isfile(p):
            return False, f"{p} is missing", world
        if mode in ("size", "full") and os.path.getsize(p) != int(ent["size"]):
            return False, f"{p} has {os.path.getsize(p)} bytes, the manifest says {ent['size']}", world
        if mode == "full" and sha256_file(p) != ent["sha256"]:
            return False, f"{p} does not match its sha256 in the manifest (corrupted)", world
    try:  # every rank reads the trainer state of its own file system at load
        read_state(tag_dir)
    except ValueError:
        return False, f"{os.path.join(tag_dir, STATE_FILE)} is unreadable or truncated", world
    return True, "", world


def read_state(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint file {path} is unreadable or truncated ({type(e).__name__}: {e}); delete "
                         f"that checkpoint directory to resume from an earlier one") from None
    return state


def _agree(code: int, device) -> int:
    """The minimum of ``code`` over the student ranks."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([code], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
    return code


def select_resume(output_dir: str, *, rank: int, world: int, mode: str = "full",
                  device=None, writer: Optional[bool] = None, ranks: Optional[List[int]] = None) -> Optional[str]:
    """The newest checkpoint complete and verified on every rank (collective), or None. Bad ones are reported
    with one warning line naming the file and moved aside; a world-size change is refused."""
    writer = rank == 0 if writer is None else writer
    root = checkpoint_root(output_dir)
    hint = os.path.join(root, "latest")
    tags = step_tags(root)
    if rank == 0 and tags and os.path.isfile(hint):
        named = open(hint, encoding="utf-8", errors="replace").read().strip()
        if named not in tags:
            _warn(f"{hint} names {named[:40]!r}, which is no checkpoint here; scanning the step directories")
    n = _agree(len(tags), device)  # every rank walks the same candidates (a rank may see fewer locally)
    for i in range(n):
        tag = tags[i] if i < len(tags) else None
        ok, reason, saved_world = (False, "no such directory on this rank", None) if tag is None else \
            verify_own(os.path.join(root, tag), rank, mode)
        # 2: good here; 1: bad here (fall back); 0: written by another number of ranks (refuse)
        code = 0 if saved_world is not None and saved_world != world else (2 if ok else 1)
        agreed = _agree(code, device)
        if agreed == 0:
            raise ValueError(f"checkpoint {tag} in {root} was written by {saved_world or 'another number of'} "
                             f"data-parallel ranks but this run has {world}; resume with the same number of "
                             f"student ranks")
        if agreed == 2:
            return tag
        if code == 1 and tag is not None:
            _warn(f"checkpoint {tag} is not usable: {reason}; falling back to the previous complete checkpoint")
        if writer and tag is not None and is_complete(os.path.join(root, tag), ranks=ranks):
            _move_aside(root, tag)  # complete but corrupted somewhere: never a candidate again
    return None


def _move_aside(root: str, tag: str) -> None:
    dst = os.path.join(root, tag + ".corrupt")
    shutil.rmtree(dst, ignore_errors=True)
    try:
        os.replace(os.path.join(root, tag), dst)
    except OSError:
        pass


def check_resume_config(state: dict, current: Dict[str, object], tag_dir: str) -> None:
    """Refuse a resume whose data-order / math settings differ from the checkpoint's (listing the keys)."""
    saved = state.get("resume_config")
    if not isinstance(saved, dict):
        return
    changed = [k for k in RESUME_KEYS if k in saved and json.dumps(saved[k], sort_keys=True, default=str)
               != json.dumps(current.get(k), sort_keys=True, default=str)]
    if changed:
        what = ", ".join(f"{k} ({saved[k]!r} -> {current.get(k)!r})" for k in changed)
        raise ValueError(f"resuming {tag_dir} with changed settings that alter the data order or the loss: {what}; "
                         f"restore them, or pass --allow-config-change (run.allow_config_change: true) to continue "
                         f"anyway without the bit-exact resume guarantee")


def resume_config(cfg) -> Dict[str, object]:
    d = cfg.to_dict()
    out = {}
    for k in RESUME_KEYS:
        sec, key = k.split(".")
        out[k] = d[sec][key]
    return json.loads(json.dumps(out, default=str))


def _open_state(path: str):
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # truncated zip, EOF, garbage: name the file
        raise ValueError(f"checkpoint file {path} is unreadable ({type(e).__name__}); it is corrupted or "
                         f"truncated — delete its checkpoint directory to resume from an earlier one") from None


def load(engine, output_dir: str, *, rank: int, world: int, tag: str) -> dict:
    """Load checkpoint ``tag`` (chosen by :func:`select_resume`) into ``engine`` and restore this rank's RNG."""
    root = checkpoint_root(output_dir)
    tag_dir = os.path.join(root, tag)
    state = read_state(tag_dir)
    if state.get("world_size") != world:
        raise ValueError(f"checkpoint {tag} was written by {state.get('world_size')} data-parallel ranks but this run "
                         f"has {world}; resume with the same number of student ranks")
    engine.load_checkpoint(root, tag)
    set_rng_state(_open_state(os.path.join(tag_dir, "rng", f"rank{rank}.pt")))
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
