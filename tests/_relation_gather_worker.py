"""Launched by tests/test_relation_loss.py as `torchrun --nproc_per_node 2 _relation_gather_worker.py OUT`:
each rank takes its (unequal) slice of a seeded global batch, computes relation_loss with
gather_across_ranks=True for every kind and saves (loss, grad of its own rows) to OUT/rank{r}.pt."""
import os
import sys

import torch
import torch.distributed as dist

from distill_engine.ops.relation import KINDS, relation_loss

SIZES = (5, 4)  # rows per rank: unequal on purpose
D_S, D_T = 6, 9


def global_batch():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(sum(SIZES), D_S, generator=g)
    t = torch.randn(sum(SIZES), D_T, generator=g)
    mask = torch.ones(sum(SIZES), dtype=torch.bool)
    mask[2] = False  # a dropped row on rank 0
    return s, t, mask


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    s, t, mask = global_batch()
    lo = sum(SIZES[:rank])
    sl = slice(lo, lo + SIZES[rank])
    res = {}
    for kind in KINDS:
        x = s[sl].clone().requires_grad_()
        loss = relation_loss(x, t[sl], kind=kind, temperature=0.5, mask=mask[sl], gather_across_ranks=True)
        loss.backward()
        res[kind] = (loss.detach(), x.grad.clone())
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # neither rank tears gloo down while its peer is still in a collective (SIGABRT at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
