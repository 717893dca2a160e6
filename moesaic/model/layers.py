"""Attention and norms of the OLMo-2 block.

Every parameter is stacked over layers (leading axis `layers`, size n_layers) so the decoder
scans one block over them; inside `__call__` a module sees one layer's slice.
Shapes are named in the suffix: `x_btd` is (batch, length, d_model).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moesaic.model.config import ModelConfig
from moesaic.model.sharding import constrain


def stacked_param(rngs: nnx.Rngs | None, cfg: ModelConfig, shape: tuple[int, ...],
                  axes: tuple[str, ...], init: str = "normal",
                  std: float | None = None, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A `kind` variable (default Param) of shape (n_layers, *shape), logical axes
    ('layers', *axes)."""
    full = (cfg.n_layers, *shape)
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(full, dtype)
    elif init == "zeros":
        value = jnp.zeros(full, dtype)
    else:
        value = (std or cfg.init_std) * jax.random.normal(rngs.params(), full, dtype)
    return kind(value, axes=("layers", *axes))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, n_axes: int = 1) -> jax.Array:
    """RMSNorm over the last `n_axes` axes, in float32, as OLMo-2 computes it."""
    axes = tuple(range(-n_axes, 0))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x's last `n_in` axes contracted with w's first `n_in`, as one (tokens, in) x (in, out)
    matmul. XLA:CPU lowers a dot whose weight gradient contracts two token axes (batch and
    length) to a path about 2x slower than this 2-D one (bench/train_step.py); accelerators
    compile both forms to the same kernel."""
    lead, k = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *w.shape[n_in:])


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split layout (Hugging Face `rotate_half`)."""
    head = x_btnh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head, 2, dtype=jnp.float32) / head))
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # (b, t, h/2)
    cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x_btnh * cos + rotated * sin).astype(x_btnh.dtype)


# Query rows per block of `causal_attention` on CPU (0: one call over all rows).
CPU_QUERY_BLOCK = 64


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal `jax.nn.dot_product_attention` (B, T, N, H). On CPU, for T from 2 to 16 blocks
    of `CPU_QUERY_BLOCK` rows, each block of query rows attends only to the keys up to its
    last row: XLA:CPU otherwise computes and differentiates all T x T scores, half of them
    masked (fwd+bwd at 8 x 256 tokens, 8 heads: 0.58x the time; docs/training.md). Same
    values; accelerators keep the one call (their kernels skip masked blocks themselves)."""
    t, block = q.shape[1], CPU_QUERY_BLOCK
    if (jax.default_backend() != "cpu" or not block or t % block or t < 2 * block
            or t > 16 * block):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    outs = []
    for lo in range(0, t, block):
        hi = lo + block
        mask = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]
        outs.append(jax.nn.dot_product_attention(q[:, lo:hi], k[:, :hi], v[:, :hi],
                                                 mask=mask[None, None]))
    return jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
    """Causal self-attention with grouped-query heads and QK-norm over the full projected
    width (before RoPE), as in OLMo-2."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.q = stacked_param(rngs, cfg, (d, n, h), ("embed", "heads", "head_dim"))
        self.k = stacked_param(rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v = stacked_param(rngs, cfg, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.o = stacked_param(rngs, cfg, (n, h, d), ("heads", "head_dim", "embed"))
        self.q_norm = stacked_param(None, cfg, (n, h), ("heads", "head_dim"), init="ones")
        self.k_norm = stacked_param(None, cfg, (k, h), ("kv_heads", "head_dim"), init="ones")

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, delta=None) -> jax.Array:
        """`delta(name, x, y)`: a projection's output y of input x, adjusted (low-rank experts,
        `moesaic.model.lora.attention_delta`); None: the projections as they are."""
        cfg = self.cfg
        dt = cfg.compute_dtype
        delta = delta or (lambda name, x, y: y)
        q = delta("q", x_btd, dense(x_btd, self.q[...].astype(dt)))
        k = delta("k", x_btd, dense(x_btd, self.k[...].astype(dt)))
        v = delta("v", x_btd, dense(x_btd, self.v[...].astype(dt)))
        q = rope(rms_norm(q, self.q_norm[...], cfg.norm_eps, 2), positions_bt, cfg.rope_theta)
        k = rope(rms_norm(k, self.k_norm[...], cfg.norm_eps, 2), positions_bt, cfg.rope_theta)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        out = causal_attention(q, k, v)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return delta("o", out, dense(out, self.o[...].astype(dt), n_in=2))
