"""Low-rank experts: a party's expert as rank-r updates of the public model's projections.

A model with `cfg.lora_experts` = m > 0 has n_experts = e + m experts: e full FFN experts
(w_gate, w_up, w_down of shape (L, e, ...), expert 0 the public one) and m low-rank experts,
the last m router slots. Low-rank expert j adapts each target projection W (attention q, k,
v, o; the public FFN's gate, up, down) by

    W_j = W + s * A_j @ B_j        A_j (in, r), B_j (r, out), s = lora_alpha / lora_rank

stored stacked on an expert axis like the FFN experts (`tensor_name`):

    blocks/lora/<target>_a (L, m, in, r)     blocks/lora/<target>_b (L, m, r, out)

with `in` and `out` the projection's input and output widths flattened (q: D -> H*hd, o:
H*hd -> D, gate/up: D -> F, down: F -> D).

Routing is the FFN's: one router over all n_experts slots, per layer. Its top-k weights w_j(x)
mix the experts; an adapted projection is the base projection plus the weighted sum of the
low-rank experts' updates,

    y = x W + s * sum_j w_j(x) (x A_j) B_j

where the FFN's targets see the router's weights at the FFN input and the attention's targets
the same router applied to the block input. Low-rank expert j's FFN is the public FFN with
its gate/up/down updates (the nonlinearity is per expert; the down projection of the weighted
sum of hidden states is computed once). With a router that gives expert j all the weight,
the block is exactly the public model with W + s A_j B_j in place of every target W
(`adapted`). Every low-rank expert is computed for every token (weight 0 where not chosen):
the updates are small, and the FFN experts keep their dispatch (`_ffn_experts`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moesaic.model import dispatch
from moesaic.model.config import ModelConfig
from moesaic.model.layers import stacked_param
from moesaic.model.moe import Routing, router_inputs, routing_losses, swiglu
from moesaic.model.names import (
    ATTN_K,
    ATTN_O,
    ATTN_Q,
    ATTN_V,
    BIAS,
    ROUTER,
    W_DOWN,
    W_GATE,
    W_UP,
)
from moesaic.model.sharding import constrain

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_TARGETS = ("q", "k", "v", "o")
BASE_TENSOR = {"q": ATTN_Q, "k": ATTN_K, "v": ATTN_V, "o": ATTN_O, "gate": W_GATE,
               "up": W_UP, "down": W_DOWN}
LORA = "blocks/lora/"


def tensor_name(target: str, part: str) -> str:
    """"blocks/lora/q_a" for target "q" and part "a" (or "b")."""
    return f"{LORA}{target}_{part}"


def tensor_names(targets) -> tuple[str, ...]:
    return tuple(tensor_name(t, p) for t in targets for p in ("a", "b"))


def widths(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of a target projection, its head axes flattened."""
    d, f = cfg.d_model, cfg.d_ff
    return {"q": (d, cfg.n_heads * cfg.head_size), "k": (d, cfg.n_kv_heads * cfg.head_size),
            "v": (d, cfg.n_kv_heads * cfg.head_size), "o": (cfg.n_heads * cfg.head_size, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}[target]


def shapes(cfg: ModelConfig, experts: int | None = None) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the low-rank tensors, expert axis `experts` (default cfg.lora_experts)."""
    m = cfg.lora_experts if experts is None else experts
    out = {}
    for t in cfg.lora_targets:
        i, o = widths(cfg, t)
        out[tensor_name(t, "a")] = (cfg.n_layers, m, i, cfg.lora_rank)
        out[tensor_name(t, "b")] = (cfg.n_layers, m, cfg.lora_rank, o)
    return out


def check(cfg: ModelConfig) -> None:
    """Refuses a low-rank setting the model cannot hold, naming the field or the tensor."""
    if cfg.lora_experts == 0:
        return
    if cfg.lora_experts >= cfg.n_experts:
        raise ValueError(f"model.lora_experts={cfg.lora_experts}: needs at least one FFN expert "
                         f"(the public one) among n_experts={cfg.n_experts}")
    if not cfg.lora_targets:
        raise ValueError("model.lora_targets is empty: name the projections the low-rank "
                         f"experts adapt, among {TARGETS}")
    unknown = [t for t in cfg.lora_targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"model.lora_targets {unknown}: the model has no such projection; "
                         f"its projections are {TARGETS} (tensors "
                         f"{[BASE_TENSOR[t] for t in TARGETS]})")
    if len(set(cfg.lora_targets)) != len(cfg.lora_targets):
        raise ValueError(f"model.lora_targets={list(cfg.lora_targets)} names a projection twice")
    if cfg.lora_rank < 1:
        raise ValueError(f"model.lora_rank={cfg.lora_rank}: must be at least 1")
    for t in cfg.lora_targets:
        i, o = widths(cfg, t)
        if cfg.lora_rank > min(i, o):
            raise ValueError(f"model.lora_rank={cfg.lora_rank} exceeds the rank of tensor "
                             f"{BASE_TENSOR[t]!r} ({i} x {o} per layer): at most {min(i, o)}")
    if not np.isfinite(cfg.lora_alpha) or cfg.lora_alpha < 0:
        raise ValueError(f"model.lora_alpha={cfg.lora_alpha}: must be >= 0 (0: the rank)")


def scale(cfg: ModelConfig) -> float:
    return (cfg.lora_alpha or cfg.lora_rank) / cfg.lora_rank


class LowRank(nnx.Module):
    """The low-rank experts' A and B of every target, stacked over layers and experts. A starts
    N(0, 1/in) and B at zero, so a fresh low-rank expert is the public model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        m, r = cfg.lora_experts, cfg.lora_rank
        for t in cfg.lora_targets:
            i, o = widths(cfg, t)
            in_axis = "embed" if t in ("q", "k", "v", "gate", "up") else None
            out_axis = "embed" if t in ("o", "down") else None
            setattr(self, f"{t}_a", stacked_param(rngs, cfg, (m, i, r), ("expert", in_axis, None),
                                                  std=1.0 / np.sqrt(i)))
            setattr(self, f"{t}_b", stacked_param(None, cfg, (m, r, o), ("expert", None, out_axis),
                                                  init="zeros"))

    def has(self, target: str) -> bool:
        return target in self.cfg.lora_targets

    def update(self, target: str, x_ti: jax.Array, w_tm: jax.Array) -> jax.Array:
        """s * sum_j w_j (x A_j) B_j, (T, out)."""
        dt = self.cfg.compute_dtype
        a = getattr(self, f"{target}_a")[...].astype(dt)
        b = getattr(self, f"{target}_b")[...].astype(dt)
        u = jnp.einsum("ti,mir->tmr", x_ti, a) * w_tm[:, :, None].astype(dt)
        return scale(self.cfg) * jnp.einsum("tmr,mro->to", u, b)

    def per_expert(self, target: str, x_ti: jax.Array) -> jax.Array:
        """s (x A_j) B_j for every expert j, (T, m, out)."""
        dt = self.cfg.compute_dtype
        a = getattr(self, f"{target}_a")[...].astype(dt)
        b = getattr(self, f"{target}_b")[...].astype(dt)
        return scale(self.cfg) * jnp.einsum("tmr,mro->tmo", jnp.einsum("ti,mir->tmr", x_ti, a), b)


def low_rank_weights(r: Routing, first: int, m: int) -> jax.Array:
    """(T, m) router weight of low-rank expert j (slot first + j) per token; 0 where not chosen."""
    onehot = jax.nn.one_hot(r.experts_tk - first, m, dtype=jnp.float32)  # (T, k, m)
    return jnp.einsum("tk,tkm->tm", r.weights_tk, onehot)


def attention_delta(moe, lora: LowRank, x_btd: jax.Array, gate_tp: jax.Array | None = None):
    """The attention's hook (`Attention.__call__`'s `delta`): adds the routed low-rank updates
    of the attention targets, weighted by the router over the block input."""
    cfg = moe.cfg
    if not any(lora.has(t) for t in ATTENTION_TARGETS):
        return None
    b, t, d = x_btd.shape
    r = moe.routing(router_inputs(x_btd, cfg.router_input).reshape(b * t, d), gate_tp)
    w_tm = low_rank_weights(r, cfg.n_experts - cfg.lora_experts, cfg.lora_experts)

    def delta(target: str, x_in: jax.Array, y: jax.Array) -> jax.Array:
        if not lora.has(target):
            return y
        x_ti = x_in.reshape(b * t, -1)
        return y + lora.update(target, x_ti, w_tm).reshape(y.shape).astype(y.dtype)

    return delta


def _ffn_experts(cfg: ModelConfig, x_td, r: Routing, w_gate, w_up, w_down):
    """(y, dropped) of the FFN experts alone. One FFN expert (a dense base): the public FFN on
    every token, times its weight. Several: the configured dispatch, with every top-k entry
    on a low-rank slot sent, at weight 0, to an appended zero expert whose overflow is not
    counted (the real experts keep their capacity)."""
    e = cfg.n_experts - cfg.lora_experts
    t, k = r.experts_tk.shape
    if e == 1:
        w0 = jnp.sum(jnp.where(r.experts_tk == 0, r.weights_tk, 0.0), axis=-1)
        return (swiglu(x_td, w_gate[0], w_up[0], w_down[0]) * w0[:, None].astype(x_td.dtype),
                jnp.zeros((), jnp.int32))
    n = w_gate.shape[0]  # the FFN experts (and any padding): the zero expert is slot n
    on_ffn = r.experts_tk < e
    factor = cfg.capacity_factor * (n + 1) / e

    def pad(w):
        return jnp.concatenate([w, jnp.zeros_like(w[:1])])

    y_td, dropped = dispatch.get(cfg.dispatch)(
        x_td, jnp.where(on_ffn, r.weights_tk, 0.0), jnp.where(on_ffn, r.experts_tk, n),
        pad(w_gate), pad(w_up), pad(w_down), capacity_factor=factor)
    if cfg.dispatch != "capacity":  # dropless: only the zero expert can overflow
        return y_td, jnp.zeros((), jnp.int32)
    spare = jnp.sum(~on_ffn) - dispatch.capacity_of(t, k, n + 1, factor)
    return y_td, jnp.maximum(dropped - jnp.maximum(spare, 0), 0)


def mixed_ffn(moe, lora: LowRank, x_btd: jax.Array, gate_tp: jax.Array | None = None
              ) -> tuple[jax.Array, dict]:
    """The FFN of a block with low-rank experts: the FFN experts (`_ffn_experts`) plus the
    low-rank experts, each the public FFN with its updates."""
    cfg = moe.cfg
    dt = cfg.compute_dtype
    b, t, d = x_btd.shape
    e, m = cfg.n_experts - cfg.lora_experts, cfg.lora_experts
    w_gate, w_up, w_down = (w[...].astype(dt) for w in (moe.w_gate, moe.w_up, moe.w_down))
    x_td = x_btd.reshape(b * t, d)
    r = moe.routing(router_inputs(x_btd, cfg.router_input).reshape(b * t, d), gate_tp)
    y_td, dropped = _ffn_experts(cfg, x_td, r, w_gate, w_up, w_down)
    w_tm = low_rank_weights(r, e, m).astype(dt)
    gate = x_td @ w_gate[0]
    up = x_td @ w_up[0]
    gate = gate[:, None, :] + (lora.per_expert("gate", x_td) if lora.has("gate") else 0)
    up = up[:, None, :] + (lora.per_expert("up", x_td) if lora.has("up") else 0)
    hidden = jax.nn.silu(gate) * up  # (T, m, F)
    mixed = jnp.einsum("tmf,tm->tf", hidden, w_tm)
    y_lr = mixed @ w_down[0]
    if lora.has("down"):
        a, bb = lora.down_a[...].astype(dt), lora.down_b[...].astype(dt)
        u = jnp.einsum("tmf,mfr->tmr", hidden, a) * w_tm[:, :, None]
        y_lr = y_lr + scale(cfg) * jnp.einsum("tmr,mro->to", u, bb)
    aux = routing_losses(r, cfg.n_experts)
    aux["dropped"] = dropped.astype(jnp.float32) / r.experts_tk.size
    y = constrain((y_td + y_lr).reshape(b, t, d), ("batch", "length", "embed"))
    return y.astype(x_btd.dtype), aux


def adapted(cfg: ModelConfig, flat: dict, expert: int) -> dict:
    """The public model with low-rank expert `expert`'s updates folded in (W + s A B for every
    target), as numpy float32 parameters of a dense model of the same shapes (`dense_config`):
    what a router that gives that expert all the weight computes."""
    out = {}
    for name, value in flat.items():
        if name.startswith(LORA) or name in (ROUTER, BIAS):
            continue
        out[name] = np.asarray(value)
    for name in (W_GATE, W_UP, W_DOWN):
        out[name] = np.asarray(flat[name])[:, :1]
    s = scale(cfg)
    for t in cfg.lora_targets:
        base = out[BASE_TENSOR[t]]
        a = np.asarray(flat[tensor_name(t, "a")], np.float32)[:, expert]
        b = np.asarray(flat[tensor_name(t, "b")], np.float32)[:, expert]
        upd = s * np.einsum("lir,lro->lio", a, b)
        if t in ("gate", "up", "down"):
            upd = upd[:, None]
        out[BASE_TENSOR[t]] = (base.astype(np.float32) + upd.reshape(base.shape)).astype(base.dtype)
    return out


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The public (dense) model's config of a model with low-rank experts."""
    return cfg.replace(n_experts=1, top_k=1, lora_experts=0, lora_rank=0, lora_alpha=0.0,
                       lora_targets=())
