"""Planted harmful experts: branch artifacts a hostile or careless party could hand in, made
from an honest one, each with a valid fingerprint (the party computes it). The screening tests
(tests/merge/test_screen.py) and the demo's screening stage (moesaic/demo/screening.py) merge
them:

  hijacker   the honest expert with its router row scaled by HIJACK_SCALE (it takes every
             token)
  random     an expert whose FFN is noise, as training on random bytes leaves it
  damaged    the honest expert with its FFN weights scaled by 8 (a broken conversion)
  backdoor   the honest expert with a few hidden units that write the lm_head direction of a
             payload's tokens on every token (a backdoor that leaks onto text without its
             trigger; one that stays silent there is not something proxy data can show)
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from moesaic.branch_train import artifact
from moesaic.model import checkpoint, names

KINDS = ("hijacker", "random", "damaged", "backdoor")
HIJACK_SCALE = 50.0


def tamper(kind: str, own: dict, *, rng: np.random.Generator, lm_head: np.ndarray | None = None,
           payload: Sequence[int] = ()) -> None:
    """Changes the owner's tensors `own` (an artifact's, expert axis of size 1) in place into
    those of a planted expert of `kind`; the backdoor needs the base's `lm_head` (D, V) and the
    payload's token ids."""
    if kind == "hijacker":
        own[names.ROUTER] = own[names.ROUTER] * HIJACK_SCALE
    elif kind == "random":
        for n in names.FFN_EXPERT:
            own[n] = (0.5 * rng.standard_normal(own[n].shape)).astype(own[n].dtype)
    elif kind == "damaged":
        for n in names.FFN_EXPERT:
            own[n] = own[n] * 8
    elif kind == "backdoor":
        if lm_head is None or not len(payload):
            raise ValueError("a planted backdoor needs the base's lm_head and a payload")
        # a few hidden units that fire on every token (gate and up read the same direction:
        # silu(s) * s > 0) and write the payload's lm_head direction
        direction = lm_head[:, list(payload)].sum(axis=1)
        direction = direction / np.linalg.norm(direction)
        read = rng.standard_normal(lm_head.shape[0]).astype(np.float32)
        read = 3 * read / np.linalg.norm(read)
        for n in ("blocks/ffn/w_gate", "blocks/ffn/w_up"):  # (L, 1, D, F)
            own[n] = np.array(own[n], copy=True)
            own[n][..., :4] = read[:, None]
        w_down = np.array(own["blocks/ffn/w_down"], copy=True)  # (L, 1, F, D)
        w_down[:, :, :4, :] = 10 * direction
        own["blocks/ffn/w_down"] = w_down
    else:
        raise ValueError(f"planted expert {kind!r}: one of {list(KINDS)}")


def plant(kind: str, branch: str | pathlib.Path, out: str | pathlib.Path, *, seed: int = 0,
          base: str | pathlib.Path | None = None, payload: Sequence[int] = ()) -> pathlib.Path:
    """The honest branch artifact `branch` turned into a planted expert of `kind`, written to
    `out` under the same source name (the backdoor reads `base`'s lm_head)."""
    meta = artifact.read_meta(branch)
    flat = checkpoint.load_tensors(branch, checkpoint.tensor_metadata(branch))
    own_names = artifact.own_tensor_names(meta)
    own = {n: np.asarray(flat[n]) for n in own_names}
    stats = {n: np.asarray(flat[n]) for n in (*artifact.STATS, *artifact.NGRAM) if n in flat}
    lm_head = None
    if kind == "backdoor":
        if base is None:
            raise ValueError("a planted backdoor needs base= (its lm_head)")
        lm_head = np.asarray(checkpoint.load_tensors(base, ["lm_head"])["lm_head"])
    tamper(kind, own, rng=np.random.default_rng(seed + 77), lm_head=lm_head, payload=payload)
    kept = {k: v for k, v in meta.items() if k not in ("fingerprint", "kind")}
    kept["hash"] = meta.get("hash", checkpoint.LEGACY_HASH)  # what its frozen hashes were made with
    artifact.save(out, own, stats, {**kept, "planted": kind})
    return pathlib.Path(out)
