"""Token-bigram counts of a party's data: what the party gate (`moesaic.model.gate`) is built
from at merge.

A party counts, over its training split (up to `MAX_TOKENS` tokens, in rows evenly spaced over
it), each pair (previous token, token) into `gate.bucket`'s buckets and each previous token
(a row's first token follows eos). Like its router statistics these are aggregates: how often
each pair of tokens occurs, no document and no order beyond two tokens. The branch job writes
them beside its router statistics (`ngram/bigram` (buckets,), `ngram/context` (V,), float32).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from moesaic.model import gate
from moesaic.model.names import NGRAM_NAMES, ngram_name

MAX_TOKENS = 1 << 24  # tokens counted at most (rows evenly spaced over the split)


def count(tokens_nt: np.ndarray, *, vocab_size: int, eos_id: int) -> dict[str, np.ndarray]:
    """{"bigram": (buckets,), "context": (V,)} float32 counts over rows of tokens, each row
    read from its start (its first token follows eos)."""
    rows = np.asarray(tokens_nt).astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= vocab_size):
        raise ValueError(f"token ids outside the vocabulary of {vocab_size}")
    prev = np.concatenate([np.full((rows.shape[0], 1), eos_id), rows[:, :-1]], axis=1)
    buckets = gate.buckets_for(vocab_size)
    index = gate.bucket(prev.reshape(-1), rows.reshape(-1), vocab_size, buckets, xp=np)
    bigram = np.bincount(index, minlength=buckets)
    context = np.bincount(prev.reshape(-1), minlength=vocab_size)
    return {"bigram": bigram.astype(np.float32), "context": context.astype(np.float32)}


def count_source(data_dir: str | os.PathLike, source: str, *, width: int, vocab_size: int,
                 eos_id: int, max_tokens: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    """The counts of `source`'s training split, in rows of `width` tokens (at most
    `max_tokens` in all)."""
    from moesaic.data.loader import packed_rows

    rows, _, _ = packed_rows(data_dir, source, "train", width=width,
                             max_rows=max(1, max_tokens // width))
    return count(rows, vocab_size=vocab_size, eos_id=eos_id)


def with_counts(stats, data_dir: str | os.PathLike, source: str, *, width: int,
                vocab_size: int, eos_id: int):
    """A party's `routing.stats.RouterStats` with its source's counts: what its artifact
    hands over (a branch job's, an imported adapter's)."""
    return dataclasses.replace(stats, ngram=count_source(
        data_dir, source, width=width, vocab_size=vocab_size, eos_id=eos_id))


def tensors(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The artifact's ngram/* tensors."""
    return {ngram_name(stat): np.asarray(counts[stat], np.float32) for stat in NGRAM_NAMES}


def shapes(vocab_size: int) -> dict[str, tuple[int]]:
    return {"bigram": (gate.buckets_for(vocab_size),), "context": (vocab_size,)}
