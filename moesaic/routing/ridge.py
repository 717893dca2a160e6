"""ridge: DUME's closed-form router. Per layer, with X the router inputs of all parties'
tokens and Y their one-hot expert labels (a party's tokens belong to its expert, public
data to the public expert):

    W = (X^T X + lambda I)^-1 X^T Y,      rows = W^T   (E, D)

X^T X is the sum of every class's stats/xtx and column e of X^T Y is class e's stats/x_sum,
so the parties contribute sums, never data. lambda = ridge_lambda * trace(X^T X) / D
(option ridge_lambda, default 1e-3: relative, so the same value fits any hidden-state
scale). The public class needs statistics of public data (--public-stats or
--public-data); with an MoE base each base expert gets the public row plus its centred base
row (`registry.base_rows_within`); without base experts (BTX-style) the classes are the
parties only. The parties' biases are 0 (an MoE base keeps its own); option `scale`
(default 1) multiplies the rows. Sums run in float64, in slot order, so the result is a pure
function of the inputs.
"""

from __future__ import annotations

import numpy as np

from moesaic.routing.registry import Router, RouterInputs, base_rows_within


def solve_layer(xtx_list: list[np.ndarray], x_sum_list: list[np.ndarray],
                ridge_lambda: float) -> np.ndarray:
    """(C, D) rows from per-class X^T X (D, D) and X^T 1 (D,)."""
    gram = np.zeros_like(xtx_list[0], dtype=np.float64)
    for xtx in xtx_list:
        gram += xtx.astype(np.float64)
    d = gram.shape[0]
    lam = ridge_lambda * max(np.trace(gram) / d, 1e-12)
    rhs = np.stack([x.astype(np.float64) for x in x_sum_list], axis=1)  # (D, C)
    return np.linalg.solve(gram + lam * np.eye(d), rhs).T


def build(inputs: RouterInputs) -> Router:
    public_class = inputs.base_experts > 0  # BTX-style merges have no public expert
    if public_class and inputs.public_stat is None:
        raise ValueError("ridge router: the public expert needs statistics of public data; "
                         "pass --public-stats PATH (or --public-data DIR to compute them)")
    ridge_lambda = float(inputs.options.get("ridge_lambda", 1e-3))
    scale = float(inputs.options.get("scale", 1.0))
    per_layer = []
    for layer in range(inputs.n_layers):
        xtx, x_sum = [], []
        if public_class:
            xtx.append(inputs.public_stat("xtx", layer))
            x_sum.append(inputs.public_stat("x_sum", layer))
        for i in range(inputs.n_parties):
            xtx.append(inputs.party_stat(i, "xtx", layer))
            x_sum.append(inputs.party_stat(i, "x_sum", layer))
        per_layer.append(solve_layer(xtx, x_sum, ridge_lambda) * scale)
    rows = np.stack(per_layer).astype(np.float32)  # (L, [public +] parties, D)
    if public_class:
        rows = np.concatenate([base_rows_within(inputs, rows[:, 0]), rows[:, 1:]], axis=1)
    return Router(rows, np.zeros(rows.shape[:2], np.float32),
                  {"ridge_lambda": ridge_lambda, "scale": scale,
                   "classes": "public stats, then each party's stats/xtx and stats/x_sum"})
