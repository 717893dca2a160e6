"""Token batches as a pure function of (seed, mixture, step), by random access through grain.

A source's training stream, epoch by epoch: its documents in an order permuted by
(seed, source, epoch), each followed by `eos_id`, concatenated and cut into sequences of
`seq_len + 1` tokens (the tail that does not fill a sequence is dropped); the sequences of
an epoch are then visited in a second permuted order. Sequence g of the stream is computed
from g alone (`PackedSequences`, a `grain.MapDataset`), so nothing is iterated and nothing
needs saving: resuming at step s recomputes the same batches.

A mixture ("public", "code:1,law:2" or {"code": 1, "law": 2}) interleaves the sources'
streams with `grain.MapDataset.mix` (deterministic proportions). Row r of the global batch at
step s is element `s * global_batch + r`; process p of P reads rows
[p * global_batch / P, (p + 1) * global_batch / P) and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds

from moesaic.data.prepare import SPLITS


def load_manifest(data_dir: str | os.PathLike, source: str) -> dict:
    path = Path(data_dir) / source / "manifest.json"
    if not path.is_file():
        have = sorted(p.parent.name for p in Path(data_dir).glob("*/manifest.json"))
        raise FileNotFoundError(f"no prepared source {source!r} in {str(data_dir)!r} "
                                f"(found: {have or 'none'}); run `moesaic data prepare` or "
                                "`moesaic data embedded` first")
    return json.loads(path.read_text())


def parse_mixture(mixture: str | Mapping[str, float]) -> dict[str, float]:
    """"public" | "code:1,law:2" | {"code": 1} -> {source: weight}, weights normalized to 1."""
    if isinstance(mixture, str):
        weights: dict[str, float] = {}
        for item in filter(None, (x.strip() for x in mixture.split(","))):
            name, sep, weight = item.partition(":")
            if name in weights:
                raise ValueError(f"mixture {mixture!r}: source {name!r} appears twice")
            try:
                weights[name] = float(weight) if sep else 1.0
            except ValueError:
                raise ValueError(
                    f"mixture {mixture!r}: weight {weight!r} is not a number") from None
    else:
        weights = {str(k): float(v) for k, v in mixture.items()}
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights.values()):
        raise ValueError(f"mixture {mixture!r}: need at least one source, all weights finite "
                         "and > 0")
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def _docs_dataset(data_dir: str | os.PathLike, source: str, split: str):
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {SPLITS}")
    manifest = load_manifest(data_dir, source)
    folder = Path(data_dir) / source
    try:  # a TFDS folder deleted or cut short is named here, not deep inside a read
        builder = tfds.builder_from_directory(str(folder / manifest["tfds_dir"]))
        lengths = np.load(folder / f"index-{split}.npy")
        docs = builder.as_data_source(split)
        if len(docs) != len(lengths):
            raise ValueError(f"{len(docs)} records, its index lists {len(lengths)}")
        for i in sorted({0, len(docs) - 1}) if len(docs) else ():  # a file cut short fails
            shape = np.shape(docs[i]["tokens"])  # here, or reads records of other lengths
            if shape != (int(lengths[i, 0]),):
                raise ValueError(f"record {i} holds {shape} tokens, its index lists "
                                 f"{int(lengths[i, 0])}")
    except Exception as err:
        what = str(err).splitlines()[0][:200] if str(err) else ""
        raise ValueError(f"prepared source {source!r} in {str(data_dir)!r} is damaged: its "
                         f"{split!r} split cannot be read ({type(err).__name__}: {what}); "
                         "prepare it again (`moesaic data prepare ... --overwrite`)") from err
    return manifest, docs, lengths


def row_spans(starts: np.ndarray, ends: np.ndarray, start: int, width: int
              ) -> Iterator[tuple[int, int, int]]:
    """The pieces of row [start, start + width) of a packed stream whose k-th document (plus
    its eos) spans [starts[k], ends[k]): (k, a, b), the row holds that document's [a, b)."""
    stop = start + width
    for k in range(int(np.searchsorted(ends, start, side="right")), len(ends)):
        if starts[k] >= stop:
            break
        yield k, max(start - int(starts[k]), 0), min(stop, int(ends[k])) - int(starts[k])


class PackedSequences(grain.MapDataset):
    """Sequence g (any g >= 0) of one source's packed, shuffled, endlessly repeated stream.
    `name` says which source (and where) in errors."""

    def __init__(self, docs: grain.MapDataset, lengths: np.ndarray, *, seq_len: int, seed: int,
                 eos_id: int, stream_key: int, name: str = "source"):
        super().__init__([docs])
        self._docs, self._width, self._eos = docs, seq_len + 1, eos_id
        self._lengths = np.asarray(lengths, np.int64) + 1  # each document plus its eos
        self._key = (int(seed) & 0xFFFFFFFF, stream_key)
        self.per_epoch = int(self._lengths.sum()) // self._width
        if self.per_epoch < 1:
            raise ValueError(f"{name} has {int(self._lengths.sum())} tokens (with eos), fewer "
                             f"than one sequence of seq_len + 1 = {self._width}; give it more "
                             "text or lower data.seq_len")
        self._read = functools.lru_cache(maxsize=256)(self._read_doc)
        self._epoch = functools.lru_cache(maxsize=2)(self._epoch_tables)  # per instance

    def __len__(self) -> int:
        return sys.maxsize

    def clear_cache(self) -> None:
        """Forget decoded documents (the cache only saves time; results never depend on it)."""
        self._read.cache_clear()

    def _read_doc(self, index: int) -> np.ndarray:
        return np.asarray(self._docs[index]["tokens"], np.int32)

    def _epoch_tables(self, epoch: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([*self._key, epoch])
        doc_order = rng.permutation(len(self._lengths))
        lengths = self._lengths[doc_order]
        ends = np.cumsum(lengths)
        seq_order = rng.permutation(self.per_epoch)
        return doc_order, ends - lengths, ends, seq_order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(int(index), self.per_epoch)
        doc_order, starts, ends, seq_order = self._epoch(epoch)
        start = int(seq_order[position]) * self._width
        return np.concatenate([
            np.append(self._read(int(doc_order[k])), np.int32(self._eos))[a:b]
            for k, a, b in row_spans(starts, ends, start, self._width)])


class TokenBatches:
    """`get(step)` -> int32 (global_batch // process_count, seq_len + 1) of this process.

    Inputs are `batch[:, :-1]`, targets `batch[:, 1:]`. `tokenizer_id` is the tokenizer
    identity shared by all sources; `bytes_per_token` is the mixture-weighted average of the
    sources' training bytes per token (1.0 for the byte tokenizer).
    """

    def __init__(self, data_dir: str | os.PathLike, mixture: str | Mapping[str, float], *,
                 split: str = "train", seq_len: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"global_batch={global_batch} is not divisible by "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.weights = parse_mixture(mixture)
        self.seq_len, self.global_batch = seq_len, global_batch
        self.local_batch = global_batch // process_count
        self._first_row = process_index * self.local_batch
        self.manifests, streams = {}, []
        for name in self.weights:
            manifest, docs, index = _docs_dataset(data_dir, name, split)
            self.manifests[name] = manifest
            streams.append(PackedSequences(
                grain.MapDataset.source(docs), index[:, 0], seq_len=seq_len, seed=seed,
                eos_id=manifest["tokenizer"]["eos_id"], stream_key=zlib.crc32(name.encode()),
                name=f"source {name!r} ({split} split in {str(data_dir)!r})"))
        identities = {m["tokenizer"]["identity"] for m in self.manifests.values()}
        if len(identities) > 1:
            raise ValueError(f"mixture {mixture!r} mixes tokenizers {sorted(identities)}")
        self.tokenizer_id = identities.pop()
        self.eos_id = next(iter(self.manifests.values()))["tokenizer"]["eos_id"]
        self.bytes_per_token = sum(
            w * m["splits"][split]["bytes"] / max(1, m["splits"][split]["tokens"])
            for w, m in zip(self.weights.values(), self.manifests.values()))
        self.streams = dict(zip(self.weights, streams))
        self.dataset = (streams[0] if len(streams) == 1 else
                        grain.MapDataset.mix(streams, list(self.weights.values())))

    def get(self, step: int) -> np.ndarray:
        base = int(step) * self.global_batch + self._first_row
        rows = [self.dataset[base + r] for r in range(self.local_batch)]
        return np.stack(rows).astype(np.int32, copy=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        step = 0
        while True:
            yield self.get(step)
            step += 1


@dataclasses.dataclass(frozen=True)
class HeldoutSequences:
    """Packed held-out sequences and what their targets cover.

    tokens: int32 (N, seq_len + 1); the targets are tokens[:, 1:].
    num_bytes: UTF-8 bytes of the text the targets cover (eos targets count 0 bytes). Exact for
      the byte tokenizer (`exact=True`); for other tokenizers an estimate from each document's
      bytes per token.
    num_targets: N * seq_len; num_eos_targets: how many targets are eos_id.
    Bits per byte = sum of target losses in nats / ln(2) / num_bytes.
    """

    tokens: np.ndarray
    num_bytes: int
    num_targets: int
    num_eos_targets: int
    exact: bool


def packed_rows(data_dir: str | os.PathLike, source: str, split: str, *, width: int,
                max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of `width` tokens cut from a split's packed stream: its documents in stored order,
    each followed by eos (the tail that does not fill a row is dropped). With `max_rows` below
    the stream's row count, the rows kept are evenly spaced over the stream, so a sample spans
    the whole split rather than its first few documents; each kept row is the row the whole
    stream has there, so its context is the same. Only the documents those rows touch are read.

    Returns (int32 tokens (N, width), float64 bytes per token (N, width), eos 0; the number
    of documents with a position in the kept rows)."""
    manifest, docs, index = _docs_dataset(data_dir, source, split)
    eos = manifest["tokenizer"]["eos_id"]
    lengths = np.asarray(index[:, 0], np.int64) + 1  # each document plus its eos
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    n_all = total // width
    if n_all < 1:
        raise ValueError(f"source {source!r} ({split} split in {str(data_dir)!r}) has {total} "
                         f"tokens (with eos), fewer than one row of {width} tokens; give it "
                         "more text or lower data.seq_len")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"source {source!r}: max_rows={max_rows}, must be at least 1")
    n = n_all if max_rows is None else min(int(max_rows), n_all)
    picks = (np.arange(n_all) if n == n_all
             else np.linspace(0, n_all - 1, n).round().astype(np.int64))  # spacing >= 1
    tokens = np.empty((len(picks), width), np.int32)
    rates = np.empty((len(picks), width), np.float64)
    touched: set[int] = set()
    read = functools.lru_cache(maxsize=64)(lambda i: np.asarray(docs[i]["tokens"], np.int32))
    starts = ends - lengths
    for row, pick in enumerate(picks):
        pieces, piece_rates = [], []
        for i, a, b in row_spans(starts, ends, int(pick) * width, width):
            touched.add(i)
            pieces.append(np.append(read(i), np.int32(eos))[a:b])
            piece_rate = np.full(b - a, index[i, 1] / max(1, index[i, 0]))
            if b == lengths[i]:
                piece_rate[-1] = 0.0  # the eos covers no text
            piece_rates.append(piece_rate)
        tokens[row], rates[row] = np.concatenate(pieces), np.concatenate(piece_rates)
    return tokens, rates, len(touched)


def heldout_sequences(data_dir: str | os.PathLike, source: str, *, seq_len: int,
                      max_sequences: int | None = None) -> HeldoutSequences:
    """The held-out split's packed rows of seq_len + 1 (`packed_rows`): all of them, or
    `max_sequences` evenly spaced over the split."""
    manifest = load_manifest(data_dir, source)
    eos = manifest["tokenizer"]["eos_id"]
    tokens, rates, _ = packed_rows(data_dir, source, "heldout", width=seq_len + 1,
                                   max_rows=max_sequences)
    targets = tokens[:, 1:]
    exact = manifest["tokenizer"]["identity"] == "bytes"
    if exact:
        num_bytes = int((targets < 256).sum())
    else:
        num_bytes = int(round(float(rates[:, 1:].sum())))
    return HeldoutSequences(tokens, num_bytes, int(targets.size),
                            int((targets == eos).sum()), exact)


def documents(data_dir: str | os.PathLike, source: str, split: str = "train",
              limit: int | None = None) -> Iterator[np.ndarray]:
    """Each document's int32 tokens (no eos), in stored order; at most `limit` of them."""
    _, docs, _ = _docs_dataset(data_dir, source, split)
    for i in range(len(docs) if limit is None else min(limit, len(docs))):
        yield np.asarray(docs[i]["tokens"], np.int32)
