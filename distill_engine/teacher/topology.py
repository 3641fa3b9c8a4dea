"""Process layout of a run, its process groups, and the watchdog that turns a dead rank into a clear error.

Launchers (``deepspeed``, ``torchrun``) start ``WORLD_SIZE`` processes. Without teacher ranks every process is
a student rank and the default process group spans them all. With ``--teacher-ranks R`` the last ``R``
processes are *teacher ranks*: the default process group of a student process then spans only the
``S = WORLD_SIZE - R`` students (so DeepSpeed, its ZeRO partitions, collectives and checkpoint barriers
never see a teacher), the default group of a teacher process spans only the teachers (for an optional ZeRO-3
teacher), and a separate *bridge* group over all ranks carries the packed targets from teacher to student.
All three groups rendezvous through one TCP store (prefixes ``students/``, ``teachers/``, ``bridge/``).

Dead ranks. A collective with a dead peer can block until its timeout (default 10 min) or forever on some
transports. Every rank therefore runs a heartbeat thread: it bumps its own counter in the store every
``interval`` seconds, watches the counters of the next two ranks in a ring, and polls one ``abort`` key. A
watched counter that stops moving for ``timeout`` seconds (process killed, machine gone), or an ``abort`` set
by a rank that raised, makes the thread print which rank failed and end the process with ``os._exit`` —
the only way out of a blocked collective. A rank that loses the store (its host died) exits the same way.
Detection takes at most ``timeout + 2·interval`` seconds; the load on the store is O(world) per interval.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

EXIT_PEER_FAILED = 75


@dataclass
class Topology:
    global_rank: int
    world_size: int
    teacher_ranks: int
    local_rank: int
    backend: str
    store: Optional[object] = None
    bridge: Optional[object] = None     # ProcessGroup over all ranks (teacher → student transfers)
    bridge_backend: str = "gloo"
    heartbeat: Optional["Heartbeat"] = field(default=None, repr=False)
    aborted: bool = False

    @property
    def student_ranks(self) -> int:
        return self.world_size - self.teacher_ranks

    @property
    def role(self) -> str:
        return "teacher" if self.global_rank >= self.student_ranks else "student"

    @property
    def rank(self) -> int:
        """Rank within the role's own world (the default process group)."""
        return self.global_rank - (self.student_ranks if self.role == "teacher" else 0)

    @property
    def role_world_size(self) -> int:
        return self.teacher_ranks if self.role == "teacher" else self.student_ranks

    def teacher_of(self, student_rank: int) -> int:
        """Global rank of the teacher rank that serves ``student_rank``."""
        return self.student_ranks + student_rank % self.teacher_ranks

    def students_of(self, teacher_rank: int):
        """Student ranks served by teacher rank ``teacher_rank`` (rank within the teachers' world)."""
        return [s for s in range(self.student_ranks) if s % self.teacher_ranks == teacher_rank]

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def abort(self, message: str) -> None:
        """Tell every other rank to stop (their watchdogs exit with ``message``)."""
        if self.store is not None and self.world_size > 1:
            try:
                self.store.set("de/abort", f"rank {self.global_rank}: {message}")
            except Exception:
                pass


_TOPOLOGY: Optional[Topology] = None


class Heartbeat(threading.Thread):
    def __init__(self, store, rank: int, world: int, *, interval: float, timeout: float, describe,
                 hosts_store: bool = False):
        super().__init__(name="distill-engine-heartbeat", daemon=True)
        self.hosts_store = hosts_store
        self.store, self.rank, self.world = store, rank, world
        self.interval, self.timeout = interval, timeout
        self.describe = describe
        self.watch = sorted({(rank + i) % world for i in (1, 2)} - {rank})
        self._stop_evt = threading.Event()

    def _fail(self, msg: str) -> None:
        sys.stderr.write(f"\n[distill-engine] rank {self.rank}: {msg}; exiting (code {EXIT_PEER_FAILED}).\n")
        sys.stderr.flush()
        if self.hosts_store:  # keep the store up until the other ranks have read the abort reason
            time.sleep(2 * self.interval + 1.0)
        os._exit(EXIT_PEER_FAILED)

    def run(self) -> None:
        last = {r: (-1, time.monotonic()) for r in self.watch}
        while not self._stop_evt.is_set():
            try:
                self.store.add(f"de/hb/{self.rank}", 1)
                if self.store.check(["de/abort"]):
                    self._fail("stopping because " + self.store.get("de/abort").decode(errors="replace"))
                now = time.monotonic()
                for r in self.watch:
                    if self.store.check([f"de/done/{r}"]):
                        continue
                    count = self.store.add(f"de/hb/{r}", 0)
                    seen, since = last[r]
                    if count != seen:
                        last[r] = (count, now)
                    elif now - since > self.timeout:
                        msg = (f"{self.describe(r)} sent no heartbeat for {now - since:.0f} s "
                               f"(train.heartbeat_timeout_s={self.timeout:g}): it died or hung")
                        try:
                            self.store.set("de/abort", f"rank {self.rank} reports: {msg}")
                        except Exception:
                            pass
                        self._fail(msg)
            except Exception as exc:  # the store's host is gone
                if self._stop_evt.is_set():
                    return
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                self._fail(f"lost the rendezvous store ({type(exc).__name__}: {first}): the process hosting it "
                           f"(global rank 0, or the launcher's agent) exited — its log says why")
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()


def setup(*, teacher_ranks: int = 0, timeout_s: float = 600.0, heartbeat_timeout_s: float = 60.0,
          heartbeat_interval_s: float = 1.0, bridge_backend: str = "auto") -> Topology:
    """Create (once per process) the store, the default process group of this rank's role, the bridge and
    the heartbeat. Single-process runs without launcher variables get a world of one."""
    global _TOPOLOGY
    if _TOPOLOGY is not None:
        if _TOPOLOGY.teacher_ranks != teacher_ranks:
            raise ValueError(f"this process already runs with {_TOPOLOGY.teacher_ranks} teacher ranks; "
                             f"teacher.ranks={teacher_ranks} needs a new launch")
        return _TOPOLOGY
    if dist.is_initialized():
        if teacher_ranks:
            raise ValueError("teacher.ranks > 0 needs the process groups set up by distill-engine, but "
                             "torch.distributed is already initialized by the caller")
        _TOPOLOGY = Topology(dist.get_rank(), dist.get_world_size(), 0, int(os.environ.get("LOCAL_RANK", 0)),
                             dist.get_backend())
        return _TOPOLOGY

    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    own_port = "MASTER_PORT" not in os.environ
    if own_port and os.environ["WORLD_SIZE"] != "1":
        raise ValueError("WORLD_SIZE > 1 but MASTER_PORT is not set; start the run with a launcher "
                         "(deepspeed / torchrun)")
    grank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if teacher_ranks < 0 or teacher_ranks >= world and teacher_ranks > 0:
        raise ValueError(f"teacher.ranks={teacher_ranks} leaves no student rank in a world of {world} "
                         f"processes; launch more processes or lower --teacher-ranks")
    if teacher_ranks and (world - teacher_ranks) % teacher_ranks:
        raise ValueError(f"with {world} processes and --teacher-ranks {teacher_ranks} there are "
                         f"{world - teacher_ranks} student ranks, not a multiple of the teacher ranks; every "
                         f"teacher rank must serve the same number of students")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if own_port:
        # a single process binds port 0 itself: asking for a free port first and binding it later races with
        # every other process on the machine
        store = dist.TCPStore(os.environ["MASTER_ADDR"], 0, 1, is_master=True, timeout=timeout)
        os.environ["MASTER_PORT"] = str(store.port)
    else:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=(grank == 0 and not agent_store), timeout=timeout)
    topo = Topology(grank, world, teacher_ranks, local, backend, store=store)
    prefix = "teachers/" if topo.role == "teacher" else "students/"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=topo.rank,
                            world_size=topo.role_world_size, timeout=timeout)
    if teacher_ranks:
        # DeepSpeed reads these; inside a role the world is that role's processes only.
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(topo.rank), str(topo.role_world_size)
        os.environ["DE_GLOBAL_RANK"], os.environ["DE_GLOBAL_WORLD_SIZE"] = str(grank), str(world)
        bb = ("nccl" if cuda else "gloo") if bridge_backend == "auto" else bridge_backend
        if bb == "nccl" and not cuda:
            raise ValueError("teacher.stream_backend='nccl' needs CUDA; use 'gloo' on CPU")
        bstore = dist.PrefixStore("bridge/", store)
        if bb == "gloo":
            topo.bridge = dist.ProcessGroupGloo(bstore, grank, world, timeout)
        else:
            topo.bridge = dist.ProcessGroupNCCL(bstore, grank, world)
        topo.bridge_backend = bb

    if world > 1:
        def describe(r: int) -> str:
            if teacher_ranks:
                return (f"teacher rank {r - topo.student_ranks} (global rank {r})" if r >= topo.student_ranks
                        else f"student rank {r} (global rank {r})")
            return f"rank {r}"

        topo.heartbeat = Heartbeat(store, grank, world, interval=heartbeat_interval_s,
                                   timeout=heartbeat_timeout_s, describe=describe,
                                   hosts_store=grank == 0 and not agent_store)
        topo.heartbeat.start()
        atexit.register(_finish, topo)
    _TOPOLOGY = topo
    return topo


def current() -> Optional[Topology]:
    return _TOPOLOGY


def wait_all(name: str, poll_s: float = 0.2) -> None:
    """A barrier over every process of the launch without a timeout (ranks may arrive hours apart, e.g. after
    writing uneven cache shards); a rank that dies meanwhile is caught by the heartbeat watchdog instead."""
    topo = _TOPOLOGY
    if topo is None or topo.world_size <= 1 or topo.store is None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return
    topo.store.set(f"de/wait/{name}/{topo.global_rank}", "1")
    keys = [f"de/wait/{name}/{r}" for r in range(topo.world_size)]
    while not topo.store.check(keys):
        time.sleep(poll_s)


def report_failure(exc: BaseException) -> None:
    """Set the abort key so peers stop now instead of at their collective timeout."""
    topo = _TOPOLOGY
    if topo is None:
        return
    if topo.world_size <= 1 or topo.aborted:
        return
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    topo.aborted = True
    if topo.heartbeat is not None:
        topo.heartbeat.stop()  # this rank exits through its own exception, not through the watchdog
    topo.abort(f"{text[-1] if text else type(exc).__name__}")
    if topo.heartbeat is not None:
        time.sleep(2 * topo.heartbeat.interval + 0.5)  # keep the store up until the peers have read the message


def _finish(topo: Topology) -> None:
    """At normal exit: mark this rank done, and keep the store's host alive until every rank is done."""
    store, hb = topo.store, topo.heartbeat
    if topo.aborted:
        return
    try:
        store.set(f"de/done/{topo.global_rank}", "1")
        if topo.global_rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
            keys = [f"de/done/{r}" for r in range(topo.world_size)]
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline and not store.check(keys):
                time.sleep(0.2)  # the heartbeat thread still guards against a peer that dies meanwhile
    except Exception:
        pass
    if hb is not None:
        hb.stop()
