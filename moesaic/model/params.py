"""A model as its flat parameters: the model of a config run on given arrays, and what each
named parameter is (shape, dtype, logical axes, Param or state) before any exists.

    model = build_model(cfg, {"embed": array, "blocks/ffn/w_gate": array, ...})

`build_model` copies nothing and works on tracers, so a jitted loss can run the model
functionally on parameters assembled inside the step (a branch job's trainable and frozen
trees, a router-tuning step's new rows). The graph of each config is built once, abstractly.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from moesaic.model.checkpoint import abstract_model
from moesaic.model.config import ModelConfig
from moesaic.model.transformer import Decoder

_GRAPHS: dict[ModelConfig, tuple] = {}


def _graph(cfg: ModelConfig) -> tuple:
    """(graphdef, abstract state) of `cfg`'s model, built once per config."""
    if cfg not in _GRAPHS:
        _GRAPHS[cfg] = nnx.split(abstract_model(cfg))
    return _GRAPHS[cfg]


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", None)) for k in path
                    if isinstance(k, jax.tree_util.DictKey))


def variables(cfg: ModelConfig) -> dict[str, nnx.Variable]:
    """Every abstract variable of `cfg`'s model by name, in the model's tree order."""
    _, state = _graph(cfg)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    paths, _ = jax.tree_util.tree_flatten_with_path(state)
    return {_path_name(p): v for (p, _), v in zip(paths, leaves)}


def build_model(cfg: ModelConfig, flat: Mapping[str, jax.Array]) -> Decoder:
    """A Decoder of `cfg` whose parameters are `flat` (no copy; works on tracers)."""
    graphdef, state = _graph(cfg)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [_path_name(path) for path, _ in leaves_with_path]
    missing = sorted(set(names) - set(flat))
    if missing:
        raise KeyError(f"parameters {missing} missing for the model config")
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names]))
