"""Planted harmful experts for the screening tests: branch artifacts a hostile or careless
party could hand in, each with a valid fingerprint (the party computes it), built from the
synthetic branches of tests.support.merging:

  hijacker   an honest expert whose router row is scaled by 50 (it takes every token)
  random     an expert whose FFN is noise, as training on random bytes leaves it
  damaged    an honest expert whose FFN weights are scaled by 8 (a broken conversion)
  backdoor   an expert with hidden units that write the lm_head direction of a payload's
             bytes on every token (a backdoor that leaks onto text without its trigger; one
             that stays silent there is not something proxy data can show)
"""

from __future__ import annotations

import numpy as np

from moesaic.model import ModelConfig, checkpoint, names
from tests.support.merging import make_branch

# the synthetic base of the calibration and screening tests: byte vocabulary, so the prepared
# test data (tests.support.training.make_data) is its proxy data
BYTE_CFG = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=48)
PAYLOAD = b"XYZ"
KINDS = ("hijacker", "random", "damaged", "backdoor")


def plant(kind: str, base_path, path, source: str, seed: int):
    base = checkpoint.load_tensors(base_path, ["lm_head"])

    def tamper(own, stats, meta, hashes):
        rng = np.random.default_rng(seed + 77)
        if kind == "hijacker":
            own[names.ROUTER] = own[names.ROUTER] * 50
        elif kind == "random":
            for n in names.FFN_EXPERT:
                own[n] = (0.5 * rng.standard_normal(own[n].shape)).astype(own[n].dtype)
        elif kind == "damaged":
            for n in names.FFN_EXPERT:
                own[n] = own[n] * 8
        elif kind == "backdoor":
            # a few hidden units that fire on every token (gate and up read the same
            # direction: silu(s) * s > 0) and write the payload's lm_head direction
            head = base["lm_head"]  # (D, V)
            direction = head[:, list(PAYLOAD)].sum(axis=1)
            direction = direction / np.linalg.norm(direction)
            read = rng.standard_normal(head.shape[0]).astype(np.float32)
            read = 3 * read / np.linalg.norm(read)
            for n in ("blocks/ffn/w_gate", "blocks/ffn/w_up"):  # (L, 1, D, F)
                own[n] = own[n].copy()
                own[n][..., :4] = read[:, None]
            w_down = own["blocks/ffn/w_down"].copy()  # (L, 1, F, D)
            w_down[:, :, :4, :] = 10 * direction
            own["blocks/ffn/w_down"] = w_down
        else:
            raise ValueError(kind)

    return make_branch(base_path, path, source, seed, tamper=tamper)
