"""random: frozen random rows, the control (CoMiGS's finding: a frozen random router can do
about as well as a learned one). Each expert's rows are drawn from N(0, std^2) with a seed
derived from (seed, source name), never from its slot, so removing or adding a party leaves
every other row as it was. Options: seed (default 0), std (default 1/sqrt(d_model)).
Biases are 0.
"""

from __future__ import annotations

import zlib

import numpy as np

from moesaic.routing.registry import Router, RouterInputs


def row(seed: int, source: str, n_layers: int, d_model: int, std: float) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
    return (std * rng.standard_normal((n_layers, d_model))).astype(np.float32)


def build(inputs: RouterInputs) -> Router:
    seed = int(inputs.options.get("seed", 0))
    std = float(inputs.options.get("std", inputs.d_model ** -0.5))
    rows = np.stack([row(seed, s, inputs.n_layers, inputs.d_model, std)
                     for s in inputs.sources], axis=1)
    return Router(rows, np.zeros(rows.shape[:2], np.float32),
                  {"seed": seed, "std": std, "rows": "N(0, std^2), seeded by source name"})
