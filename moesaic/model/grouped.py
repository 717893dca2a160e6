"""Dropless MoE whose cost follows the routed tokens, for backends without grouped kernels.

The T*k (token, expert) assignments are sorted by expert into one (T*k + B, D) array, so
expert e owns the rows [start_e, start_e + count_e). For each expert, a loop over blocks of B
rows from start_e multiplies each block by that expert's SwiGLU weights and writes the block
back. A block that runs past the expert's last row computes rows of the next expert with the
wrong weights; the experts run in order, so the next expert overwrites them (the B spare rows
at the end take the last expert's overhang). The work is T*k rows plus at most one partial
block per expert, and no buffer has a T*E or E*C axis: activations are O(T*k*F).

The forward and backward are written out (`jax.custom_vjp`): the backward runs the same
loops, accumulating each expert's weight gradient in place, with the overhanging rows masked,
and the token permutations are gathers both ways (their autodiff transposes would be
scatter-adds, which XLA:CPU runs slowly). The routed token's output mixes the rows of its k
assignments with their routing weights, so each token's output depends only on itself:
causal like every dropless path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_rows(n_assignments: int, n_experts: int) -> int:
    """Rows per block: large enough for an efficient matmul, small enough that the partial
    blocks (at most one per expert) stay a small share of the T*k rows."""
    block = 256
    while block > 8 and block * n_experts * 4 > n_experts + n_assignments:
        block //= 2
    return block


def _layout(experts_tk: jax.Array, n_experts: int):
    """order: sorted row -> assignment (t*k + j); row_of: assignment -> sorted row;
    start, count: (E,) each expert's first row and row count."""
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    row_of = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    count = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    start = jnp.cumsum(count) - count
    return order, row_of, start, count


def _over_blocks(start, count, block: int, weights, body, carry):
    """For each expert e in order, and each block start lo (start[e] plus a multiple of
    `block`, below start[e] + count[e]): carry = body(e, lo, the expert's slices of
    `weights`, carry). One loop over the experts, each slicing its weights once, around a
    loop over its blocks: one copy of the body whatever E, one expert's weights at a time."""

    def expert(e, carry):
        own = tuple(w[e] for w in weights)
        n_blocks = (count[e] + block - 1) // block
        return jax.lax.fori_loop(
            0, n_blocks, lambda i, c: body(e, start[e] + i * block, own, c), carry)

    def step(state):  # while, not fori_loop (a scan at static bounds): the layer scan stays
        # the only scan of the program
        e, c = state
        return e + 1, expert(e, c)

    n_experts = start.shape[0]
    return jax.lax.while_loop(lambda s: s[0] < n_experts, step, (jnp.int32(0), carry))[1]


def _forward(xs, w_gate, w_up, w_down, start, count, block):
    """xs: (M, D) sorted rows (M = T*k + block). Returns ys (M, D), g and u (M, F)."""
    m, d = xs.shape
    f = w_gate.shape[-1]

    def body(e, lo, own, c):
        wg, wu, wd = own
        ys, gs, us = c
        x = jax.lax.dynamic_slice_in_dim(xs, lo, block)
        g = x @ wg
        u = x @ wu
        y = (jax.nn.silu(g) * u) @ wd
        return (jax.lax.dynamic_update_slice_in_dim(ys, y, lo, 0),
                jax.lax.dynamic_update_slice_in_dim(gs, g, lo, 0),
                jax.lax.dynamic_update_slice_in_dim(us, u, lo, 0))

    carry = (jnp.zeros((m, d), xs.dtype), jnp.zeros((m, f), xs.dtype),
             jnp.zeros((m, f), xs.dtype))
    return _over_blocks(start, count, block, (w_gate, w_up, w_down), body, carry)


def _backward(xs, gs, us, dys, w_gate, w_up, w_down, start, count, block):
    m, d = xs.shape
    rows = jnp.arange(block, dtype=jnp.int32)

    def body(e, lo, own, c):
        wg, wu, wd = own
        dxs, dwg, dwu, dwd = c
        x = jax.lax.dynamic_slice_in_dim(xs, lo, block)
        g = jax.lax.dynamic_slice_in_dim(gs, lo, block)
        u = jax.lax.dynamic_slice_in_dim(us, lo, block)
        # rows past the expert's last belong to the next one: no gradient from them
        dy = jnp.where((lo + rows < start[e] + count[e])[:, None],
                       jax.lax.dynamic_slice_in_dim(dys, lo, block), 0)
        sig = jax.nn.sigmoid(g)
        silu = g * sig
        dh = dy @ wd.T
        du = dh * silu
        dg = dh * u * sig * (1 + g * (1 - sig))
        dx = dg @ wg.T + du @ wu.T
        return (jax.lax.dynamic_update_slice_in_dim(dxs, dx, lo, 0), dwg.at[e].add(x.T @ dg),
                dwu.at[e].add(x.T @ du), dwd.at[e].add((silu * u).T @ dy))

    carry = (jnp.zeros((m, d), xs.dtype), jnp.zeros_like(w_gate), jnp.zeros_like(w_up),
             jnp.zeros_like(w_down))
    return _over_blocks(start, count, block, (w_gate, w_up, w_down), body, carry)


@jax.custom_vjp
def _blocked(x_td, weights_tk, w_gate, w_up, w_down, experts_tk):
    return _blocked_fwd(x_td, weights_tk, w_gate, w_up, w_down, experts_tk)[0]


def _gather_rows(x_td, order, k, block):
    """(T*k + block, D): the sorted assignments' token rows, zero spare rows at the end."""
    xs = x_td[order // k]
    return jnp.concatenate([xs, jnp.zeros((block, xs.shape[1]), xs.dtype)])


def _blocked_fwd(x_td, weights_tk, w_gate, w_up, w_down, experts_tk):
    t, k = experts_tk.shape
    block = block_rows(t * k, w_gate.shape[0])
    order, row_of, start, count = _layout(experts_tk, w_gate.shape[0])
    xs = _gather_rows(x_td, order, k, block)
    ys, gs, us = _forward(xs, w_gate, w_up, w_down, start, count, block)
    y_tkd = ys[row_of].reshape(t, k, -1)
    y = jnp.einsum("tkd,tk->td", y_tkd, weights_tk.astype(ys.dtype))
    return y, (x_td, weights_tk, w_gate, w_up, w_down, experts_tk, xs, gs, us, y_tkd)


def _blocked_bwd(res, dy_td):
    x_td, weights_tk, w_gate, w_up, w_down, experts_tk, xs, gs, us, y_tkd = res
    t, k = experts_tk.shape
    block = xs.shape[0] - t * k
    order, row_of, start, count = _layout(experts_tk, w_gate.shape[0])
    dweights = jnp.einsum("tkd,td->tk", y_tkd, dy_td).astype(weights_tk.dtype)
    dy_rows = dy_td[:, None, :] * weights_tk[:, :, None].astype(dy_td.dtype)  # (T, k, D)
    dys = _gather_rows(dy_rows.reshape(t * k, -1), order, 1, block)
    dxs, dwg, dwu, dwd = _backward(xs, gs, us, dys, w_gate, w_up, w_down, start, count, block)
    dx = jnp.sum(dxs[row_of].reshape(t, k, -1), axis=1).astype(x_td.dtype)
    return dx, dweights, dwg, dwu, dwd, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def dropless_blocked(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *,
                     capacity_factor=None):
    """The dispatch signature (moesaic.model.dispatch): every assignment served."""
    y = _blocked(x_td, weights_tk, w_gate, w_up, w_down, experts_tk.astype(jnp.int32))
    return y, jnp.zeros((), jnp.int32)
