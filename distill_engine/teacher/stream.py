"""Dedicated teacher ranks streaming packed targets to the student ranks (``--teacher-ranks R``).

Layout (see :mod:`.topology`): global ranks ``0..S-1`` are students, ``S..S+R-1`` teachers; teacher rank ``t``
serves the students ``s`` with ``s % R == t``, in micro-step order, round-robin over its students. Teacher
ranks build the same deterministic data plan as the students, so they know every student's micro-batches
without being told; they run the frozen teacher (plain, or ZeRO-3 partitioned over the teacher ranks only),
pack each micro-batch's targets with ``de.pack_targets`` and send them over the bridge process group
(gloo on CPU, NCCL on GPU).

Overlap and bounded prefetch. On a teacher rank, the main thread computes and a sender thread sends, with at
most ``prefetch`` packed micro-batches queued between them; on a student rank a receiver thread receives into
a queue of at most ``prefetch`` micro-batches. Teacher compute of micro-batch ``t + 1 .. t + prefetch`` thus
overlaps the student's step on ``t``, and neither side ever holds more than ``prefetch`` micro-batches ahead.

Wire format per micro-batch: a header (int64 [8]: magic, micro-step, rows, packed-target bytes, number of
hidden-state tensors, their width, dtype code, payload bytes), then one uint8 payload: the packed targets
followed by the raw bytes of the mapped teacher hidden states (feature losses only). A dead peer is caught by
the heartbeat watchdog of :mod:`.topology`; every wait here also has a timeout.
"""
from __future__ import annotations

import datetime
import queue
import threading
from typing import List, Optional

import numpy as np
import torch

from ..data.loader import Batch, MicroBatchStream
from .base import TeacherBatch, TeacherSource
from .codec import decode, encode
from .prefetch import Prefetcher, put_bounded

MAGIC = 0x44495354  # "DIST"
_HDR = 8
_DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
_CODES = {v: k for k, v in _DTYPES.items()}
_TAG_HDR, _TAG_PAY = 0, 1
# On-policy (loss.on_policy with a stream teacher): the student sends each generated micro-batch to its teacher
# rank (header int64 [5]: magic, micro-step, B, L, has-mask; payload int64: input_ids [B, L], labels [B, L-1],
# then the attention mask [B, L] when padded), and receives the packed targets back like any other micro-batch.
ROLLOUT_MAGIC = 0x524F4C4C  # "ROLL"
_TAG_RHDR, _TAG_RPAY = 2, 3


def _wait(work, timeout_s: float, what: str) -> None:
    if not work.wait(datetime.timedelta(seconds=timeout_s)):
        raise TimeoutError(f"{what} did not complete within {timeout_s:.0f} s")


class StreamBroken(RuntimeError):
    """The peer of a teacher stream is gone (its process died, or failed and closed the connection)."""


class _Link:
    def __init__(self, topo, timeout_s: float):
        self.topo = topo
        self.pg = topo.bridge
        self.cuda = topo.bridge_backend == "nccl"
        self.device = topo.device() if self.cuda else torch.device("cpu")
        self.timeout = timeout_s

    def _who(self, g: int) -> str:
        S = self.topo.student_ranks
        return f"teacher rank {g - S} (global rank {g})" if g >= S else f"student rank {g} (global rank {g})"

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        if self.cuda:
            t = t.to(self.device)
        try:
            # A send completes when the student has room for it: a student busy saving a large checkpoint may
            # take long, which is normal; a dead one is caught by the heartbeat watchdog, so wait up to a day.
            _wait(self.pg.send([t], dst, tag), 86400.0, f"sending teacher targets to global rank {dst}")
        except (RuntimeError, TimeoutError) as e:
            raise StreamBroken(f"lost the teacher stream to {self._who(dst)}: it died or failed (see its log) "
                               f"[{type(e).__name__}: {str(e).splitlines()[0][:200]}]") from None

    def recv(self, numel: int, dtype, src: int, tag: int, timeout_s: Optional[float] = None) -> torch.Tensor:
        t = torch.empty(numel, dtype=dtype, device=self.device)
        try:
            _wait(self.pg.recv([t], src, tag), timeout_s or self.timeout,
                  f"receiving teacher targets from global rank {src}")
        except (RuntimeError, TimeoutError) as e:
            raise StreamBroken(f"lost the teacher stream from {self._who(src)}: it died or failed (see its log) "
                               f"[{type(e).__name__}: {str(e).splitlines()[0][:200]}]") from None
        return t.cpu() if self.cuda else t


def _message(tb: TeacherBatch, logprob_dtype: str, vocab_size: int, bitpack_ids: bool):
    packed = encode(tb.ids, tb.logprobs, logprob_dtype, vocab_size, bitpack_ids, tb.rest_logprob)
    parts = [np.frombuffer(packed, dtype=np.uint8)]
    n_h, width, code = 0, 0, 0
    if tb.hidden:
        n_h = len(tb.hidden)
        width = int(tb.hidden[0].shape[1])
        code = _CODES[tb.hidden[0].dtype]
        for h in tb.hidden:
            h = h.detach().contiguous().cpu()
            parts.append(h.view(torch.uint8).reshape(-1).numpy() if h.numel() else np.zeros(0, np.uint8))
    if tb.relation:  # loss.relation tensors (issue 16): a self-describing tail after the hidden states
        from .relation_codec import pack_tensors

        parts.append(pack_tensors(tb.relation))
    payload = torch.from_numpy(np.concatenate(parts))
    hdr = torch.tensor([MAGIC, tb.micro_step, tb.ids.shape[0], len(packed), n_h, width, code, payload.numel()],
                       dtype=torch.int64)
    return hdr, payload


def _rollout_message(batch: Batch):
    B, L = batch.input_ids.shape
    parts = [batch.input_ids.reshape(-1), batch.labels.reshape(-1)]
    if batch.attention_mask is not None:
        parts.append(batch.attention_mask.reshape(-1))
    hdr = torch.tensor([ROLLOUT_MAGIC, batch.micro_step, B, L, int(batch.attention_mask is not None)],
                       dtype=torch.int64)
    return hdr, torch.cat([p.to(torch.int64).cpu() for p in parts])


def _recv_rollout(link: "_Link", src: int, expect_step: int, template: Batch) -> Batch:
    """The student's generated micro-batch ``expect_step`` (the teacher may wait while the student trains)."""
    hdr = link.recv(5, torch.int64, src, _TAG_RHDR, timeout_s=max(link.timeout, 3600.0))
    magic, step, B, L, has_mask = (int(x) for x in hdr)
    if magic != ROLLOUT_MAGIC or step != expect_step:
        raise RuntimeError(f"on-policy stream from student (global rank {src}): expected the rollout of micro-step "
                           f"{expect_step}, got header {hdr.tolist()}; teacher and student plans diverged")
    pay = link.recv(B * L + B * (L - 1) + (B * L if has_mask else 0), torch.int64, src, _TAG_RPAY)
    ids = pay[:B * L].reshape(B, L)
    labels = pay[B * L:B * L + B * (L - 1)].reshape(B, L - 1)
    mask = pay[B * L + B * (L - 1):].reshape(B, L) if has_mask else None
    return Batch(ids, mask, labels, template.sample_ids, step)


def serve(topo, teacher, stream: MicroBatchStream, first: int, last: int, *, prefetch: int,
          logprob_dtype: str, vocab_size: int, bitpack_ids: bool = False, timeout_s: float = 600.0,
          on_policy=None, sampled: bool = False) -> int:
    """Teacher-rank main loop: targets for micro-steps [first, last) of every served student. Returns the count.

    ``on_policy(t) -> bool``: micro-steps whose batches the students generate; those are received from the
    student (``StreamTeacher.submit``) instead of being read from the data plan. ``sampled``
    (``sampled_reverse_kl``): for those, the teacher's log-prob at each generated token (``teacher.score``: ids
    and log-probs [n, 1]) is sent instead of top-k targets."""
    link = _Link(topo, timeout_s)
    students = topo.students_of(topo.rank)
    q: "queue.Queue" = queue.Queue(maxsize=max(1, prefetch))
    failure: List[BaseException] = []

    def sender():
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                dst, hdr, payload = item
                link.send(hdr, dst, _TAG_HDR)
                link.send(payload, dst, _TAG_PAY)
        except BaseException as exc:
            failure.append(exc)

    th = threading.Thread(target=sender, name="teacher-stream-sender", daemon=True)
    th.start()
    sent = 0
    try:
        for t in range(first, last):
            for s in students:
                batch = stream.batch(t, dp_rank=s)
                rolled = on_policy is not None and on_policy(t)
                if rolled:
                    batch = _recv_rollout(link, s, t, batch)
                tb = teacher.score(batch, dp_rank=s) if rolled and sampled else teacher.compute(batch, dp_rank=s)
                hdr, payload = _message(tb, logprob_dtype, vocab_size, bitpack_ids)
                if not put_bounded(q, (s, hdr, payload), lambda: bool(failure)):
                    raise failure[0]
                sent += 1
        q.put(None)
        while th.is_alive():
            th.join(timeout=0.5)
            if failure:
                raise failure[0]
        if failure:
            raise failure[0]
    finally:
        if th.is_alive():
            try:
                q.put_nowait(None)
            except queue.Full:
                pass
    return sent


class StreamTeacher(TeacherSource):
    """Student side: a receiver thread fills a bounded queue with the targets of the coming micro-batches."""

    name = "stream"

    def __init__(self, topo, *, prefetch: int, timeout_s: float = 600.0):
        self.topo = topo
        self.src = topo.teacher_of(topo.rank)
        self.link = _Link(topo, timeout_s)
        self.prefetch = prefetch
        self._fetch = Prefetcher(prefetch, "teacher stream receiver")
        self._out: "queue.Queue" = queue.Queue()  # on-policy rollouts to send (unbounded: at most grad_accum)
        self._sender: Optional[threading.Thread] = None
        self._send_error: List[BaseException] = []

    def submit(self, batch: Batch) -> None:
        """On-policy: send the student's generated micro-batch to the teacher rank (from a background thread, so
        the training loop never blocks on a teacher that is still busy with earlier micro-batches)."""
        if self._send_error:
            raise self._send_error[0]
        if self._sender is None:
            def send_loop():
                try:
                    while True:
                        item = self._out.get()
                        if item is None:
                            return
                        self.link.send(item[0], self.src, _TAG_RHDR)
                        self.link.send(item[1], self.src, _TAG_RPAY)
                except BaseException as exc:
                    self._send_error.append(exc)
                    self._fetch.fail(exc)  # surfaces in get()

            self._sender = threading.Thread(target=send_loop, name="onpolicy-rollout-sender", daemon=True)
            self._sender.start()
        self._out.put(_rollout_message(batch))

    def _recv_one(self, expect_step: int, first: bool = False) -> TeacherBatch:
        # the first message also waits for the teacher ranks to load the teacher model
        hdr = self.link.recv(_HDR, torch.int64, self.src, _TAG_HDR,
                             timeout_s=max(self.link.timeout, 3600.0) if first else None)
        magic, step, rows, nbytes, n_h, width, code, total = (int(x) for x in hdr)
        if magic != MAGIC:
            raise RuntimeError(f"stream from teacher (global rank {self.src}): bad message header {hdr.tolist()}")
        payload = self.link.recv(total, torch.uint8, self.src, _TAG_PAY)
        if step != expect_step:
            raise RuntimeError(f"stream from teacher (global rank {self.src}): got micro-step {step}, expected "
                               f"{expect_step}; teacher and student data plans diverged")
        raw = payload.numpy()
        ids, lps, rest = decode(raw[:nbytes].tobytes(), where=f"stream from global rank {self.src}", with_rest=True)
        hidden = None
        if n_h:
            dt = _DTYPES[code]
            per = rows * width * torch.empty(0, dtype=dt).element_size()
            hidden = []
            for j in range(n_h):
                chunk = raw[nbytes + j * per: nbytes + (j + 1) * per]
                hidden.append(torch.from_numpy(chunk.copy()).view(dt).reshape(rows, width))
        used = nbytes + (n_h * rows * width * torch.empty(0, dtype=_DTYPES[code]).element_size() if n_h else 0)
        relation = None
        if raw.size > used:  # loss.relation tensors (issue 16)
            from .relation_codec import unpack_tensors

            relation = unpack_tensors(raw[used:], f"stream from teacher (global rank {self.src})")
        return TeacherBatch(ids, lps, step, hidden, rest, relation)

    def start(self, first_micro_step: int, last_micro_step: Optional[int] = None) -> None:
        self._fetch.start(lambda t: self._recv_one(t, first=t == first_micro_step), first_micro_step, last_micro_step)

    def get(self, batch: Batch) -> TeacherBatch:
        return self._fetch.get(batch.micro_step)

    def score(self, batch: Batch) -> TeacherBatch:
        """``sampled_reverse_kl``: the teacher rank scored this rollout (``serve(..., sampled=True)``)."""
        return self.get(batch)

    def close(self) -> None:
        self._fetch.stop()
        if self._sender is not None:
            self._out.put(None)
            self._sender.join(timeout=2)
        self._fetch.close(timeout_s=2)
