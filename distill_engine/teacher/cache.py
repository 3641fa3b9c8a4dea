"""The offline teacher cache: written once by ``distill-engine cache-teacher``, streamed during training.

Layout of a cache directory::

    manifest.json            # written last: its presence marks a complete cache
    index.npy                # int64 [num_samples, 4]: shard, byte offset, byte length, rows
    shard-00000.bin ...      # per-sample packed targets (``de.pack_targets`` bytes) back to back
    progress/meta.json       # the settings a partial cache was started with
    progress/shard-00000.json  # per finished shard: sha256, size, its samples' index rows

Each sample's bytes are packed targets version 2: with top-k targets they carry the teacher's exact rest
log-mass per row (``TeacherTargets.rest_logprob``; manifest key ``rest_logprob: true``), which the trainer
hands to the loss as ``teacher_rest_logprob``. Caches of version-1 samples are still read (no rest: the loss
falls back to 1 − Σp).

The manifest records the teacher model fingerprint, the tokenizer fingerprint, the dataset fingerprint
(tokens, seq_len, packing), k, temperature, method, log-prob dtype, the seed, every shard's sha256 and the
index file's sha256. A training run checks its own tokenizer, data, k, temperature and method (and teacher,
when it names one) against it and stops with an error naming the mismatching field.

Writing is atomic and resumable: each shard is written to a temporary file, fsynced and renamed, and only
then recorded in ``progress/``; a killed writer restarted with the same settings skips the recorded shards
whose checksum still matches and rewrites the rest (a shard without a progress record is never trusted).
Shards are spread round-robin over the ranks of the writer's launch; with a ZeRO-3 teacher every rank runs a
forward per iteration (idle ranks run a one-sample dummy batch), since the partitioned forward is collective.

Reading: each rank knows the whole sample order of its micro-batches in advance, so a background thread
reads and unpacks the next ``prefetch`` micro-batches (memory-mapped shards; a shard's sha256 is checked on
first use, or all up front with ``cache_verify: full``) while the student trains.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from ..data.dataset import TokenSamples
from ..data.io import atomic_write, atomic_write_json, fsync_dir, sha256_file
from ..data.loader import Batch, MicroBatchPlan, collate
from .base import TeacherBatch, TeacherSource, sample_generator
from .codec import decode, encode
from .colocated import runner_rest
from .prefetch import Prefetcher

FORMAT = "distill-engine-teacher-cache"
VERSION = 1
# Fields a run must agree with, and the config key to change when it does not.
_CHECKED = {
    "tokenizer_fingerprint": "data.tokenizer",
    "dataset_fingerprint": "data (train_files, seq_len, packing, max_samples, add_eos)",
    "num_samples": "data",
    "k": "teacher.k",
    "temperature": "loss.temperature",
    "method": "teacher.method",
    "teacher_fingerprint": "teacher.path",
}


def manifest_fields(cfg, tokenizer, samples: TokenSamples, teacher_fp: Optional[str]) -> Dict:
    from ..data.tokenizer import tokenizer_fingerprint

    d = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "dataset_fingerprint": samples.fingerprint(),
         "num_samples": len(samples), "seq_len": samples.seq_len, "packing": samples.packing, "k": cfg.teacher.k,
         "temperature": float(cfg.loss.temperature), "method": cfg.teacher.method,
         "logprob_dtype": cfg.teacher.logprob_dtype, "seed": cfg.run.seed}
    if teacher_fp is not None:
        d["teacher_fingerprint"] = teacher_fp
    return d


def expected_manifest(cfg, tokenizer, samples: TokenSamples) -> Dict:
    """What a training run needs of a cache (teacher identity only when the config names a teacher)."""
    fp = None
    if cfg.teacher.path is not None or cfg.teacher.init is not None:
        fp = model_fingerprint(cfg.teacher.path, cfg.teacher.init, cfg.teacher.init_seed)
    return manifest_fields(cfg, tokenizer, samples, fp)


def model_fingerprint(path: Optional[str], init: Optional[dict], init_seed: int = 0) -> str:
    """Identity of a teacher: config.json plus, per weight file, its name, size and the sha256 of its first and
    last MiB (cheap for a 100 GB checkpoint, and it changes whenever the weights do in practice)."""
    h = hashlib.sha256()
    if init is not None:
        h.update(json.dumps({"init": init, "seed": init_seed}, sort_keys=True).encode())
        return h.hexdigest()
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(path)):
        if not name.endswith((".safetensors", ".bin", ".pt")):
            continue
        fp = os.path.join(path, name)
        size = os.path.getsize(fp)
        h.update(f"{name}:{size}".encode())
        with open(fp, "rb") as f:
            h.update(f.read(1 << 20))
            if size > (1 << 20):
                f.seek(max(size - (1 << 20), 1 << 20))
                h.update(f.read())
    return h.hexdigest()


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.bin"


# ---------------------------------------------------------------------------------------------- writing
def write_cache(out_dir: str, *, runner, samples: TokenSamples, fields: Dict, pad_id: int, batch_size: int,
                shard_samples: int, logprob_dtype: str, vocab_size: int, bitpack_ids: bool, rank: int, world: int,
                zero3: bool, device, teacher_info: Dict, log=print) -> Dict:
    """Compute and write the cache (all ranks call this). Returns the manifest."""
    import torch.distributed as dist

    from .topology import wait_all

    phase = [0]

    def barrier():
        phase[0] += 1
        wait_all(f"cache-{os.path.abspath(out_dir)}-{phase[0]}")

    prog = os.path.join(out_dir, "progress")
    # rest_logprob: whether the packed samples carry the teacher's exact rest log-mass (packed format v2; top-k
    # targets do). Caches without the key (written before it existed) are read the same way, rest = None.
    meta = dict(fields, format=FORMAT, version=VERSION, shard_samples=shard_samples, vocab_size=vocab_size,
                bitpack_ids=bitpack_ids, rest_logprob=fields.get("method") == "topk")
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            man = json.load(f)
        if {k: man.get(k) for k in meta} == meta:
            log(f"teacher cache at {out_dir} is already complete ({man['num_samples']} samples)")
            return man
        raise ValueError(f"{out_dir!r} already holds a complete teacher cache for different settings; "
                         f"choose another teacher.cache_dir or delete it")
    if rank == 0:
        os.makedirs(prog, exist_ok=True)
        mpath = os.path.join(prog, "meta.json")
        if os.path.isfile(mpath):
            with open(mpath) as f:
                old = json.load(f)
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ValueError(f"{out_dir!r} holds a partial teacher cache written with other settings "
                                 f"(differs in {', '.join(diff)}); delete it or choose another teacher.cache_dir")
        else:
            atomic_write_json(mpath, meta)
    barrier()

    M = len(samples)
    n_shards = (M + shard_samples - 1) // shard_samples
    done = _recorded_shards(out_dir, prog, n_shards, rank, world)
    todo = [s for s in range(n_shards) if s not in done]
    mine = todo[rank::world]
    if rank == 0 and done:
        log(f"resuming teacher cache: {len(done)}/{n_shards} shards already written")
    # Work list of (shard, first sample, last sample); iterations kept in lockstep for a ZeRO-3 teacher.
    work: List[tuple] = []
    for s in mine:
        lo, hi = s * shard_samples, min(M, (s + 1) * shard_samples)
        work.extend((s, b, min(hi, b + batch_size)) for b in range(lo, hi, batch_size))
    n_iter = len(work)
    if zero3 and world > 1:
        counts = torch.tensor([n_iter], dtype=torch.long)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        n_iter = int(counts[0])
    blobs: List[bytes] = []
    entries: List[List[int]] = []
    t0 = time.time()
    for it in range(n_iter):
        if it >= len(work):  # idle rank: keep the collective ZeRO-3 forward in step with the others
            b = collate(samples, [0], 0, pad_id).to(device)
            runner(b.input_ids, b.attention_mask, b.valid_index, None)
            continue
        s, lo, hi = work[it]
        gen = sample_generator(fields["seed"], s, lo, device) if fields["method"] == "sample" else None
        for i, blob, n in _teacher_blobs(runner, samples, list(range(lo, hi)), it, pad_id, gen, device,
                                         (logprob_dtype, vocab_size, bitpack_ids)):
            entries.append([i, len(blob), n])
            blobs.append(blob)
        last_of_shard = it + 1 == len(work) or work[it + 1][0] != s
        if last_of_shard:
            _finish_shard(out_dir, prog, s, blobs, entries)
            blobs, entries = [], []
            if rank == 0:
                log(f"teacher cache: shard {s + 1}/{n_shards} written ({time.time() - t0:.1f} s)")
    barrier()
    man = None
    if rank == 0:
        man = _finalize(out_dir, prog, meta, n_shards, M, teacher_info)
    barrier()
    if man is None:
        with open(manifest_path) as f:
            man = json.load(f)
    return man


def _recorded_shards(out_dir: str, prog: str, n_shards: int, rank: int, world: int) -> set:
    """Shards recorded by an earlier (killed) writer whose file still matches its record: each rank checks a
    slice, then all agree on the result."""
    import torch.distributed as dist

    good = torch.zeros(n_shards, dtype=torch.long)
    for s in range(rank, n_shards, world):
        rec = os.path.join(prog, _shard_name(s) + ".json")
        path = os.path.join(out_dir, _shard_name(s))
        if os.path.isfile(rec) and os.path.isfile(path):
            try:
                with open(rec) as f:
                    r = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if r.get("bytes") == os.path.getsize(path) and r.get("sha256") == sha256_file(path):
                good[s] = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(good)
    return {s for s in range(n_shards) if good[s] > 0}


def _teacher_blobs(runner, samples: TokenSamples, ids: List[int], it: int, pad_id: int, gen, device, packing):
    """(sample, packed bytes, rows) for each sample of one teacher batch; ``packing``: (logprob_dtype,
    vocab_size, bitpack_ids) of ``encode``."""
    bd = collate(samples, ids, it, pad_id).to(device)
    with torch.no_grad():
        out = runner(bd.input_ids, bd.attention_mask, bd.valid_index, gen)
    t_ids, t_lps = out[0].cpu(), out[1].cpu()  # [rows, k]
    t_rest = runner_rest(out)  # [rows] exact teacher rest log-mass (topk): stored in packed format v2
    t_rest = t_rest.cpu() if t_rest is not None else None
    blobs, r0 = [], 0
    for i in ids:
        n = samples.rows(i)
        blobs.append((i, encode(t_ids[r0:r0 + n], t_lps[r0:r0 + n], *packing,
                                t_rest[r0:r0 + n] if t_rest is not None else None), n))
        r0 += n
    return blobs


def _finish_shard(out_dir: str, prog: str, s: int, blobs: List[bytes], entries: List[List[int]]) -> None:
    path = os.path.join(out_dir, _shard_name(s))

    def w(tmp):
        with open(tmp, "wb") as f:
            for b in blobs:
                f.write(b)

    atomic_write(path, w)
    offsets, off = [], 0
    for (i, nbytes, n) in entries:
        offsets.append([i, s, off, nbytes, n])
        off += nbytes
    # The progress record goes last: a shard file without one is never trusted.
    atomic_write_json(os.path.join(prog, _shard_name(s) + ".json"),
                      {"shard": s, "bytes": off, "sha256": sha256_file(path), "samples": offsets})


def _finalize(out_dir: str, prog: str, meta: Dict, n_shards: int, M: int, teacher_info: Dict) -> Dict:
    index = np.full((M, 4), -1, dtype=np.int64)
    shards = []
    for s in range(n_shards):
        with open(os.path.join(prog, _shard_name(s) + ".json")) as f:
            r = json.load(f)
        shards.append({"file": _shard_name(s), "bytes": r["bytes"], "sha256": r["sha256"]})
        for i, sh, off, nb, n in r["samples"]:
            index[i] = (sh, off, nb, n)
    if (index[:, 0] < 0).any():
        missing = int((index[:, 0] < 0).nonzero()[0][0])
        raise RuntimeError(f"teacher cache {out_dir!r}: sample {missing} was not written by any shard")
    ipath = os.path.join(out_dir, "index.npy")

    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, index)

    atomic_write(ipath, w)
    man = dict(meta, teacher=teacher_info, shards=shards, index={"file": "index.npy", "sha256": sha256_file(ipath)},
               bytes=int(sum(s["bytes"] for s in shards)), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(os.path.join(out_dir, "manifest.json"), man)
    fsync_dir(out_dir)
    return man


# ---------------------------------------------------------------------------------------------- reading
class CacheReader:
    """Validated random access to the per-sample targets of a finished cache."""

    def __init__(self, cache_dir: str, *, expect: Optional[Dict] = None, verify: str = "lazy"):
        self.dir = cache_dir
        mpath = os.path.join(cache_dir, "manifest.json")
        if not os.path.isfile(mpath):
            hint = (" (it holds a partial cache: the writer did not finish; rerun `distill-engine cache-teacher` "
                    "to complete it)" if os.path.isdir(os.path.join(cache_dir, "progress")) else "")
            raise ValueError(f"teacher.cache_dir={cache_dir!r} holds no manifest.json{hint}; build the cache with "
                             f"`distill-engine cache-teacher --config ...`")
        try:
            with open(mpath) as f:
                self.manifest = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"teacher cache {cache_dir!r}: manifest.json is corrupt ({e}); rebuild the cache") from None
        man = self.manifest
        if man.get("format") != FORMAT or man.get("version") != VERSION:
            raise ValueError(f"teacher cache {cache_dir!r}: not a {FORMAT} v{VERSION} manifest "
                             f"(format={man.get('format')!r}, version={man.get('version')!r})")
        for key, where in _CHECKED.items():
            if expect is None or key not in expect:
                continue
            if key == "teacher_fingerprint" and key not in man:
                continue
            if man.get(key) != expect[key]:
                raise ValueError(
                    f"teacher cache {cache_dir!r} does not match this run: {key} is {_short(man.get(key))} in the "
                    f"cache but {_short(expect[key])} here (set by {where}); rebuild the cache with this config "
                    f"(`distill-engine cache-teacher`) or change {where} back")
        ipath = os.path.join(cache_dir, man["index"]["file"])
        if not os.path.isfile(ipath) or sha256_file(ipath) != man["index"]["sha256"]:
            raise ValueError(f"teacher cache {cache_dir!r}: {man['index']['file']} is missing or fails its sha256 "
                             f"check; the cache is corrupt — rebuild it")
        self.index = np.load(ipath)
        self.k = man["k"]
        self._maps: Dict[int, mmap.mmap] = {}
        self._files = {}
        self._verified = set()
        self._lock = threading.Lock()
        self.verify = verify
        if verify == "full":
            for s in range(len(man["shards"])):
                self._open(s)

    def _open(self, s: int):
        with self._lock:
            if s in self._maps:
                return self._maps[s]
            info = self.manifest["shards"][s]
            path = os.path.join(self.dir, info["file"])
            if not os.path.isfile(path):
                raise ValueError(f"teacher cache {self.dir!r}: shard {info['file']} is missing; rebuild the cache")
            size = os.path.getsize(path)
            if size != info["bytes"]:
                raise ValueError(f"teacher cache {self.dir!r}: shard {info['file']} has {size} bytes, the manifest "
                                 f"says {info['bytes']} (truncated or overwritten); the cache is corrupt — rebuild it")
            if self.verify != "none" and s not in self._verified:
                got = sha256_file(path)
                if got != info["sha256"]:
                    raise ValueError(f"teacher cache {self.dir!r}: shard {info['file']} fails its sha256 check "
                                     f"(expected {info['sha256'][:16]}…, got {got[:16]}…); the cache is corrupt — "
                                     f"rebuild it with `distill-engine cache-teacher`")
                self._verified.add(s)
            f = open(path, "rb")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._files[s] = f
            self._maps[s] = mm
            return mm

    def sample(self, i: int):
        """(ids [rows, k], logprobs [rows, k]) of sample ``i``."""
        return self.sample_with_rest(i)[:2]

    def sample_with_rest(self, i: int):
        """(ids [rows, k], logprobs [rows, k], rest_logprob [rows] | None) of sample ``i`` (None: a cache written
        before issue 15, or sampled targets)."""
        if not 0 <= i < len(self.index):
            raise ValueError(f"teacher cache {self.dir!r} has {len(self.index)} samples; sample {i} requested")
        s, off, nb, n = (int(x) for x in self.index[i])
        mm = self._open(s)
        ids, lps, rest = decode(mm[off:off + nb], where=f"teacher cache {self.dir!r}, sample {i}", with_rest=True)
        if ids.shape[0] != n:
            raise ValueError(f"teacher cache {self.dir!r}: sample {i} holds {ids.shape[0]} rows, the index says {n}")
        return ids, lps, rest

    def close(self) -> None:
        with self._lock:
            for mm in self._maps.values():
                if isinstance(mm, mmap.mmap):
                    mm.close()
            for f in self._files.values():
                f.close()
            self._maps.clear()
            self._files.clear()


def _short(v) -> str:
    return repr(v[:16] + "…") if isinstance(v, str) and len(v) > 24 else repr(v)


class CacheTeacher(TeacherSource):
    """Targets for each micro-batch from the cache, read ahead by a background thread."""

    name = "cache"

    def __init__(self, cache_dir: str, *, expect: Dict, samples: TokenSamples, plan: MicroBatchPlan, prefetch: int = 4,
                 verify: str = "lazy"):
        self.reader = CacheReader(cache_dir, expect=expect, verify=verify)
        self.samples, self.plan, self.prefetch = samples, plan, prefetch
        self._fetch = Prefetcher(prefetch, "teacher cache prefetch")

    def targets_for(self, sample_ids: List[int], micro_step: int) -> TeacherBatch:
        parts = [self.reader.sample_with_rest(i) for i in sample_ids]
        ids = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, self.reader.k, dtype=torch.int32)
        lps = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, self.reader.k)
        # the exact rest mass only when every sample carries it (else the loss uses 1 − Σp for the batch)
        rest = torch.cat([p[2] for p in parts]) if parts and all(p[2] is not None for p in parts) else None
        return TeacherBatch(ids, lps, micro_step, None, rest)

    def start(self, first_micro_step: int, last_micro_step: Optional[int] = None) -> None:
        self._fetch.start(lambda t: self.targets_for(self.plan.sample_ids(t), t), first_micro_step, last_micro_step)

    def get(self, batch: Batch) -> TeacherBatch:
        if not self._fetch.started:
            return self.targets_for([int(i) for i in batch.sample_ids], batch.micro_step)
        return self._fetch.get(batch.micro_step)

    def close(self) -> None:
        self._fetch.close(timeout_s=5)
        self.reader.close()
