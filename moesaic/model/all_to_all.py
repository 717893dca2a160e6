"""The explicit expert-parallel dispatch (`model.dispatch="all_to_all"`): tokens travel to the
devices holding their experts and back, in two all-to-alls inside a `shard_map`, instead of
leaving the exchange to the compiler's partitioner (`dropless`).

Inside the active mesh (`sharding.activate`) every device of the expert axis holds
E / n experts (stacked expert-first, E a multiple of the axis: `expert_parallel.shard_merged_model`
pads) and a slice of the tokens (the batch's shard, split further over the expert axis):

  1. each device routes its T' tokens locally and writes every (token, expert) assignment into
     a send buffer (E, C, D), C = T' (a token picks an expert at most once, so no expert can
     overflow: dropless, every assignment served)
  2. all-to-all over the expert axis: device j receives the rows for its own experts from every
     device, (n, E/n, C, D)
  3. the local experts run as one batched einsum over what they received
  4. all-to-all back; each device gathers its assignments' outputs, weights them and sums them
     per token.

The buffer has a fixed size: `jax.lax.ragged_all_to_all` (MaxText's, which sends only the
routed rows) is not implemented by XLA:CPU (jax 0.10: "HLO opcode `ragged-all-to-all` is not
supported by XLA:CPU ThunkEmitter"), so the fixed-capacity `jax.lax.all_to_all` is the one
path tested here. Outside a mesh with an expert axis there is nothing to send and the call is
`dropless`. Tested equal to `dropless` in outputs and gradients
(tests/model/test_expert_parallel.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moesaic.model import dispatch, sharding

EXPERT_AXIS = "expert"


def token_axes(mesh, rules, n_tokens: int) -> tuple[str, ...]:
    """The mesh axes the tokens are split over inside the dispatch: those of the `batch`
    axis, then the expert axis."""
    spec = sharding.logical_to_spec(("batch",), rules, mesh, (n_tokens,))
    first = spec[0] if len(spec) else None
    axes = (first,) if isinstance(first, str) else tuple(first or ())
    return tuple(a for a in axes if a != EXPERT_AXIS) + (EXPERT_AXIS,)


def _local(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, n: int):
    """One device's part (inside shard_map): its tokens out, its experts' rows in, back."""
    t, k = experts_tk.shape
    d = x_td.shape[-1]
    local_experts = w_gate.shape[0]
    n_experts = local_experts * n
    cap = t  # every assignment served
    flat = experts_tk.reshape(-1)
    one_hot = jax.nn.one_hot(flat, n_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    slot = flat * cap + position
    token_of = jnp.arange(t * k) // k
    send = jnp.zeros((n_experts * cap, d), x_td.dtype).at[slot].set(x_td[token_of])
    received = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)
    rows = received.reshape(n, local_experts, cap, d).transpose(1, 0, 2, 3)
    rows = rows.reshape(local_experts, n * cap, d)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", rows, w_gate)) * jnp.einsum(
        "ecd,edf->ecf", rows, w_up)
    out = jnp.einsum("ecf,efd->ecd", h, w_down)
    out = out.reshape(local_experts, n, cap, d).transpose(1, 0, 2, 3).reshape(-1, d)
    back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0, tiled=True)
    served = back[slot] * weights_tk.reshape(-1)[:, None].astype(back.dtype)
    return jnp.zeros_like(x_td).at[token_of].add(served)


@dispatch.register("all_to_all")
def all_to_all(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, capacity_factor=None):
    active = sharding.active()
    if active is None or active[0].shape.get(EXPERT_AXIS, 1) == 1:
        return dispatch.get("dropless")(x_td, weights_tk, experts_tk, w_gate, w_up, w_down)
    mesh, rules = active
    n = mesh.shape[EXPERT_AXIS]
    if w_gate.shape[0] % n:
        raise ValueError(f"dispatch all_to_all: {w_gate.shape[0]} stacked experts do not divide "
                         f"the expert axis of {n}; pad them "
                         "(moesaic.model.expert_parallel.shard_merged_model)")
    t = x_td.shape[0]
    axes = token_axes(mesh, rules, t)
    split = math.prod(mesh.shape[a] for a in axes)
    pad = -t % split  # rows of weight 0, sent to expert 0 and dropped from the output
    if pad:
        x_td = jnp.pad(x_td, ((0, pad), (0, 0)))
        weights_tk = jnp.pad(weights_tk, ((0, pad), (0, 0)))
        experts_tk = jnp.pad(experts_tk, ((0, pad), (0, 0)))
    tokens = PartitionSpec(axes, None)
    expert = PartitionSpec(EXPERT_AXIS, None, None)
    fn = jax.shard_map(lambda *a: _local(*a, n=n), mesh=mesh,
                       in_specs=(tokens, tokens, tokens, expert, expert, expert),
                       out_specs=tokens)
    y = fn(x_td, weights_tk, experts_tk, w_gate, w_up, w_down)
    return y[:t], jnp.zeros((), jnp.int32)
