"""Deterministic data-parallel micro-batches.

The order is a pure function of ``(seed, epoch)``, so a position in the run is one integer — the
micro-step counter, the same on every rank — and resuming needs nothing but that integer.

Epoch ``e`` visits the samples in ``permutation(seed, e)`` (or in order when not shuffling). It is cut into
*global* micro-batches of ``dp_size × micro_batch_size`` samples (an incomplete last one is dropped, so every
rank runs the same number of micro-steps — a ZeRO-3 forward is collective and no rank may skip one); rank
``r`` takes the ``r``-th slice of ``micro_batch_size`` samples of each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .dataset import TokenSamples

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One micro-batch of one rank. ``labels[b, t]`` is the target of position ``t`` (the next token)."""

    input_ids: torch.Tensor        # [B, L] int64
    attention_mask: Optional[torch.Tensor]  # [B, L] int64, None when there is no padding
    labels: torch.Tensor           # [B, L-1] int64, IGNORE_INDEX on padding
    sample_ids: torch.Tensor       # [B] int64: positions in the TokenSamples
    micro_step: int                # this rank's micro-step counter (identical on every rank)

    @property
    def valid_index(self) -> torch.Tensor:
        """[n] flat indices (into [B*(L-1)]) of the loss rows, in row-major order."""
        return (self.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)

    @property
    def n_valid(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels), self.sample_ids, self.micro_step)


class MicroBatchPlan:
    """Which samples rank ``dp_rank`` sees at micro-step ``t``, for any ``t``."""

    def __init__(self, num_samples: int, *, micro_batch_size: int, dp_size: int, dp_rank: int, seed: int,
                 shuffle: bool = True):
        if num_samples < dp_size * micro_batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global micro-batch "
                             f"(data-parallel ranks {dp_size} × train.micro_batch_size {micro_batch_size}); "
                             f"add data, or lower data.seq_len or train.micro_batch_size")
        self.n = num_samples
        self.mbs = micro_batch_size
        self.dp = dp_size
        self.rank = dp_rank
        self.seed = seed
        self.shuffle = shuffle
        self.per_epoch = num_samples // (dp_size * micro_batch_size)
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                self._perm = np.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.per_epoch

    def sample_ids(self, micro_step: int, dp_rank: Optional[int] = None) -> List[int]:
        r = self.rank if dp_rank is None else dp_rank
        epoch, g = divmod(micro_step, self.per_epoch)
        start = (g * self.dp + r) * self.mbs
        return [int(i) for i in self._order(epoch)[start:start + self.mbs]]


def collate(samples: TokenSamples, ids: List[int], micro_step: int, pad_id: int) -> Batch:
    seqs = [samples.sample(i) for i in ids]
    L = max(len(s) for s in seqs)
    inp = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        inp[b, :len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[b, :len(s)] = 1
    labels = inp[:, 1:].clone()
    labels[mask[:, 1:] == 0] = IGNORE_INDEX
    padded = bool((mask == 0).any())
    return Batch(inp, mask if padded else None, labels, torch.tensor(ids, dtype=torch.long), micro_step)


class MicroBatchStream:
    """Batches of one rank from a micro-step on; ``plan`` also serves the prefetchers (cache, stream)."""

    def __init__(self, samples: TokenSamples, plan: MicroBatchPlan, pad_id: int):
        self.samples = samples
        self.plan = plan
        self.pad_id = pad_id

    def batch(self, micro_step: int, dp_rank: Optional[int] = None) -> Batch:
        return collate(self.samples, self.plan.sample_ids(micro_step, dp_rank), micro_step, self.pad_id)
