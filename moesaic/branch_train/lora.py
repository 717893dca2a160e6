"""The low-rank branch (`--config.branch.mode=lora`): the party trains rank-r updates of the
base's projections (`moesaic.model.lora`) and its router row, nothing else.

    config.branch.lora.rank     r, the rank of every update
    config.branch.lora.alpha    the scale is alpha / r (0: alpha = r, scale 1)
    config.branch.lora.targets  the adapted projections, among q, k, v, o, gate, up, down
    config.branch.lora.quantize "none", "int8" or "nf4": the frozen base's projection
                                matrices held quantized (QLoRA; `moesaic.model.quantized`),
                                dequantized a layer at a time in the step

The branch model is the base plus one low-rank expert (the last router slot): the merged model
of this one party. Its layout (`lora_layout`) trains exactly the expert's A and B tensors
(expert axis of size 1) and the owner's slice of the router row and bias; every base tensor,
the base's router rows and biases included, is frozen by construction (an input of the step,
no gradient, no optimizer state), whatever config.branch.frozen says. A starts N(0, 1/in)
from the job's seed and B at zero, so the branch starts as the base.

The artifact (`write_lora`) is a branch artifact (`moesaic.branch_train.artifact`) whose own
tensors are the expert's blocks/lora/<target>_{a,b} (L, 1, ...) with the row and bias; its
model config records the rank, alpha and targets (model.lora_*). With a quantized base the
adapters train against the dequantized base, while the artifact's frozen hashes are the
unquantized base's (re-read from --base): the merge applies the adapters to the stored base.
Its meta records `frozen_quantize` (and its config branch.lora.quantize).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moesaic.branch_train import outputs, upcycle
from moesaic.model import lora, params, quantized
from moesaic.model.config import ModelConfig
from moesaic.model.names import BIAS, ROUTER, W_GATE
from moesaic.model.sharding import variable_axes

SPLIT = (ROUTER, BIAS)


def lora_settings(config: ml_collections.ConfigDict) -> dict:
    """model.lora_* fields of the branch model from config.branch.lora."""
    section = config.branch.get("lora")
    if section is None:
        raise ValueError("config.branch.lora is missing (rank, alpha, targets)")
    targets = section.targets
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return dict(lora_rank=int(section.rank), lora_alpha=float(section.alpha),
                lora_targets=tuple(targets))


def quantize_setting(config: ml_collections.ConfigDict, kind: str) -> str:
    """config.branch.lora.quantize ("none", "int8", "nf4": the frozen base held quantized,
    QLoRA), refused unless "none" for a job that is not a low-rank branch."""
    branch = config.get("branch")
    section = branch.get("lora") if branch is not None else None
    value = str(section.get("quantize", "none")) if section is not None else "none"
    quantized.check_kind(value, "config.branch.lora.quantize")
    if value != "none" and kind != "lora":
        raise ValueError(f"config.branch.lora.quantize={value!r} holds the frozen base of a "
                         f"low-rank branch quantized; this job is a {kind!r} job "
                         f"(config.branch.mode={branch.get('mode')!r}): use "
                         "--config.branch.mode=lora, or quantize=none")
    return value


def branch_model_config(base_cfg: ModelConfig, config: ml_collections.ConfigDict
                        ) -> ModelConfig:
    if base_cfg.lora_experts:
        raise ValueError("the base has low-rank experts (a merged model); a branch starts from "
                         "the public model")
    model = upcycle.branch_config(base_cfg, int(config.branch.train_top_k))
    try:
        return model.replace(lora_experts=1, **lora_settings(config))
    except ValueError as err:  # name the config field, not the model field
        raise ValueError(f"config.branch.lora: {err}") from None


def lora_layout(config: ml_collections.ConfigDict, base_cfg: ModelConfig
                ) -> upcycle.ParamLayout:
    """The layout of a low-rank branch: its expert's A and B and the owner's row and bias
    train, everything else is frozen."""
    cfg = branch_model_config(base_cfg, config)
    by_name = params.variables(cfg)
    names = list(by_name)
    trainable = tuple(n for n in names if n.startswith(lora.LORA))
    frozen = tuple(n for n in names if n not in trainable and n not in SPLIT)
    return upcycle.ParamLayout(
        cfg, {n: tuple(v.shape) for n, v in by_name.items()},
        {n: variable_axes(v) for n, v in by_name.items()},
        {n: np.dtype(v.dtype) for n, v in by_name.items()},
        trainable, frozen, SPLIT, base_cfg.n_experts,
        bias_at_zero=not config.branch.negative_bias)


def start(layout: upcycle.ParamLayout, base: Mapping[str, jax.Array], base_cfg: ModelConfig,
          own_router_ld, own_bias_l, seed: int) -> tuple[dict, dict]:
    """(trainable, frozen) of a low-rank branch: A drawn from `seed`, B zero, the owner's row
    and bias as given; the base's tensors (and a dense base's zero row and bias) frozen."""
    dtype = layout.dtypes[W_GATE]
    base = dict(base)
    lyr, n, d = base_cfg.n_layers, base_cfg.n_experts, base_cfg.d_model
    base.setdefault(ROUTER, jnp.zeros((lyr, n, d), dtype))
    base.setdefault(BIAS, jnp.zeros((lyr, n), dtype))
    key = jax.random.fold_in(jax.random.key(seed), 0x10A)
    trainable = {}
    for i, name in enumerate(layout.trainable):
        shape = layout.shapes[name]
        if name.endswith("_a"):
            trainable[name] = (jax.random.normal(jax.random.fold_in(key, i), shape, dtype)
                               / np.sqrt(shape[2]).astype(dtype))
        else:
            trainable[name] = jnp.zeros(shape, dtype)
    trainable.update(upcycle.own_router_slices(own_router_ld, own_bias_l, dtype))
    frozen = {name: base[name] for name in (*layout.frozen, *SPLIT)}
    return trainable, frozen


def write_lora(t: outputs.Trained) -> pathlib.Path:
    """The branch artifact of a low-rank branch: the expert's A and B, row and bias."""
    own = {n: t.trainable[n] for n in (*t.layout.trainable, *SPLIT)}
    quantize = quantize_setting(t.config, "lora")
    extra = {"frozen_quantize": quantize} if quantize != "none" else {}
    return outputs._write_artifact(t, own, {}, t.layout.cfg, t.layout.base_experts, extra)


def trainable_counts(cfg: ModelConfig, ranks: tuple[int, ...] = ()) -> dict[str, int]:
    """Trainable parameters per party: a full FFN expert, and a low-rank expert of `cfg`'s
    targets at each rank (router row and bias included in both)."""
    lyr, d, f = cfg.n_layers, cfg.d_model, cfg.d_ff
    row = lyr * (d + 1)
    out = {"ffn": lyr * 3 * d * f + row}
    for r in ranks:
        per = cfg.replace(lora_rank=r, lora_experts=1, n_experts=cfg.n_experts + 1)
        out[f"lora_r{r}"] = sum(int(np.prod(s)) for s in lora.shapes(per).values()) + row
    return out
