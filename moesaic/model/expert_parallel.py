"""A merged model expert-parallel on any mesh: its experts split over the mesh's `expert` axis
whatever their count, for evaluation, router tuning and generation.

    mesh = make_mesh({"data": 1, "expert": 4})
    model = shard_merged_model(model, mesh)         # 7 experts -> 8 slots, 2 per device

A stacked expert dimension the expert axis does not divide would stay replicated (contract 5:
checkpoints are never padded). Here the running copy is padded instead: `expert_padding`
slots of zeros are stacked after the n_experts real ones (`ModelConfig.expert_padding`), the
router scores only the real rows (`moe.MoE.routing`; the padded biases are -inf besides, for
code that scores the stacked rows itself), so no token reaches a padding slot, each expert
keeps its capacity and the logits, routing statistics and gradients are those of the
unpadded model (tests/model/test_expert_parallel.py). `unpadded` strips the padding again
before anything is written.

With an expert axis the batch is split over it too (`runtime_rules`), as MaxText does: every
device runs attention on its own rows, and the MoE layer either leaves the exchange to the
compiler (`model.dispatch="dropless"`) or sends tokens explicitly (`"all_to_all"`,
`moesaic.model.all_to_all`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moesaic.configs.common import DEFAULT_RULES
from moesaic.configs.expert_axis import check_expert_axis
from moesaic.model import checkpoint, names
from moesaic.model.config import ModelConfig
from moesaic.model.params import build_model
from moesaic.model.sharding import Rules, state_shardings
from moesaic.model.transformer import Decoder

AXIS = "expert"
_EXPERT_TENSORS = frozenset(names.EXPERT_TENSORS)
__all__ = ["check_expert_axis", "padding_for", "runtime_rules", "shard_merged_model",
           "shard_merged_params", "unpadded", "padded_config", "load_merged"]


def padding_for(n_experts: int, expert_axis: int) -> int:
    """Slots to stack after `n_experts` so that the expert axis divides them."""
    return -n_experts % max(1, expert_axis)


def runtime_rules(rules: Rules, mesh: Mesh) -> tuple:
    """`rules` with the batch also split over the expert axis (when the mesh has one)."""
    if mesh.shape.get(AXIS, 1) == 1:
        return tuple(rules)
    out = []
    for logical, target in rules:
        if logical == "batch":
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            target = (*axes, AXIS) if AXIS not in axes else axes
        out.append((logical, target))
    return tuple(out)


def _pad_flat(flat: Mapping[str, jax.Array], pad: int) -> dict[str, jax.Array]:
    def one(name, a):
        if name not in names.EXPERT_TENSORS or pad == 0:
            return a
        widths = [(0, 0)] * a.ndim
        widths[names.EXPERT_AXIS] = (0, pad)
        value = -jnp.inf if name == names.BIAS else 0
        return jnp.pad(a, widths, constant_values=value)
    return {name: one(name, a) for name, a in flat.items()}


def unpadded(cfg: ModelConfig, flat: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The expert tensors of a padded copy cut back to cfg.n_experts (what is written)."""
    if not cfg.expert_padding:
        return dict(flat)
    keep = cfg.n_experts - cfg.lora_experts
    out = {}
    for name, a in flat.items():
        if name in names.EXPERT_TENSORS:
            width = keep if name in names.FFN_EXPERT else cfg.n_experts
            a = jax.lax.slice_in_dim(a, 0, width, axis=names.EXPERT_AXIS)
        out[name] = a
    return out


def padded_config(cfg: ModelConfig, expert_axis: int) -> ModelConfig:
    """`cfg` with the padding that makes `expert_axis` divide its stacked experts."""
    if cfg.lora_experts and expert_axis > 1:
        raise ValueError("an expert axis over a model with low-rank experts is not supported; "
                         "use expert=1")
    return cfg.replace(expert_padding=padding_for(cfg.n_experts, expert_axis))


def shard_merged_params(cfg: ModelConfig, flat: Mapping[str, jax.Array], mesh: Mesh,
                        rules: Rules) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """(the padded config, the padded parameters placed on `mesh`): experts split over its
    expert axis, everything else by `rules`. `flat` may be padded already (any amount)."""
    expert_axis = mesh.shape.get(AXIS, 1)
    check_expert_axis(cfg.n_experts, expert_axis)
    base = cfg.replace(expert_padding=0)
    target = padded_config(base, expert_axis)
    abstract = nnx.state(checkpoint.abstract_model(target))
    shardings = checkpoint.flatten(state_shardings(abstract, mesh, rules))
    pad = target.expert_padding

    def place(flat):
        return _pad_flat(unpadded(cfg, flat), pad)

    placed = jax.jit(place, out_shardings={n: shardings[n] for n in flat})(dict(flat))
    return target, placed


def load_merged(path, cfg: ModelConfig, mesh: Mesh, rules: Rules, *,
                tensors: Iterable[str] | None = None) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """A merged checkpoint read straight onto `mesh` expert-parallel (`shard_merged_params`):
    an expert tensor whose experts the expert axis does not divide is read split over that
    axis along its layers instead, so that no device ever holds it whole; `tensors`: the
    tensors to read (default: the model's)."""
    expert_axis = mesh.shape.get(AXIS, 1)
    check_expert_axis(cfg.n_experts, expert_axis)
    state = nnx.state(checkpoint.abstract_model(cfg))
    abstract = checkpoint.flatten(state)
    shardings = checkpoint.flatten(state_shardings(state, mesh, rules))
    tensors = list(abstract if tensors is None else tensors)
    stored = checkpoint.tensor_metadata(path)
    for name in tensors:
        if name not in stored:
            raise ValueError(f"{path}: tensor {name!r} missing; the checkpoint does not match "
                             "its model config")
        if stored[name][0] != tuple(abstract[name].shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {stored[name][0]}, the model "
                             f"config needs {tuple(abstract[name].shape)}")
        spec = list(shardings[name].spec) + [None] * (len(stored[name][0])
                                                      - len(shardings[name].spec))
        used = {a for entry in spec for a in ((entry,) if isinstance(entry, str)
                                              else (entry or ()))}
        if (name in _EXPERT_TENSORS and expert_axis > 1 and AXIS not in used
                and spec[0] is None and cfg.n_layers % expert_axis == 0):
            spec[0] = AXIS  # (layers, experts, ...): split the layers while reading
            shardings[name] = NamedSharding(mesh, PartitionSpec(*spec))
    flat = checkpoint.load_tensors(path, tensors, {n: shardings[n] for n in tensors},
                                   stored=stored)
    return shard_merged_params(cfg, flat, mesh, rules)


def shard_merged_model(model: Decoder, mesh: Mesh, rules: Rules | None = None) -> Decoder:
    """`model` expert-parallel on `mesh`: its experts padded to a multiple of the expert axis
    and split over it, the other tensors placed by `rules` (default: the config files' rules,
    with the batch over the expert axis too: `runtime_rules`). Run it inside
    `sharding.activate(mesh, runtime_rules(rules, mesh))`."""
    rules = runtime_rules(DEFAULT_RULES if rules is None else rules, mesh)
    flat = checkpoint.flatten(nnx.state(model))
    cfg, placed = shard_merged_params(model.cfg, flat, mesh, rules)
    return build_model(cfg, placed)

