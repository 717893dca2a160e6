"""Incremental decoding: the decoder run on a few new tokens per row against a key/value cache.

    cache = init_cache(cfg, batch=B, size=S)
    logits_btv, cache = forward(model, tokens_bt, valid_bt, cache)   # prefill: T = prompt
    logits_b1v, cache = forward(model, next_b1, ones_b1, cache)      # then one token a step

Rows are left-padded to one length: `valid_bt` marks the real tokens. A pad token takes a cache
slot that no real token ever attends to; each real token's RoPE position counts only the real
tokens before it in its row, so a padded row computes what it would alone.

The cache holds, per layer, the keys and values of every slot written so far and, for
`router_input="prefix_mean"`, the running sum of the router inputs over each row's real tokens
(with the count in `count`): the router of a new token scores (sum + its input) / (count + 1),
which is the causal mean `moe.router_inputs` takes over the whole row. A model with a party
gate (`moesaic.model.gate`) keeps each row's gate scores and last real token the same way.
Everything else is the block of `transformer.Block` (same norms, RoPE, routing and `dropless`
dispatch), computed from the same parameters; `tests/model/test_decode.py` holds greedy
decoding with the cache to recomputing the whole prefix each step, for dense, MoE,
prefix-mean and gated models.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moesaic.model import dispatch, gate
from moesaic.model.config import ModelConfig
from moesaic.model.layers import dense, rms_norm, rope
from moesaic.model.moe import swiglu
from moesaic.model.transformer import Decoder


class Cache(NamedTuple):
    k: jax.Array  # (L, B, S, K, H) keys of every slot written
    v: jax.Array  # (L, B, S, K, H) values
    valid: jax.Array  # (B, S) bool: the slot holds a real token
    x_sum: jax.Array  # (L, B, D) float32: sum of the router inputs of each row's real tokens
    count: jax.Array  # (B,) int32: real tokens of each row so far
    length: jax.Array  # () int32: slots written (the same for every row)
    gate_z: jax.Array  # (B, P) float32: the party gate's scores so far (P = 0 without one)
    last: jax.Array  # (B,) int32: each row's last real token (eos before the first)

    @property
    def size(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: ModelConfig, *, batch: int, size: int) -> Cache:
    """An empty cache of `size` slots per row (prompt plus new tokens)."""
    kv = (cfg.n_layers, batch, size, cfg.n_kv_heads, cfg.head_size)
    return Cache(k=jnp.zeros(kv, cfg.compute_dtype), v=jnp.zeros(kv, cfg.compute_dtype),
                 valid=jnp.zeros((batch, size), bool),
                 x_sum=jnp.zeros((cfg.n_layers, batch, cfg.d_model), jnp.float32),
                 count=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32),
                 gate_z=jnp.zeros((batch, cfg.gate_parties), jnp.float32),
                 last=jnp.full((batch,), cfg.eos_id, jnp.int32))


def _party_gate(model: Decoder, tokens_bt, valid_bt, cache: Cache):
    """(B*T, P) the party gate of the new tokens (`Decoder.party_gate` over the whole row)
    and the scores and last token the cache keeps; (None, ...) without a gate."""
    cfg = model.cfg
    last = jnp.max(jnp.where(valid_bt, jnp.arange(tokens_bt.shape[1])[None], -1), axis=1)
    new_last = jnp.where(last >= 0, jnp.take_along_axis(tokens_bt, jnp.maximum(last, 0)[:, None],
                                                        axis=1)[:, 0], cache.last)
    if not cfg.gate_parties:
        return None, cache.gate_z, new_last.astype(jnp.int32)
    z = gate.scores(model.gate_bigram[...], model.gate_context[...], tokens_bt, cfg.eos_id,
                    first_b=cache.last.astype(tokens_bt.dtype), valid_bt=valid_bt,
                    start_bp=cache.gate_z)
    g = gate.probs(z, model.gate_bias[...])
    return g.reshape(-1, g.shape[-1]), z[:, -1], new_last.astype(jnp.int32)


def _attention(attn, cfg: ModelConfig, x_btd, positions_bt, k_cache, v_cache, mask_b1ts, start):
    dt = cfg.compute_dtype
    q = dense(x_btd, attn.q[...].astype(dt))
    k = dense(x_btd, attn.k[...].astype(dt))
    v = dense(x_btd, attn.v[...].astype(dt))
    q = rope(rms_norm(q, attn.q_norm[...], cfg.norm_eps, 2), positions_bt, cfg.rope_theta)
    k = rope(rms_norm(k, attn.k_norm[...], cfg.norm_eps, 2), positions_bt, cfg.rope_theta)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
    out = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask_b1ts)
    return dense(out, attn.o[...].astype(dt), n_in=2), k_cache, v_cache


def _ffn(ffn, cfg: ModelConfig, h_btd, valid_bt, x_sum_bd, count_b, gate_tp=None):
    """The MoE FFN of `moe.MoE` on new tokens; returns (y, the new running sum)."""
    dt = cfg.compute_dtype
    w_gate, w_up, w_down = (w[...].astype(dt) for w in (ffn.w_gate, ffn.w_up, ffn.w_down))
    if not cfg.is_moe:
        return swiglu(h_btd, w_gate[0], w_up[0], w_down[0]), x_sum_bd
    b, t, d = h_btd.shape
    x32 = h_btd.astype(jnp.float32)
    if cfg.router_input == "prefix_mean":
        x32 = jnp.where(valid_bt[..., None], x32, 0.0)
        sums = x_sum_bd[:, None, :] + jnp.cumsum(x32, axis=1)
        counts = count_b[:, None] + jnp.cumsum(valid_bt.astype(jnp.int32), axis=1)
        scored = sums / jnp.maximum(counts, 1).astype(jnp.float32)[..., None]
        x_sum_bd = sums[:, -1]
    else:
        scored = x32
    r = ffn.routing(scored.reshape(b * t, d), gate_tp)
    y, _ = dispatch.get("dropless")(h_btd.reshape(b * t, d), r.weights_tk, r.experts_tk,
                                    w_gate, w_up, w_down)
    return y.reshape(b, t, d).astype(h_btd.dtype), x_sum_bd


def forward(model: Decoder, tokens_bt: jax.Array, valid_bt: jax.Array, cache: Cache
            ) -> tuple[jax.Array, Cache]:
    """Float32 logits (B, T, V) of T new tokens per row, written to slots
    cache.length .. cache.length + T - 1, and the cache that holds them."""
    cfg = model.cfg
    if getattr(cfg, "lora_experts", 0):
        raise ValueError("decoding a model with low-rank experts (model.lora_experts) is not "
                         "supported; merge the adapters into full experts first")
    b, t = tokens_bt.shape
    start = cache.length
    valid_bt = valid_bt.astype(bool)
    # a real token's position: the real tokens before it in its row
    positions = cache.count[:, None] + jnp.cumsum(valid_bt.astype(jnp.int32), axis=1) - 1
    positions = jnp.maximum(positions, 0)
    valid = jax.lax.dynamic_update_slice(cache.valid, valid_bt, (0, start))
    slots = jnp.arange(cache.size)
    query_slots = start + jnp.arange(t)
    causal = slots[None, :] <= query_slots[:, None]  # (T, S)
    # a query sees the real slots up to its own, and itself (a pad row needs one slot)
    mask = (valid[:, None, :] & causal[None]) | (slots[None, None, :] == query_slots[None, :, None])
    mask = mask[:, None]  # (B, 1, T, S): every head alike
    x = model.embed[...].astype(cfg.compute_dtype)[tokens_bt]
    graphdef, layers = nnx.split(model.blocks)
    gate_tp, gate_z, last = _party_gate(model, tokens_bt, valid_bt, cache)

    def body(x, inputs):
        layer, k_cache, v_cache, x_sum = inputs
        block = nnx.merge(graphdef, layer)
        a, k_cache, v_cache = _attention(block.attn, cfg, x, positions, k_cache, v_cache, mask,
                                         start)
        h = x + rms_norm(a, block.attn_norm[...], cfg.norm_eps)
        y, x_sum = _ffn(block.ffn, cfg, h, valid_bt, x_sum, cache.count, gate_tp)
        return h + rms_norm(y, block.ffn_norm[...], cfg.norm_eps), (k_cache, v_cache, x_sum)

    x, (k, v, x_sum) = jax.lax.scan(body, x, (layers, cache.k, cache.v, cache.x_sum))
    x = rms_norm(x, model.final_norm[...], cfg.norm_eps)
    logits = dense(x, model.lm_head[...].astype(x.dtype)).astype(jnp.float32)
    count = cache.count + jnp.sum(valid_bt.astype(jnp.int32), axis=1)
    return logits, Cache(k, v, valid, x_sum, count, start + t, gate_z, last)
