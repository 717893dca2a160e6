"""Low-rank experts in a merge (`moesaic.model.lora`, docs/low-rank.md).

A merge may hold FFN parties and low-rank parties together. The merged model's slots are the
base's experts, then the FFN parties, then the low-rank parties, each group in the order
given (`ordered`): the FFN tensors stack the base's experts and the FFN parties, the low-rank
tensors blocks/lora/<target>_{a,b} stack the low-rank parties on their own expert axis
(`stacked`), and the router has a row for every slot. So each adapted projection is the base
projection plus the router-weighted sum of the low-rank parties' updates, with the FFN
experts' per-layer routing. Every low-rank party of one merge must share the rank, alpha and
targets (`merged_config`): one stacked tensor per target holds them all.

A merged model keeps each low-rank party's A and B in its slot of the stacked tensors, so
`merge remove` and `merge add` read them back and run the same merge (contract 10).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moesaic.merge import sources as src
from moesaic.merge.sources import Base, MergeRefused, Party
from moesaic.model import checkpoint, lora, streaming
from moesaic.model.config import ModelConfig
from moesaic.model.names import BIAS, ROUTER, W_DOWN, W_GATE, W_UP, ngram_name, stat_name

SETTINGS = ("lora_rank", "lora_alpha", "lora_targets")


def ordered(parties: list[Party]) -> list[Party]:
    """The parties in slot order: the FFN parties first, then the low-rank ones."""
    return [p for p in parties if not p.low_rank] + [p for p in parties if p.low_rank]


def settings(party: Party) -> dict:
    model = party.meta.get("model") or {}
    return {k: (tuple(model.get(k, ())) if k == "lora_targets" else model.get(k))
            for k in SETTINGS}


def merged_config(cfg: ModelConfig, parties: list[Party]) -> ModelConfig:
    """`cfg` (the merged model's) with the low-rank parties' settings; refuses parties that
    disagree on them, naming both."""
    low = [p for p in parties if p.low_rank]
    if not low:
        return cfg
    first = settings(low[0])
    for p in low[1:]:
        if settings(p) != first:
            raise MergeRefused(f"branch {p.source!r} ({p.path}): low-rank settings "
                               f"{settings(p)} differ from branch {low[0].source!r}'s {first}; "
                               "the low-rank experts of one merge share rank, alpha and targets")
    return cfg.replace(lora_experts=len(low), **first)


def check_shapes(base: Base, party: Party, label: str) -> None:
    """A low-rank party's A and B fit the base (one expert of its rank and targets)."""
    settings_ = settings(party)
    try:
        cfg = base.cfg.replace(n_experts=base.n_experts + 1, lora_experts=1, **settings_)
    except ValueError as err:
        raise MergeRefused(f"{label}: {err}") from None
    for name, shape in lora.shapes(cfg).items():
        got = party.own.get(name)
        if got is None:
            raise MergeRefused(f"{label}: low-rank tensor {name!r} missing")
        if tuple(got.shape) != shape:
            raise MergeRefused(f"{label}: tensor {name!r} has shape {tuple(got.shape)}, its "
                               f"rank and the base need {shape}")


def stacked(parties: list[Party]) -> dict[str, streaming.TensorSource]:
    """The low-rank parties' A and B, stacked on the expert axis in slot order."""
    low = [p for p in parties if p.low_rank]
    if not low:
        return {}
    return {name: src.stack_experts([p.own[name] for p in low])
            for name in lora.tensor_names(settings(low[0])["lora_targets"])}


def update_blocks(base: Base, party: Party, layer: int) -> list[np.ndarray]:
    """A party's update, at `layer`, of the projections that read the router input, as (in,
    out) blocks: an FFN party's gate and up minus the public expert's; a low-rank party's
    s A B of gate and up, or of q, k, v when it adapts neither (the arrow router)."""
    if not party.low_rank:
        return [party.own[n].rows(layer, layer + 1)[0, 0].astype(np.float64)
                - base.tensors[n].rows(layer, layer + 1)[0, 0].astype(np.float64)
                for n in (W_GATE, W_UP)]
    st = settings(party)
    targets = ([t for t in ("gate", "up") if t in st["lora_targets"]]
               or [t for t in ("q", "k", "v") if t in st["lora_targets"]])
    if not targets:
        raise MergeRefused(f"branch {party.source!r} ({party.path}): adapts none of the "
                           f"projections that read the router input (gate, up, q, k, v): "
                           f"its targets are {list(st['lora_targets'])}")
    s = (st["lora_alpha"] or st["lora_rank"]) / st["lora_rank"]
    out = []
    for t in targets:
        a = party.own[lora.tensor_name(t, "a")].rows(layer, layer + 1)[0, 0]
        b = party.own[lora.tensor_name(t, "b")].rows(layer, layer + 1)[0, 0]
        out.append(s * (a.astype(np.float64) @ b.astype(np.float64)))
    return out


# ---- FlexMoRE: full FFN experts as low-rank ones ------------------------------------------

FFN_TARGETS = {"gate": W_GATE, "up": W_UP, "down": W_DOWN}


class ArrayView:
    """An array held in memory, read like a stored `sources.View`."""

    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array
        self.shape, self.dtype = tuple(array.shape), array.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]

    def read(self) -> np.ndarray:
        return self.array

    def pieces(self):
        for layer in range(self.shape[0]):
            yield self.array[layer:layer + 1]

    def source(self) -> streaming.TensorSource:
        return streaming.TensorSource(self.shape, self.dtype, self.pieces, rows_per_chunk=1)


def factor(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A (in, r), B (r, out)) with A B the best rank-r approximation of `delta` (in, out):
    the truncated SVD, its singular values split evenly between the factors."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def convert(base: Base, party: Party, rank: int) -> Party:
    """An FFN party as a low-rank one (FlexMoRE, arXiv 2602.08818): each of gate, up, down
    becomes the rank-`rank` truncated SVD of its difference from the public FFN (expert 0),
    with alpha = rank (scale 1). The row, bias and statistics stay; the meta records the FFN
    artifact's fingerprint and gets the fingerprint of what it holds now."""
    label = f"branch {party.source!r} ({party.path})"
    out = {}
    for target, name in FFN_TARGETS.items():
        lyr, _, i, o = party.own[name].shape
        if not 1 <= rank <= min(i, o):
            raise MergeRefused(f"--low-rank {rank}: tensor {name!r} of {label} is {i} x {o} "
                               f"per layer, so the rank must be in [1, {min(i, o)}]")
        dtype = party.own[name].dtype
        a = np.zeros((lyr, 1, i, rank), dtype)
        b = np.zeros((lyr, 1, rank, o), dtype)
        for layer in range(lyr):
            delta = (party.own[name].rows(layer, layer + 1)[0, 0].astype(np.float64)
                     - base.tensors[name].rows(layer, layer + 1)[0, 0].astype(np.float64))
            a[layer, 0], b[layer, 0] = factor(delta, rank)
        out[lora.tensor_name(target, "a")] = ArrayView(lora.tensor_name(target, "a"), a)
        out[lora.tensor_name(target, "b")] = ArrayView(lora.tensor_name(target, "b"), b)
    for name in (ROUTER, BIAS):
        out[name] = party.own[name]
    algorithm = checkpoint.hash_algorithm(party.meta)  # that of its frozen_hashes too
    hashes = {n: checkpoint.tensor_hash(v.read(), algorithm) for n, v in out.items()}
    hashes.update({stat_name(s): checkpoint.tensor_hash(v.read(), algorithm)
                   for s, v in party.stats.items()})
    hashes.update({ngram_name(s): checkpoint.tensor_hash(v.read(), algorithm)
                   for s, v in (party.ngram or {}).items()})
    meta = {**party.meta,
            "model": {**party.meta["model"], "lora_experts": 1, "lora_rank": rank,
                      "lora_alpha": 0.0, "lora_targets": list(FFN_TARGETS)},
            "low_rank_from": {"rank": rank, "ffn_fingerprint": party.meta["fingerprint"]},
            "fingerprint": checkpoint.fingerprint_of_hashes(hashes)}
    return dataclasses.replace(party, meta=meta, own=out)


def converted(base: Base, parties: list[Party], rank: int | None) -> list[Party]:
    """The parties with every FFN party converted to rank `rank` (None: as they are)."""
    if rank is None:
        return parties
    return ordered([p if p.low_rank else convert(base, p, rank) for p in parties])
