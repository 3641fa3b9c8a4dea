"""``distill-engine cache-teacher``: run the frozen teacher once over the run's dataset and write the packed
targets to a sharded, checksummed, resumable cache (format in :mod:`distill_engine.teacher.cache`).

It reads the same config as ``train`` (teacher, data, loss.temperature, teacher.k / method / logprob_dtype,
teacher.cache_dir), so the cache it writes is exactly the one that config's ``teacher.source: cache`` run
accepts. Launch it like training (``torchrun``/``deepspeed`` for several ranks; shards are split among them).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional

from ..data.tokenizer import check_shared_vocab, tokenizer_for_model
from ..teacher import topology
from ..teacher.cache import manifest_fields, model_fingerprint, write_cache
from .config import load_config
from .loop import build_data, load_teacher_runner, resolve_device, resolve_tokenizer, seed_everything


def cache_teacher(config: Any, overrides=None, out_dir: Optional[str] = None) -> Dict[str, Any]:
    cfg = load_config(config, overrides, check=False)
    if out_dir is not None:
        cfg.teacher.cache_dir = out_dir
    if not cfg.teacher.cache_dir:
        raise ValueError("teacher.cache_dir is not set; pass --out DIR or set teacher.cache_dir")
    if cfg.teacher.path is None and cfg.teacher.init is None:
        raise ValueError("cache-teacher needs teacher.path (the model that computes the targets)")
    if not cfg.data.train_files:
        raise ValueError("data.train_files is empty; list the files the cache is computed over")
    topo = topology.setup(timeout_s=cfg.train.dist_timeout_s, heartbeat_timeout_s=cfg.train.heartbeat_timeout_s)
    try:
        return _run(cfg, topo)
    except BaseException as exc:
        topology.report_failure(exc)
        raise


def _run(cfg, topo) -> Dict[str, Any]:
    t0 = time.time()
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg, topo)
    if cfg.teacher.zero3:
        from .engine import quiet_deepspeed

        quiet_deepspeed()
    tokenizer = resolve_tokenizer(cfg) if (cfg.data.tokenizer or cfg.student.path) else None
    if tokenizer is None:
        from ..data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.teacher.path, key="teacher.path")
    samples = build_data(cfg, tokenizer)
    runner, tmodel = load_teacher_runner(cfg, device)
    check_shared_vocab(tokenizer, tmodel.config, teacher_tokenizer=tokenizer_for_model(cfg.teacher.path))
    fp = model_fingerprint(cfg.teacher.path, cfg.teacher.init, cfg.teacher.init_seed)
    fields = manifest_fields(cfg, tokenizer, samples, fp)
    log = (lambda m: sys.stderr.write(f"[distill-engine] {m}\n")) if topo.rank == 0 else (lambda m: None)
    man = write_cache(cfg.teacher.cache_dir, runner=runner, samples=samples, fields=fields,
                      pad_id=tokenizer.pad_token_id, batch_size=cfg.teacher.batch_size or cfg.train.micro_batch_size,
                      shard_samples=cfg.teacher.cache_shard_samples, logprob_dtype=cfg.teacher.logprob_dtype,
                      vocab_size=int(tmodel.config.vocab_size), bitpack_ids=cfg.teacher.bitpack_ids,
                      rank=topo.rank, world=topo.world_size, zero3=cfg.teacher.zero3, device=device,
                      teacher_info={"path": cfg.teacher.path, "init": cfg.teacher.init}, log=log)
    rows = int(sum(samples.rows(i) for i in range(len(samples))))
    return {"cache_dir": cfg.teacher.cache_dir, "samples": man["num_samples"], "shards": len(man["shards"]),
            "bytes": man["bytes"], "bytes_per_token": man["bytes"] / max(rows, 1), "k": man["k"],
            "elapsed_s": time.time() - t0}
