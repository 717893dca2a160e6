"""The branch artifact: what one party hands to the merge (docs/design.md, contract 3).

Only what the owner trained, plus aggregates of its data under the base model:

    blocks/ffn/w_gate  (L, 1, D, F)    the owner's expert in every layer (expert axis kept)
    blocks/ffn/w_up    (L, 1, D, F)
    blocks/ffn/w_down  (L, 1, F, D)
    blocks/ffn/router  (L, 1, D)       its router row
    blocks/ffn/bias    (L, 1)          its bias (the model clamps it to <= 0)
    stats/x_sum        (L, D) float32  per layer, sum of the router inputs (X^T 1)
    stats/xtx          (L, D, D)       per layer, X^T X
    stats/mean_hidden  (L, D)          x_sum / n_tokens
    ngram/bigram       (buckets,)      token-pair counts of its data (moesaic.routing.ngram)
    ngram/context      (V,)            counts of each pair's first token

meta.json: kind="branch", source, base_fingerprint (of the base it started from),
frozen_hashes {tensor name: hash of that base tensor as the branch job held it at the end},
base_experts (n experts in the base), model (the branch model's ModelConfig, n_experts =
base_experts + 1), config (the resolved job config), tokens_seen, stats_tokens,
stats_documents, steps. No text and no per-document values.

A low-rank branch (`moesaic.branch_train.lora`) holds blocks/lora/<target>_{a,b} (L, 1, ...)
in place of the FFN tensors (`own_tensor_names`).

A `dense` branch (BTX/BTM baselines) is a whole model checkpoint with kind="dense_branch".
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

from moesaic.model import checkpoint, lora, names

KIND = "branch"
DENSE_KIND = "dense_branch"
OWN_TENSORS = names.EXPERT_TENSORS  # the owner's slice of each, expert axis of size 1
STATS = tuple(names.stat_name(s) for s in names.STAT_NAMES)
NGRAM = tuple(names.ngram_name(s) for s in names.NGRAM_NAMES)
REQUIRED_META = ("source", "base_fingerprint", "frozen_hashes", "base_experts", "model",
                 "config", "tokens_seen", "stats_tokens", "stats_documents", "steps")


def own_slices(flat: Mapping[str, object], index: int) -> dict[str, np.ndarray]:
    """The owner's tensors from a full branch model's parameters: expert `index`."""
    return {name: np.asarray(flat[name])[:, index:index + 1] for name in OWN_TENSORS}


def own_tensor_names(meta: Mapping) -> tuple[str, ...]:
    """The owner's tensors of an artifact with this meta: a low-rank expert's A and B
    (`moesaic.model.lora`, when its model has lora_experts) with its row and bias, else the
    FFN expert with its row and bias."""
    model = meta.get("model") or {}
    if model.get("lora_experts"):
        return (*lora.tensor_names(model["lora_targets"]), names.ROUTER, names.BIAS)
    return OWN_TENSORS


def save(path: str | pathlib.Path, own: Mapping, stats: Mapping, meta: dict, **kw) -> None:
    own_names = own_tensor_names(meta)
    missing = [n for n in own_names if n not in own] + [n for n in STATS if n not in stats]
    missing += [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"branch artifact {path}: missing {missing}")
    known = set(STATS) | set(NGRAM)  # the bigram counts are optional (older artifacts)
    extra = sorted(set(own) - set(own_names)) + sorted(set(stats) - known)
    if extra:
        raise ValueError(f"branch artifact {path}: unexpected tensors {extra}")
    checkpoint.save(path, {**own, **stats}, {**meta, "kind": KIND}, **kw)


def read_meta(path: str | pathlib.Path) -> dict:
    meta = checkpoint.read_meta(path)
    if meta.get("kind") != KIND:
        raise ValueError(f"{path} is a {meta.get('kind')!r} checkpoint, not a branch artifact")
    return meta
