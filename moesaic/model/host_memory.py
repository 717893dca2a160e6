"""Host memory and glibc's allocator: keep freed memory for the next training step, and hand
freed memory back after each piece of a streamed read or write.

Keeping it (`keep_freed_memory`). XLA:CPU allocates each executable's temporaries (hundreds
of MB for a training step) with `posix_memalign` from its worker threads, and frees them when
the step ends. glibc serves an allocation that large with a fresh `mmap` (from a worker
thread's arena it always does), so every step page-faults its whole working set back in and
the kernel zeroes it: at the demo's shapes a quarter of the CPU time was system time. Three
`mallopt` settings keep it instead:

    M_ARENA_MAX 1          every thread allocates from the main heap, which can grow past 64 MB
    M_MMAP_MAX 0           large blocks come from that heap, not from mmap
    M_TRIM_THRESHOLD 2 GB  freed memory at the heap's top is kept for the next step

The resident size then stays at the peak (it is not given back between steps). For small
shapes, whose blocks stay below glibc's mmap threshold, it costs a few percent instead (the
smoke demo: 110 s against 104 s), so the test session does not apply it. Accelerator
memory is not host memory, so on a GPU or TPU host this only touches host buffers.
`moesaic` applies it before any command runs, unless the user chose an allocator already
(MALLOC_* or GLIBC_TUNABLES variables, or a preloaded library such as tcmalloc), or set
MOESAIC_SYSTEM_MALLOC=1. Measured with `bench/train_step.py`; see docs/training.md.

Handing it back (`release_freed`). A merge or a verification reads and writes tensors a piece
at a time; the pieces are allocated and freed by tensorstore's threads, and glibc keeps freed
blocks in per-thread arenas (and raises its mmap threshold to the largest block freed), so
without this the resident memory of a merge grew with the number of tensors it streamed (2
branches: 229 MB above the start, 8 branches: 380 MB, for pieces of at most 64 MB).
`release_freed` after each tensor returns what is free, so what is resident is what is live.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


@functools.cache
def _glibc():
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def user_chose_allocator(environ=os.environ) -> str | None:
    """The variable by which the user chose an allocator or its settings, if any."""
    for name in sorted(environ):
        if (name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD",
                                                    "MOESAIC_SYSTEM_MALLOC")) and environ[name]:
            return name
    return None


def keep_freed_memory() -> bool:
    """Applies the settings above to this process; True if it did. Call it before the first
    JAX computation (XLA's worker threads pick their arena when they first allocate)."""
    libc = _glibc()
    if libc is None or user_chose_allocator() is not None:
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in _SETTINGS)


def release_freed() -> None:
    """glibc's malloc_trim(0): freed heap in every arena goes back to the system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
