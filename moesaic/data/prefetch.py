"""Batches read ahead of the training step by worker threads, so the step does not wait for data.

    reader = ReadAhead(batches, start=step, stop=steps, threads=4)
    tokens = reader.next()   # batches.get(start), then start + 1, ...; waits only if not ready
    reader.waited            # seconds the caller spent waiting in next()
    reader.wait_share()      # the share of the time since the last call spent waiting

The steps [start, stop) become a grain `MapDataset` mapped through `TokenBatches.get`, and
`to_iter_dataset` with `ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)`
reads them in a thread pool, in step order, up to 2 * threads batches ahead. Reading starts
when the reader is made (while the step compiles). A batch is a pure function of its step
(`moesaic.data.loader`), so nothing about the read-ahead is saved: a resumed job makes a
reader at its step and reads exactly the batches an uninterrupted job reads there.
`threads=0` reads each batch in the caller's thread when it is asked for (the loop as it was).

Threads, not processes: decoding a batch is short and mostly numpy and file reads, which
release the GIL, and the training step waits on the device with the GIL released; a process
pool would pickle every batch back.
"""

from __future__ import annotations

import time

import grain
import numpy as np

from moesaic.data.loader import TokenBatches


class ReadAhead:
    def __init__(self, batches: TokenBatches, *, start: int, stop: int, threads: int):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"data.prefetch={threads!r}: the number of threads reading ahead "
                             "must be a whole number >= 0 (0 reads in the training loop)")
        self.start, self.stop, self.threads = int(start), int(stop), threads
        self.waited = 0.0
        self._mark: tuple[float, float] | None = None  # (waited, time) at the last share
        self._batches = batches
        self._next_step = self.start
        self._iter = None
        if threads and stop > start:
            steps = grain.MapDataset.range(self.start, self.stop).map(batches.get)
            options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
            self._iter = iter(steps.to_iter_dataset(options))
            self._iter.start_prefetch()

    def next(self) -> np.ndarray:
        """The batch of the next step (`batches.get(step)`), counting the time waited."""
        if self._next_step >= self.stop:
            raise StopIteration(f"read ahead up to step {self.stop} only")
        begin = time.perf_counter()
        if self._mark is None:
            self._mark = (self.waited, begin)
        batch = next(self._iter) if self._iter is not None else self._batches.get(
            self._next_step)
        self.waited += time.perf_counter() - begin
        self._next_step += 1
        return batch

    def wait_share(self) -> float:
        """The share of the wall time since the last call (the first: since the first batch
        was asked for) that the caller spent waiting in `next`: 0 when the threads keep up."""
        now = time.perf_counter()
        waited, then = self._mark or (self.waited, now)
        self._mark = (self.waited, now)
        return (self.waited - waited) / max(now - then, 1e-9)

    def close(self) -> None:
        """Stops the threads (batches read ahead and not taken are dropped)."""
        if self._iter is not None:
            self._iter.close()
            self._iter = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
