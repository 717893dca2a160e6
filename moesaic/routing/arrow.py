"""arrow: training-free rows from the experts' weights (Arrow, Ostapenko et al. 2024; PEFT's
`arrow` routing).

Per layer, each party's row is the top right singular vector of its update of the
projections that read the router's input: the FFN's gate and up (W_party - W_public for an FFN
party, s A B for a low-rank party), or, for a low-rank party that adapts neither, its q, k, v
updates (`RouterInputs.party_update`). That direction is the input the update changes the
most. Arrow scores |v . x|; this model's router is linear, so the sign is fixed once instead,
towards the party's own mean router input (stats/mean_hidden, which every branch hands over).
The public expert's row is 0 (an MoE base: its centred rows, `registry.base_rows_within`).
Without public statistics the biases are 0. With them (--public-stats) the sign points from
the public mean to the party's, and the bias puts the boundary against the public expert
midway between the two means along v (clamped to <= 0, as the model clamps it): the top
direction of an update tends to follow what every router input shares, which alone would send
every token to the parties. Option `scale` (default 1) multiplies rows and biases.

The vector is computed from the update's input-side Gram matrix G = sum_t M_t M_t^T (float64,
D x D; M_t the update of target t as (in, out)), whose top eigenvector is the top right
singular vector of [M_1 | M_2 | ...].
"""

from __future__ import annotations

import numpy as np

from moesaic.routing.registry import Router, RouterInputs, base_rows_within


def top_direction(blocks: list[np.ndarray]) -> np.ndarray:
    """The unit top singular vector on the input side of the side-by-side blocks (in, out_t)."""
    gram = sum(b.astype(np.float64) @ b.astype(np.float64).T for b in blocks)
    _, vectors = np.linalg.eigh(gram)
    return vectors[:, -1]


def build(inputs: RouterInputs) -> Router:
    if inputs.party_update is None:
        raise ValueError("arrow router: the merge did not give the parties' weight updates")
    lyr, d = inputs.n_layers, inputs.d_model
    scale = float(inputs.options.get("scale", 1.0))
    parties = np.zeros((lyr, inputs.n_parties, d), np.float64)
    bias = np.zeros((lyr, inputs.n_parties), np.float64)
    for i in range(inputs.n_parties):
        for layer in range(lyr):
            v = top_direction(inputs.party_update(i, layer))
            mean = inputs.party_stat(i, "mean_hidden", layer).astype(np.float64)
            if inputs.public_stat is None:
                parties[layer, i] = v if v @ mean >= 0 else -v
                continue
            public = inputs.public_stat("mean_hidden", layer).astype(np.float64)
            v = v if v @ (mean - public) >= 0 else -v
            parties[layer, i] = v
            bias[layer, i] = min(0.0, -scale * v @ (mean + public) / 2)
    rows = [parties * scale]
    biases = [bias]
    if inputs.base_experts:
        rows.insert(0, base_rows_within(inputs, np.zeros((lyr, d), np.float32)))
        biases.insert(0, np.zeros((lyr, inputs.base_experts)))
    rows = np.concatenate(rows, axis=1).astype(np.float32)
    return Router(rows, np.concatenate(biases, axis=1).astype(np.float32),
                  {"parties": "top right singular vector of each party's update of the "
                              "projections reading the router input, signed towards its "
                              "stats/mean_hidden", "public": "zero row", "scale": scale})
