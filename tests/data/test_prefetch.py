"""Batches read ahead of the step (moesaic.data.prefetch): the same batches in the same order
as reading each in the loop, read by worker threads before they are asked for, from any step
(a resume), and a bad thread count refused."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from moesaic.data.prefetch import ReadAhead


class Batches:
    """`get(step)` as TokenBatches has it, recording which thread read which step."""

    def __init__(self):
        self.read: dict[int, str] = {}

    def get(self, step: int) -> np.ndarray:
        self.read[step] = threading.current_thread().name
        return np.random.default_rng(step).integers(0, 256, (2, 9)).astype(np.int32)


def _wait_for(condition, limit=20.0):
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("threads", [0, 3])
def test_the_batches_of_steps_start_to_stop_in_order(threads):
    batches, plain = Batches(), Batches()
    with ReadAhead(batches, start=5, stop=12, threads=threads) as reader:
        got = [reader.next() for _ in range(7)]
        with pytest.raises(StopIteration):
            reader.next()
    for step, batch in zip(range(5, 12), got):
        np.testing.assert_array_equal(batch, plain.get(step))
    assert 0 <= reader.waited and 0 <= reader.wait_share() <= 1


def test_worker_threads_read_ahead_of_the_caller():
    batches = Batches()
    with ReadAhead(batches, start=100, stop=200, threads=2) as reader:
        # nothing asked for yet: the threads read the first 2 * threads steps
        assert _wait_for(lambda: set(range(100, 104)) <= set(batches.read))
        assert not set(batches.read) - set(range(100, 104))  # and no further
        assert threading.current_thread().name not in batches.read.values()
        reader.next()
        assert _wait_for(lambda: 104 in batches.read)  # one taken, one more read
    with ReadAhead(batches := Batches(), start=0, stop=3, threads=0) as reader:
        time.sleep(0.05)
        assert batches.read == {}  # threads=0: read in the loop, when asked for
        reader.next()
        assert batches.read == {0: threading.current_thread().name}


@pytest.mark.parametrize("threads", [-1, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused(threads):
    with pytest.raises(ValueError, match="data.prefetch"):
        ReadAhead(Batches(), start=0, stop=4, threads=threads)
