"""One bounded prefetching consumer, shared by the teacher sources that read ahead (``cache`` and ``stream``).

A producer thread computes the item of micro-step ``t`` (a cache read, or a receive from a teacher rank) for
``t = first, first + 1, ...`` and puts it into a queue of at most ``depth`` items, so it never runs more than
``depth`` micro-batches ahead of the training thread; the training thread takes the items in order with
:meth:`Prefetcher.get`. A producer failure is not lost: the exception is queued in place of the item and
re-raised by ``get`` in the training thread (with the producer's own message: a dead teacher rank surfaces as
the stream's ``StreamBroken``, a corrupt shard as the cache's ``ValueError``). A producer that ends without
delivering the awaited micro-step (it was given a last micro-step, or died without an exception) is reported by
``get`` as a ``RuntimeError`` naming the micro-step, instead of a hang.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

_POLL_S = 0.5  # how often a blocked put re-checks its stop condition


def put_bounded(q: "queue.Queue", item: Any, stopped: Callable[[], bool]) -> bool:
    """Put ``item`` into the bounded queue ``q``, waiting while it is full; give up (return False, the item is
    dropped) as soon as ``stopped()`` is true, so a producer never blocks forever on a consumer that has gone."""
    while not stopped():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


class Prefetcher:
    """Bounded read-ahead of ``produce(t)`` for micro-steps ``t`` in ``[first, last)`` on a daemon thread.

    ``what`` names the producer in errors and is the thread's name (e.g. ``"teacher stream receiver"``)."""

    def __init__(self, depth: int, what: str):
        self.what = what
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, produce: Callable[[int], Any], first: int, last: Optional[int] = None) -> None:
        """Start producing micro-steps ``first, first + 1, ...`` (up to ``last``, exclusive; None: no end)."""

        def work():
            try:
                t = first
                while not self._stop.is_set() and (last is None or t < last):
                    if not put_bounded(self._q, produce(t), self._stop.is_set):
                        return
                    t += 1
            except BaseException as exc:  # handed to the training thread by get()
                self._q.put(exc)

        self._thread = threading.Thread(target=work, name=self.what.replace(" ", "-"), daemon=True)
        self._thread.start()

    def fail(self, exc: BaseException) -> None:
        """Hand an error of a helper thread (e.g. the stream's rollout sender) to the training thread's get()."""
        self._q.put(exc)

    def get(self, micro_step: int) -> Any:
        """The next item, in micro-step order; re-raises a producer error."""
        while True:
            try:
                item = self._q.get(timeout=1.0)
                break
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive() and self._q.empty():
                    raise RuntimeError(f"the {self.what} stopped without delivering micro-step {micro_step}")
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """Tell the producer to stop (it drops the item it holds); see close()."""
        self._stop.set()

    def close(self, timeout_s: float) -> None:
        """Stop the producer and wait up to ``timeout_s`` for its thread."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
