"""Tensor hashes and checkpoint fingerprints (docs/design.md, contract 8).

A tensor's hash is the `HASH` algorithm (blake3, multi-threaded: about as fast as reading the
bytes) over its dtype, shape and C-order bytes; a checkpoint's fingerprint is a sha256 over
every tensor's name and hash, in name order. meta.json's "hash" names the algorithm of every
tensor hash it records (the fingerprint's, a branch's frozen_hashes); a meta without it is
sha256 (`hash_algorithm`), so checkpoints written before blake3 still verify.

`scan` hashes a tensor given as its row blocks and finds its first NaN or Inf in the same
pass: what verifying a checkpoint (`checkpoint.verify`) and a merge's inputs reads once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import blake3
import jax
import numpy as np

from moesaic.model import host_pieces

HASH = "blake3"  # the tensor hash new checkpoints record
LEGACY_HASH = "sha256"  # a meta.json without "hash"
HASHES = (HASH, LEGACY_HASH)


def hash_algorithm(meta: Mapping) -> str:
    """The tensor hash algorithm of the hashes a checkpoint's meta records."""
    algorithm = meta.get("hash", LEGACY_HASH)
    if algorithm not in HASHES:
        raise ValueError(f"meta.json records tensor hash {algorithm!r}; known: {HASHES}")
    return algorithm


def tensor_digest(dtype, shape, algorithm: str = HASH):
    """The running hash behind `tensor_hash`: feed it the tensor's C-order bytes, in order
    and in pieces of any size, and its hexdigest is the tensor's hash. For code that reads a
    tensor piece by piece and hashes it on the way. blake3 hashes each piece on all cores
    (and releases the GIL while it does)."""
    shape = tuple(int(n) for n in shape)  # numpy ints would print otherwise
    header = f"{np.dtype(dtype)}|{shape}|".encode()
    if algorithm == HASH:
        return blake3.blake3(header, max_threads=blake3.blake3.AUTO)
    if algorithm == LEGACY_HASH:
        return hashlib.sha256(header)
    raise ValueError(f"unknown tensor hash {algorithm!r}; known: {HASHES}")


def byte_view(array) -> np.ndarray:
    """The array's bytes in C order as a uint8 view, for hashing without a copy (`tobytes`
    would copy a whole piece; a non-contiguous array is copied once, as it must be)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def tensor_hash(array, algorithm: str = HASH) -> str:
    """Hash (`HASH` unless `algorithm`) of one tensor's dtype, shape and bytes. A sharded
    jax.Array is read a bounded slab at a time (`host_pieces`), never gathered whole; every
    process must call this then."""
    if not isinstance(array, jax.Array):
        array = np.asarray(array)
    digest = tensor_digest(array.dtype, array.shape, algorithm)
    for piece in host_pieces.pieces(array):
        digest.update(byte_view(piece))
    return digest.hexdigest()


def fingerprint_of_hashes(hashes: Mapping[str, str]) -> str:
    """The fingerprint from per-tensor hashes, so it can be computed tensor by tensor."""
    lines = "".join(f"{name}:{hashes[name]}\n" for name in sorted(hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def fingerprint(flat: Mapping[str, object], algorithm: str = HASH) -> str:
    """sha256 over every tensor's name and hash (`algorithm`), in name order."""
    return fingerprint_of_hashes({name: tensor_hash(value, algorithm)
                                  for name, value in flat.items()})


def is_floating(dtype) -> bool:
    """Whether a tensor of `dtype` can hold NaN or Inf (V: bfloat16 as numpy stores it)."""
    dtype = np.dtype(dtype)
    return bool(np.issubdtype(dtype, np.floating) or dtype.kind == "V")


def first_non_finite(piece) -> tuple[int, ...] | None:
    """Index of the first NaN or Inf in a floating `piece`, else None. A finite sum means
    every value is finite (NaN and Inf propagate through it), which costs one pass without
    a mask; only a non-finite sum (a NaN, an Inf, or finite values that overflow) builds
    the mask to find the index."""
    values = np.asarray(piece)
    if values.dtype.kind == "V" or values.dtype.itemsize < 4:
        values = values.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(values.sum()):
            return None
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0])


class Scan:
    """`scan` fed piece by piece: `update(piece)` with consecutive row blocks (or a scalar's
    one piece), then `result()`. Finds the first NaN or Inf (and keeps hashing after it)."""

    def __init__(self, dtype, shape, algorithm: str = HASH):
        self.digest = tensor_digest(dtype, shape, algorithm)
        self.floating, self.start, self.bad = is_floating(dtype), 0, None

    def update(self, piece) -> None:
        self.digest.update(byte_view(piece))
        if self.floating and self.bad is None:
            where = first_non_finite(piece)
            if where is not None:
                self.bad = (where[0] + self.start, *where[1:]) if where else ()
        self.start += piece.shape[0] if np.ndim(piece) else 1

    def result(self) -> tuple[str, tuple[int, ...] | None]:
        return self.digest.hexdigest(), self.bad


def scan(dtype, shape, pieces: Iterable, algorithm: str = HASH
         ) -> tuple[str, tuple[int, ...] | None]:
    """(`tensor_hash`, index of the first NaN or Inf, else None) of a tensor given as its row
    blocks in order (one read for both); stops at the first non-finite value."""
    running = Scan(dtype, shape, algorithm)
    for piece in pieces:
        running.update(piece)
        if running.bad is not None:
            break
    return running.result()
