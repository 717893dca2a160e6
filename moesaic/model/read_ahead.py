"""Reading ahead of a writer: a streaming write (checkpoint.save_streaming) reads and decodes
the next piece of a tensor on a thread while the current one is hashed and written."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable


def prefetched(pieces: Iterable, depth: int = 1):
    """Yields what `pieces` yields, produced by a thread that runs `depth` pieces ahead, so
    reading (and decoding) the next piece overlaps writing this one. An error in the
    producer is raised here, at the piece it failed on; closing this generator early stops
    the producer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for piece in pieces:
                if not put((piece, None)):
                    return
            put((end, None))
        except BaseException as err:  # handed to the consumer
            put((end, err))

    thread = threading.Thread(target=produce, daemon=True, name="moesaic-read-ahead")
    thread.start()
    try:
        while True:
            piece, err = slots.get()
            if err is not None:
                raise err
            if piece is end:
                return
            yield piece
            del piece
    finally:
        stop.set()
        thread.join()
