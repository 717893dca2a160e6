"""Planted harmful experts for the screening tests (moesaic.merge.planted's kinds), built from
the synthetic branches of tests.support.merging, each with a valid fingerprint:

  hijacker   an honest expert whose router row is scaled by 50 (it takes every token)
  random     an expert whose FFN is noise, as training on random bytes leaves it
  damaged    an honest expert whose FFN weights are scaled by 8 (a broken conversion)
  backdoor   an expert with hidden units that write the lm_head direction of a payload's
             bytes on every token (a backdoor that leaks onto text without its trigger; one
             that stays silent there is not something proxy data can show)
"""

from __future__ import annotations

import numpy as np

from moesaic.merge import planted
from moesaic.model import ModelConfig, checkpoint
from tests.support.merging import make_branch

# the synthetic base of the calibration and screening tests: byte vocabulary, so the prepared
# test data (tests.support.training.make_data) is its proxy data
BYTE_CFG = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=48)
PAYLOAD = b"XYZ"
KINDS = planted.KINDS


def plant(kind: str, base_path, path, source: str, seed: int):
    base = checkpoint.load_tensors(base_path, ["lm_head"])

    def tamper(own, stats, meta, hashes):
        planted.tamper(kind, own, rng=np.random.default_rng(seed + 77),
                       lm_head=base["lm_head"], payload=list(PAYLOAD))

    return make_branch(base_path, path, source, seed, tamper=tamper)
