"""The shared bounded prefetching consumer of the cache and stream teachers (distill_engine/teacher/prefetch.py)."""
import queue
import threading
import time

import pytest

from distill_engine.teacher.prefetch import Prefetcher, put_bounded


def test_items_arrive_in_order_and_the_producer_stays_bounded():
    produced = []
    lock = threading.Lock()

    def produce(t):
        with lock:
            produced.append(t)
        return ("item", t)

    p = Prefetcher(3, "test producer")
    p.start(produce, 5, 40)
    try:
        time.sleep(0.3)  # let the producer fill the queue
        with lock:
            ahead = len(produced)
        # depth 3 queued + at most one item held while it waits for room
        assert 3 <= ahead <= 4, ahead
        got = [p.get(t) for t in range(5, 40)]
        assert got == [("item", t) for t in range(5, 40)]
        assert produced == list(range(5, 40))
    finally:
        p.close(timeout_s=2)


def _fails_at_2(t):
    if t == 2:
        raise ValueError("teacher cache 'x': shard shard-00000.bin fails its sha256 check")
    return t


@pytest.mark.parametrize("produce, last, exc, match", [
    # a producer error reaches the consumer with its own message
    (_fails_at_2, None, ValueError, "fails its sha256 check"),
    # a producer that ends before the awaited micro-step is named, not a hang
    (lambda t: t, 2, RuntimeError, "the teacher stream receiver stopped without delivering micro-step 2"),
])
def test_the_consumer_raises_instead_of_hanging(produce, last, exc, match):
    p = Prefetcher(2, "teacher stream receiver")
    p.start(produce, 0, last)
    assert [p.get(0), p.get(1)] == [0, 1]
    with pytest.raises(exc, match=match):
        p.get(2)
    p.close(timeout_s=2)


def test_fail_hands_a_helper_threads_error_to_get():
    p = Prefetcher(1, "test producer")
    p.fail(ConnectionError("lost the teacher stream to teacher rank 0"))
    with pytest.raises(ConnectionError, match="lost the teacher stream"):
        p.get(0)


def test_close_stops_a_producer_blocked_on_a_full_queue():
    p = Prefetcher(1, "test producer")
    p.start(lambda t: t, 0, None)
    time.sleep(0.2)
    p.close(timeout_s=3)
    assert not p._thread.is_alive()


def test_put_bounded_gives_up_once_stopped():
    q = queue.Queue(maxsize=1)
    assert put_bounded(q, 1, lambda: False)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert put_bounded(q, 2, stop.is_set) is False
    assert q.get_nowait() == 1 and q.empty()
