"""A tensor's bytes brought to the host a bounded piece at a time, for code that must see
all of them in order (its hash) without gathering a sharded tensor whole onto one host.

`pieces(array)` yields numpy arrays whose C-order bytes, concatenated, are the array's C-order
bytes. A numpy array, a single-device array or a fully replicated one is already whole in
this process and comes as one piece. A sharded `jax.Array` (one process's shards, or shards
spread over processes) comes as consecutive slabs of at most `max_bytes` (one element at
least): each slab is cut by a jitted `dynamic_slice` whose output is replicated over the
array's mesh, so every process takes part and every process receives the slab, and nothing
larger than a slab is ever assembled. Slabs run along the first axis whose trailing
sub-tensor fits `max_bytes` (one layer of a layer-stacked tensor, a block of its rows, or a
block of one row's elements), so a slab is contiguous in C order whatever the sharding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

MAX_BYTES = 64 << 20  # a slab of a sharded tensor on the host (and on each device) at most


def is_whole_here(array) -> bool:
    """Whether this process holds the whole array already (no slab needs cutting)."""
    if not isinstance(array, jax.Array) or array.size == 0:
        return True
    return array.is_fully_replicated or len(array.sharding.device_set) == 1


def pieces(array, max_bytes: int | None = None) -> Iterator[np.ndarray]:
    """The array's C-order bytes as consecutive numpy pieces (see the module docstring), a
    slab at most `max_bytes` (default `MAX_BYTES`). With a sharded array every process must
    call this, in the same order (collectives)."""
    max_bytes = int(max_bytes or MAX_BYTES)
    if is_whole_here(array):
        yield np.asarray(array)
        return
    if not isinstance(array.sharding, NamedSharding):
        if array.is_fully_addressable:
            yield np.asarray(array)
            return
        raise TypeError(f"a {type(array.sharding).__name__} array spread over processes: "
                        "only NamedSharding arrays are read in slabs")
    shape, itemsize = tuple(array.shape), np.dtype(array.dtype).itemsize
    # the first axis whose trailing sub-tensor (one index of it and everything after) fits
    axis = next((k for k in range(len(shape))
                 if math.prod(shape[k + 1:]) * itemsize <= max_bytes), len(shape) - 1)
    inner = math.prod(shape[axis + 1:]) * itemsize
    per = max(1, min(shape[axis], max_bytes // max(inner, 1)))
    take = _slab_taker(array.sharding.mesh, axis, per)
    for outer in np.ndindex(*shape[:axis]):
        for start in range(0, shape[axis], per):
            # dynamic_slice clamps a start past shape - per; the overlap is dropped here
            clamped = min(start, shape[axis] - per)
            starts = np.asarray([*outer, clamped] + [0] * (len(shape) - axis - 1), np.int32)
            slab = np.asarray(take(array, starts))
            yield slab[start - clamped:]


@functools.lru_cache(maxsize=64)
def _slab_taker(mesh, axis: int, per: int):
    """jit(x, starts) -> x[starts[:axis], starts[axis]:+per, ...] with the leading indices
    dropped, replicated over `mesh` (compiled once per array shape and sharding)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def take(x, starts):
        sizes = (1,) * axis + (per,) + tuple(x.shape[axis + 1:])
        slab = lax.dynamic_slice(x, [starts[i] for i in range(x.ndim)], sizes)
        return slab.reshape(slab.shape[axis:])
    return jax.jit(take, out_shardings=replicated)
