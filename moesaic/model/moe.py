"""The FFN of every block: a Mixture of SwiGLU experts stacked expert-first.

  w_gate, w_up: (E, D, F)   w_down: (E, F, D)   router: (E, D)   bias: (E,)

Routing (FlexOlmo): logits = router @ x (+ bias, clamped to <= 0 for every expert but index 0,
the public one), softmax in float32 over all experts, top-k; the top-k weights are not
renormalised unless `norm_topk_prob`. E = 1 is a plain SwiGLU FFN without a router.

What the router scores is `cfg.router_input`: "token" (FlexOlmo) scores each token's own
residual stream; "prefix_mean" scores the running mean of the residual stream over the row up to
and including the token (causal, so it stays a language model). A prefix mean carries the
sequence's domain, which one token of a byte-level model barely does; the experts still see the
token itself.

Dispatch paths live in `moesaic.model.dispatch`; this module owns the parameters, routing and
the auxiliary losses, which it returns rather than hides.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moesaic.model import (
    all_to_all,  # noqa: F401  (registers the "all_to_all" dispatch)
    dispatch,
    gate,
)
from moesaic.model.config import ModelConfig
from moesaic.model.layers import dense, stacked_param
from moesaic.model.sharding import constrain


class RouterState(nnx.Variable):
    """Router rows and biases that no optimizer updates (nonparametric routers: centroids,
    ridge solutions, frozen random rows). Checkpoints carry them like parameters."""


class Routing(NamedTuple):
    weights_tk: jax.Array  # (T, k) float32 mixing weights of the chosen experts
    experts_tk: jax.Array  # (T, k) int32 chosen experts, best first
    probs_te: jax.Array  # (T, E) float32 softmax over all experts
    logits_te: jax.Array  # (T, E) float32


def effective_bias(bias_e: jax.Array) -> jax.Array:
    """FlexOlmo's negative bias: min(b, 0) for every expert but the public one (index 0)."""
    clamped = jnp.minimum(bias_e.astype(jnp.float32), 0.0)
    return clamped.at[0].set(0.0)


def router_inputs(x_btd: jax.Array, kind: str) -> jax.Array:
    """What the router scores, (B, T, D) float32: the tokens themselves ("token") or the causal
    running mean over each row ("prefix_mean": position t sees the mean of positions 0..t)."""
    x = x_btd.astype(jnp.float32)
    if kind == "token":
        return x
    if kind == "prefix_mean":
        counts = jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)[None, :, None]
        return jnp.cumsum(x, axis=1) / counts
    raise ValueError(f"unknown router input {kind!r}")


def route(x_td: jax.Array, router_ed: jax.Array, bias_e: jax.Array | None, top_k: int,
          norm_topk_prob: bool, gate_tp: jax.Array | None = None) -> Routing:
    """Softmax routing over the experts, or with `gate_tp` (T, P) the party gate's mixture of
    each party's model alone (`moesaic.model.gate.mix`); `logits_te` is then log of the mix."""
    # full float32 products: on TPU a float32 matmul defaults to one bfloat16 pass, which
    # would let near ties pick other experts than the exported model does
    logits = jnp.einsum("td,ed->te", x_td.astype(jnp.float32), router_ed.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    if bias_e is not None:
        logits = logits + effective_bias(bias_e)
    if gate_tp is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        probs = gate.mix(logits, gate_tp)
        logits = jnp.log(jnp.maximum(probs, 1e-30))
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32), probs, logits)


def routing_losses(r: Routing, n_experts: int) -> dict[str, jax.Array]:
    """Router z-loss, the load-balancing loss E * sum_e f_e P_e, each expert's share of tokens
    and of router weight, and its router weight per token (unnormalised: with top-k weights
    that do not sum to 1, only this one pools exactly over batches)."""
    counts = jnp.zeros((n_experts,), jnp.float32).at[r.experts_tk.reshape(-1)].add(1.0)
    token_share = counts / r.experts_tk.size
    weight_sum = jnp.zeros((n_experts,), jnp.float32).at[r.experts_tk.reshape(-1)].add(
        r.weights_tk.reshape(-1))
    z = jax.nn.logsumexp(r.logits_te, axis=-1)
    return dict(
        z_loss=jnp.mean(z * z),
        lb_loss=n_experts * jnp.sum(token_share * jnp.mean(r.probs_te, axis=0)),
        token_share=token_share,
        weight_share=weight_sum / jnp.maximum(jnp.sum(weight_sum), 1e-9),
        weight_per_token=weight_sum / r.experts_tk.shape[0],
    )


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    return dense(jax.nn.silu(dense(x, w_gate)) * dense(x, w_up), w_down)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # FFN experts, and the never-routed padding of an expert-parallel copy
        e = cfg.n_experts - cfg.lora_experts + cfg.expert_padding
        d, f = cfg.d_model, cfg.d_ff
        self.w_gate = stacked_param(rngs, cfg, (e, d, f), ("expert", "embed", "mlp"))
        self.w_up = stacked_param(rngs, cfg, (e, d, f), ("expert", "embed", "mlp"))
        self.w_down = stacked_param(rngs, cfg, (e, f, d), ("expert", "mlp", "embed"))
        if cfg.is_moe:
            kind = nnx.Param if cfg.router_trainable else RouterState
            n = cfg.stacked_experts  # the router scores the low-rank experts too
            self.router = stacked_param(rngs, cfg, (n, d), ("expert", "embed"), kind=kind)
            if cfg.router_bias:
                self.bias = stacked_param(None, cfg, (n,), ("expert",), init="zeros", kind=kind)

    def routing(self, x_td: jax.Array, gate_tp: jax.Array | None = None) -> Routing:
        """Routing over the n_experts real experts: padding rows (`expert_padding`) are not
        scored, so no token reaches them and they get no gradient. `gate_tp`: the party
        gate of each token (a model with `gate_parties`)."""
        n = self.cfg.n_experts
        bias = self.bias[..., :n] if self.cfg.router_bias else None
        r = route(x_td, self.router[..., :n, :], bias, self.cfg.top_k, self.cfg.norm_topk_prob,
                  gate_tp)
        if self.cfg.expert_split > 1:  # m sub-experts of one row: each p/m of the softmax
            r = r._replace(weights_tk=r.weights_tk * self.cfg.expert_split)
        return r

    def __call__(self, x_btd: jax.Array, gate_tp: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        dt = cfg.compute_dtype
        w_gate, w_up, w_down = (w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down))
        b, t, d = x_btd.shape
        if not cfg.is_moe:
            y = swiglu(x_btd, w_gate[0], w_up[0], w_down[0])
            one = jnp.ones((1,), jnp.float32)
            zero = jnp.zeros((), jnp.float32)
            return y, dict(z_loss=zero, lb_loss=zero, dropped=zero, token_share=one,
                           weight_share=one, weight_per_token=one)
        x_td = x_btd.reshape(b * t, d)
        r = self.routing(router_inputs(x_btd, cfg.router_input).reshape(b * t, d), gate_tp)
        fn = dispatch.get(cfg.dispatch)
        # padding slots hold no tokens: the capacity per expert stays that of n_experts
        factor = cfg.capacity_factor
        if cfg.expert_padding:
            factor *= cfg.stacked_experts / cfg.n_experts
        y_td, dropped = fn(x_td, r.weights_tk, r.experts_tk, w_gate, w_up, w_down,
                           capacity_factor=factor)
        aux = routing_losses(r, cfg.n_experts)
        aux["dropped"] = dropped.astype(jnp.float32) / r.experts_tk.size
        y = constrain(y_td.reshape(b, t, d), ("batch", "length", "embed"))
        return y.astype(x_btd.dtype), aux
