"""centroid: per layer, each party's mean router input (its data under the base model),
normalised to unit length: a token goes to the experts whose data it resembles
(mergekit-moe's `hidden` gate, c-BTM's centroids on the model's own hidden states).

The public row: the centroid of public data when public statistics are given (--public-stats);
otherwise the normalised mean of the parties' centroids, i.e. "the average domain", which
wins on tokens that resemble no party in particular. With an MoE base, every base expert
gets the public row plus its centred base row (`registry.base_rows_within`). Without base
experts (BTX-style) only the parties' rows. The parties' biases are 0 (an MoE base keeps
its own). Option `scale` (default 1) multiplies every row (a temperature for the softmax).
"""

from __future__ import annotations

import numpy as np

from moesaic.routing.registry import Router, RouterInputs, base_rows_within


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def build(inputs: RouterInputs) -> Router:
    lyr = inputs.n_layers
    scale = float(inputs.options.get("scale", 1.0))
    parties = np.stack([
        _unit(np.stack([inputs.party_stat(i, "mean_hidden", layer).astype(np.float64)
                        for layer in range(lyr)]))
        for i in range(inputs.n_parties)], axis=1) if inputs.n_parties else None
    if inputs.base_experts == 0:  # no public expert (BTX-style): the parties' rows only
        return Router((parties * scale).astype(np.float32),
                      np.zeros(parties.shape[:2], np.float32),
                      {"parties": "normalised stats/mean_hidden", "scale": scale})
    if inputs.public_stat is not None:
        public = _unit(np.stack([inputs.public_stat("mean_hidden", layer).astype(np.float64)
                                 for layer in range(lyr)]))
        how = "centroid of public data (public stats)"
    elif parties is not None:
        public = _unit(parties.mean(axis=1))
        how = "normalised mean of the parties' centroids (no public stats given)"
    else:
        raise ValueError("centroid router: no parties and no public stats")
    rows = [base_rows_within(inputs, public * scale)]
    if parties is not None:
        rows.append((parties * scale).astype(np.float32))
    rows = np.concatenate(rows, axis=1).astype(np.float32)
    return Router(rows, np.zeros(rows.shape[:2], np.float32),
                  {"parties": "normalised stats/mean_hidden", "public": how, "scale": scale})
