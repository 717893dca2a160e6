"""How routed tokens reach their experts. A registry of small functions with one signature:

    fn(x_td, weights_tk, experts_tk, w_gate_edf, w_up_edf, w_down_efd, *, capacity_factor)
        -> (y_td, dropped)   # dropped: how many (token, expert) assignments were not served

  dropless  every token is served. Implementations, picked per backend by measurement
            (bench/moe_layer.py):
            dropless_ragged  sort the T*k assignments by expert, grouped matmuls
                             (`jax.lax.ragged_dot`); GPU/TPU lower it to grouped kernels.
            dropless_blocked the CPU's: the sorted assignments in blocks of rows, a loop
                             over each expert's blocks (moesaic.model.grouped); its cost and
                             memory follow the T*k routed rows. XLA:CPU lowers ragged_dot
                             to a dense dot over all experts plus slow scatters.
            dropless_gather  the capacity path with C = T (no expert can overflow): every
                             expert computes every token, E/k times the work.
  capacity  each expert takes at most C = ceil(T*k/E * capacity_factor) assignments, first
            choices before second ones, earlier tokens first; tokens are gathered into an
            (E, C, D) buffer, the experts run as one batched einsum, overflow is dropped and
            counted. Not causal: every token of the batch (all rows) competes for the slots,
            and a later token's first choice outranks an earlier token's second, so whether
            a token is served can depend on later tokens and on other rows; a perplexity
            measured under `capacity` sees them. `dropless` (the default) serves every
            assignment, so each token's output depends only on itself and what attention
            lets it see: causal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moesaic.model import grouped
from moesaic.model.sharding import constrain

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        _REGISTRY[name] = fn
        return fn
    return wrap


def get(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dispatch {name!r}; one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


@register("dropless_ragged")
def dropless_ragged(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, capacity_factor=None):
    t, k = experts_tk.shape
    n_experts = w_gate.shape[0]
    flat_experts = experts_tk.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat_experts, length=n_experts).astype(jnp.int32)
    xs = x_td[token_of]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes)) * jax.lax.ragged_dot(
        xs, w_up, group_sizes)
    ys = jax.lax.ragged_dot(h, w_down, group_sizes)
    ys = ys * weights_tk.reshape(-1)[order][:, None].astype(ys.dtype)
    y = jnp.zeros_like(x_td).at[token_of].add(ys)
    return y, jnp.zeros((), jnp.int32)


def capacity_of(n_tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
    return max(1, min(n_tokens, math.ceil(n_tokens * k / n_experts * capacity_factor)))


@register("capacity")
def capacity(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, capacity_factor=1.25):
    t, k = experts_tk.shape
    n_experts, d = w_gate.shape[0], x_td.shape[-1]
    cap = capacity_of(t, k, n_experts, capacity_factor)
    # Priority: all first choices (in token order), then all second choices, ...
    experts_kt = experts_tk.T.reshape(-1)
    one_hot = jax.nn.one_hot(experts_kt, n_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    keep = position < cap
    slot = jnp.where(keep, experts_kt * cap + position, n_experts * cap)  # out of range: drop
    token_of = jnp.tile(jnp.arange(t), k)
    buffer = jnp.zeros((n_experts * cap, d), x_td.dtype).at[slot].set(x_td[token_of],
                                                                      mode="drop")
    buffer = constrain(buffer.reshape(n_experts, cap, d), ("expert", None, "embed"))
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, w_gate)) * jnp.einsum(
        "ecd,edf->ecf", buffer, w_up)
    out = jnp.einsum("ecf,efd->ecd", h, w_down)
    out = constrain(out, ("expert", None, "embed")).reshape(n_experts * cap, d)
    served = out.at[slot].get(mode="fill", fill_value=0)
    weight = (weights_tk.T.reshape(-1) * keep).astype(served.dtype)
    y = jnp.zeros_like(x_td).at[token_of].add(served * weight[:, None])
    return y, jnp.sum(~keep).astype(jnp.int32)


@register("dropless_gather")
def dropless_gather(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, capacity_factor=None):
    n_experts = w_gate.shape[0]
    return capacity(x_td, weights_tk, experts_tk, w_gate, w_up, w_down,
                    capacity_factor=n_experts / experts_tk.shape[1])


dropless_blocked = register("dropless_blocked")(grouped.dropless_blocked)


@register("dropless")
def dropless(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, capacity_factor=None):
    fn = dropless_blocked if jax.default_backend() == "cpu" else dropless_ragged
    return fn(x_td, weights_tk, experts_tk, w_gate, w_up, w_down)
