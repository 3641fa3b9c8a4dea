"""Which ranks share a file system: the run's storage layout, found by probing, never assumed.

A multi-node job may write ``output_dir`` to one shared file system (NFS, Lustre) or to each node's local
disk under the same path. Checkpoints must work in both: a file that only global rank 0 writes (the trainer
state, ``latest``, DeepSpeed's ZeRO-0/1/2 module states) would be missing on every other node at resume.

The probe. Every student rank creates ``output_dir/.fs-probe-<nonce>/rank<r>`` (the nonce is rank 0's, sent to
all, so a stale probe from another run is never read), then, after a barrier, lists that directory: the ranks
it sees share its file system. The lowest of them is that file system's *writer*: it finalizes checkpoints
there (staging rename, ``trainer_state.json``, ``latest``, pruning). The layout is *shared* when every rank
sees every other; otherwise DeepSpeed is told ``checkpoint.use_node_local_storage`` so local rank 0 of each
node writes the module states that a ZeRO-0/1/2 resume reads on every rank.

Global rank 0 alone writes the run's outputs that nothing reads back across ranks: ``metrics.jsonl``,
``config.json``, TensorBoard events and ``final/`` land on global rank 0's node.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from typing import List

import torch.distributed as dist


@dataclass(frozen=True)
class StorageLayout:
    rank: int              # this rank in the students' group
    world: int
    group: List[int]       # ranks that see this rank's file system (sorted; includes ``rank``)
    shared: bool           # every rank sees one file system

    @property
    def is_writer(self) -> bool:
        """The lowest rank on this file system finalizes what must exist once per file system."""
        return self.group[0] == self.rank


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def probe(output_dir: str) -> StorageLayout:
    """Collective over the default (students') group: every rank must call it with the same ``output_dir``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return StorageLayout(0, 1, [0], True)
    nonce = _gather(uuid.uuid4().hex if rank == 0 else None)[0]
    root = os.path.join(os.path.abspath(output_dir), f".fs-probe-{nonce}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"rank{rank}"), "w") as f:
        f.write(str(rank))
    dist.barrier()
    seen = sorted(int(n[4:]) for n in os.listdir(root) if n.startswith("rank") and n[4:].isdigit())
    groups = _gather(seen)
    dist.barrier()  # everyone has listed the probe before any writer removes it
    if seen[0] == rank:
        shutil.rmtree(root, ignore_errors=True)
    if rank not in seen or any(sorted(set(g)) != g for g in groups):
        raise RuntimeError(f"file-system probe of {output_dir!r} is inconsistent: {groups}")
    return StorageLayout(rank, world, seen, shared=all(len(g) == world for g in groups))
