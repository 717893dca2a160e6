"""Sparse upcycling (Komatsuzaki et al., 2023): a dense checkpoint becomes an MoE of n
identical experts with a fresh, trainable router. The starting point of the unrestricted MoE
baseline (every parameter trained on all the data, as FlexOlmo's upper bound)."""

from __future__ import annotations

import pathlib

import numpy as np

from moesaic.model import checkpoint
from moesaic.model.names import BIAS, EMBED, FFN_EXPERT, ROUTER


def upcycle_checkpoint(dense: str | pathlib.Path, out: str | pathlib.Path, *, n_experts: int,
                       top_k: int, router_std: float = 0.02, seed: int = 0,
                       router_input: str = "token") -> dict:
    """Writes an MoE checkpoint at `out`: every FFN copied into `n_experts` experts, every
    other tensor as it is, router rows drawn from N(0, router_std^2) that will score
    `router_input` (model.router_input), biases zero."""
    meta = checkpoint.read_meta(dense)
    cfg = checkpoint.model_config(meta)
    if cfg.n_experts != 1:
        raise ValueError(f"{dense}: upcycling needs a dense (E = 1) model, it has "
                         f"{cfg.n_experts} experts")
    moe_cfg = cfg.replace(n_experts=n_experts, top_k=top_k, router_trainable=True,
                          router_bias=True, router_input=router_input)
    names = list(checkpoint.tensor_metadata(dense))
    flat = checkpoint.load_tensors(dense, names)
    for name in FFN_EXPERT:
        flat[name] = np.repeat(flat[name], n_experts, axis=1)
    rng = np.random.default_rng(seed)
    dtype = flat[EMBED].dtype
    flat[ROUTER] = (router_std * rng.standard_normal(
        (cfg.n_layers, n_experts, cfg.d_model))).astype(dtype)
    flat[BIAS] = np.zeros((cfg.n_layers, n_experts), dtype)
    checkpoint.save(out, flat, {"kind": "public", "model": moe_cfg.to_dict(),
                        "upcycled_from": meta["fingerprint"]})
    return checkpoint.read_meta(out)
