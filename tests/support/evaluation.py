"""The tiny models the evaluation tests score: one dense shape and one MoE shape, each
compiled once per test session."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moesaic.model.config import ModelConfig
from moesaic.model.transformer import Decoder

SEQ = 16
CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64)
MOE = dict(n_experts=3, top_k=2, norm_topk_prob=True)  # one MoE shape: compiled once


def tiny(seed: int = 0, **changes) -> Decoder:
    return Decoder(CFG.replace(**changes), rngs=nnx.Rngs(seed))


def uniform_model() -> Decoder:
    """lm_head = 0: every next-token distribution is uniform over the vocabulary."""
    model = tiny()
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
    return model
