"""The plain reference every fast MoE path is tested against: every expert runs on every
token, and the outputs are mixed with the routing weights (zero for unchosen experts and for
assignments a capacity limit dropped). Slow by design; tests only."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from moesaic.model.dispatch import capacity_of
from moesaic.model.moe import Routing, swiglu


def capacity_keep(experts_tk: np.ndarray, n_experts: int, capacity_factor: float) -> np.ndarray:
    """(T, k) bool: which assignments fit, first choices first, earlier tokens first."""
    t, k = experts_tk.shape
    cap = capacity_of(t, k, n_experts, capacity_factor)
    used = [0] * n_experts
    keep = np.zeros((t, k), bool)
    for choice in range(k):
        for token in range(t):
            e = int(experts_tk[token, choice])
            if used[e] < cap:
                keep[token, choice] = True
                used[e] += 1
    return keep


def moe_reference(x_td, routing: Routing, w_gate, w_up, w_down, *,
                  capacity_factor: float | None = None):
    t, k = routing.experts_tk.shape
    n_experts = w_gate.shape[0]
    experts = routing.experts_tk
    keep = (jnp.ones((t, k), bool) if capacity_factor is None  # jittable without a capacity
            else capacity_keep(np.asarray(experts), n_experts, capacity_factor))
    y = jnp.zeros_like(x_td)
    for e in range(n_experts):
        mix = jnp.sum(routing.weights_tk * ((experts == e) & keep), axis=-1)
        y = y + mix[:, None] * swiglu(x_td, w_gate[e], w_up[e], w_down[e])
    return y
