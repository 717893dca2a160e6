"""Which parameters a job trains, and how a branch model is built from its base.

A job's parameters live in two flat pytrees ({"blocks/attn/q": array, ...}):

  trainable  what the optimizer sees, nothing else
  frozen     the base tensors the job must not change (never differentiated, never in the
             optimizer state, so weight decay cannot touch them)

The expert-axis tensors of a coordinated branch (`EXPERT_TENSORS`) are split: the frozen
tree holds the n base experts / router rows / biases, the trainable tree the owner's single
slice (expert axis of size 1). `ParamLayout.assemble` concatenates them along the expert
axis, base experts first and the owner's last (index n), into the full parameters the
model runs with. Which whole tensors are frozen is data: regexes over parameter paths
(config.branch.frozen). A coordinated branch hands over only the owner's slices, so its
patterns must freeze every whole tensor and must not name an expert tensor (whose split is
fixed): anything else is refused before training, not discovered by the merge after it.

The model adds min(b, 0) of a router bias (`moesaic.model.moe.effective_bias`), whose gradient
is 0 for b > 0: a bias the optimizer pushed positive would never come back. `ParamLayout.
project` puts every trained bias (but the public expert's, index 0) back on <= 0 after each
update, so the stored bias is the one the model uses and stays trainable. A branch with
config.branch.negative_bias=False (`bias_at_zero`) starts its bias at 0 and is put back on 0.

Upcycling (Komatsuzaki et al.): a base with n experts (n = 1: dense) becomes n + 1 experts;
the owner's expert starts as a copy of the base's expert 0 (the public FFN), its bias at 0.
A dense base has no router: its public row is the zero vector (frozen), so the owner's
logit r_own . x + b_own is measured relative to the public expert's, which is exactly the
quantity FlexOlmo's pairwise routing compares (r_i . x + b_i > r_pub . x).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from moesaic.model import params
from moesaic.model.config import ModelConfig
from moesaic.model.names import BIAS, EXPERT_AXIS, EXPERT_TENSORS, FFN_EXPERT, ROUTER, W_GATE
from moesaic.model.params import build_model
from moesaic.model.sharding import Rules, logical_to_spec, variable_axes
from moesaic.model.transformer import Decoder

Flat = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """The parameters of the model a job runs, and how they split into trainable/frozen."""

    cfg: ModelConfig
    shapes: Mapping[str, tuple[int, ...]]  # full parameter shapes
    axes: Mapping[str, tuple[str | None, ...]]  # logical axes of each full parameter
    dtypes: Mapping[str, np.dtype]
    trainable: tuple[str, ...]  # trained whole
    frozen: tuple[str, ...]  # frozen whole
    split: tuple[str, ...]  # expert tensors: frozen base experts [0:n] + trainable own [n]
    base_experts: int  # n (0 unless split)
    bias_at_zero: bool = False  # the owner's bias held at 0 (config.branch.negative_bias=False)

    def trainable_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        out = {n: jax.ShapeDtypeStruct(self.shapes[n], self.dtypes[n]) for n in self.trainable}
        for n in self.split:
            out[n] = jax.ShapeDtypeStruct(self._part_shape(n, 1), self.dtypes[n])
        return dict(sorted(out.items()))

    def frozen_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        out = {n: jax.ShapeDtypeStruct(self.shapes[n], self.dtypes[n]) for n in self.frozen}
        for n in self.split:
            out[n] = jax.ShapeDtypeStruct(self._part_shape(n, self.base_experts), self.dtypes[n])
        return dict(sorted(out.items()))

    def _part_shape(self, name: str, experts: int) -> tuple[int, ...]:
        shape = list(self.shapes[name])
        shape[EXPERT_AXIS] = experts
        return tuple(shape)

    def shardings(self, shapes: Mapping[str, jax.ShapeDtypeStruct], mesh: Mesh,
                  rules: Rules) -> dict[str, NamedSharding]:
        """NamedShardings by logical axes; a dimension the mesh does not divide (an expert
        slice of size 1) stays replicated."""
        return {n: NamedSharding(mesh, logical_to_spec(self.axes[n], rules, mesh, s.shape))
                for n, s in shapes.items()}

    def assemble(self, trainable: Mapping[str, jax.Array],
                 frozen: Mapping[str, jax.Array]) -> Flat:
        """The full parameters: whole tensors as they are, split tensors concatenated along
        the expert axis (base experts first, the owner's last)."""
        full = {n: trainable[n] for n in self.trainable}
        full.update({n: frozen[n] for n in self.frozen})
        for n in self.split:
            full[n] = jnp.concatenate([frozen[n], trainable[n]], axis=EXPERT_AXIS)
        return full

    def model(self, trainable: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array]
              ) -> Decoder:
        """The model run functionally on the assembled parameters (usable inside jit)."""
        return build_model(self.cfg, self.assemble(trainable, frozen))

    def project(self, trainable: Mapping[str, jax.Array]) -> Flat:
        """`trainable` with its router bias on <= 0 where the model clamps it (every expert
        but the public one, index 0): the owner's slice of a branch, experts 1.. of an MoE
        trained whole. With `bias_at_zero` the owner's slice goes back to 0."""
        out = dict(trainable)
        if BIAS in self.split:
            out[BIAS] = (jnp.zeros_like(trainable[BIAS]) if self.bias_at_zero
                         else jnp.minimum(trainable[BIAS], 0))
        elif BIAS in self.trainable:
            out[BIAS] = trainable[BIAS].at[:, 1:].min(0)
        return out

    def counts(self) -> dict[str, int]:
        t = sum(int(np.prod(s.shape)) for s in self.trainable_shapes().values())
        f = sum(int(np.prod(s.shape)) for s in self.frozen_shapes().values())
        return {"trainable": t, "frozen": f}


def make_layout(cfg: ModelConfig, *, frozen_patterns: Sequence[str] = (),
                base_experts: int = 0, bias_at_zero: bool = False) -> ParamLayout:
    """Layout of `cfg`'s parameters. `base_experts` > 0 splits the expert tensors (a
    coordinated branch: experts [0, base_experts) frozen, the last one trained, its router
    bias held at 0 with `bias_at_zero`); whole
    tensors matching a `frozen_patterns` regex are frozen, and so is every variable that is
    not an nnx.Param; the rest trains."""
    by_name = params.variables(cfg)
    names = list(by_name)
    shapes = {n: tuple(v.shape) for n, v in by_name.items()}
    axes = {n: variable_axes(v) for n, v in by_name.items()}
    dtypes = {n: np.dtype(v.dtype) for n, v in by_name.items()}
    try:
        compiled = [re.compile(p) for p in frozen_patterns]
    except re.error as err:
        raise ValueError(f"config.branch.frozen: bad regex {err.pattern!r}: {err}") from None
    split = tuple(n for n in names if base_experts and n in EXPERT_TENSORS)
    if base_experts and base_experts != cfg.n_experts - 1:
        raise ValueError(f"a branch of a base with {base_experts} experts needs n_experts="
                         f"{base_experts + 1}, the model has {cfg.n_experts}")
    # Only nnx.Param trains: a model.router_trainable=False router (RouterState) stays frozen.
    state_kind = {n for n, v in by_name.items() if not isinstance(v, nnx.Param)}
    frozen = tuple(n for n in names if n not in split
                   and (n in state_kind or any(p.search(n) for p in compiled)))
    trainable = tuple(n for n in names if n not in split and n not in frozen)
    if base_experts:
        _check_branch_patterns(compiled, split, trainable)
    return ParamLayout(cfg, shapes, axes, dtypes, trainable, frozen, split, base_experts,
                       bias_at_zero=bias_at_zero and bool(split))


def _check_branch_patterns(compiled: Sequence[re.Pattern], split: Sequence[str],
                           trainable: Sequence[str]) -> None:
    """A coordinated branch trains the owner's expert, router row and bias, nothing else: its
    artifact holds only those, so any other trained tensor would be trained and then dropped,
    and a pattern over an expert tensor would be silently overruled by the split."""
    named = [f"{p.pattern!r} matches {n!r}" for p in compiled for n in split if p.search(n)]
    if named:
        raise ValueError(
            "config.branch.frozen: " + "; ".join(named) + ". A coordinated branch always "
            "trains the owner's slice of the expert tensors and freezes the base's; remove "
            "the pattern (use --config.branch.mode=dense to train a whole copy)")
    if trainable:
        raise ValueError(
            f"config.branch.frozen leaves {list(trainable)} trainable, but a coordinated "
            "branch trains only the owner's expert, router row and bias (its artifact holds "
            "nothing else, so those tensors would be trained and then dropped); freeze them "
            "(the default patterns freeze everything) or use --config.branch.mode=dense")


def ffn_layout(cfg: ModelConfig, frozen_patterns: Sequence[str]) -> ParamLayout:
    """Layout of an `ffn` job (FlexOlmo's uncoordinated expert): a dense base whose FFN alone
    trains, in place, to be handed over as one expert. The base must be dense and
    `frozen_patterns` must leave exactly the FFN trainable."""
    if cfg.is_moe:
        raise ValueError(f"an ffn job trains the base's one FFN in place; this base is an MoE "
                         f"of {cfg.n_experts} experts (use branch.mode=coordinated)")
    layout = make_layout(cfg, frozen_patterns=frozen_patterns)
    if sorted(layout.trainable) != sorted(FFN_EXPERT):
        raise ValueError(f"config.branch.frozen leaves {sorted(layout.trainable)} trainable; an "
                         f"ffn job trains exactly the FFN {list(FFN_EXPERT)} (its artifact "
                         "holds nothing else, and every other tensor must stay the public one)")
    return layout


def branch_config(base: ModelConfig, train_top_k: int = 0) -> ModelConfig:
    """The branch model: the base plus one expert, with a router and bias; top-k = all
    experts unless `train_top_k` says otherwise."""
    experts = base.n_experts + 1
    top_k = train_top_k or experts
    if not 1 <= top_k <= experts:
        raise ValueError(f"config.branch.train_top_k={train_top_k}: must be 0 (all) or in "
                         f"[1, {experts}]")
    return base.replace(n_experts=experts, top_k=top_k, router_bias=True)


def own_router_slices(own_router_ld, own_bias_l, dtype) -> dict[str, jax.Array]:
    """The owner's router row (L, 1, D) and bias (L, 1) slices from a row (L, D) and a bias
    (L,) or None (0), as a branch artifact holds them."""
    lyr, d = own_router_ld.shape
    return {ROUTER: jnp.asarray(own_router_ld, dtype).reshape(lyr, 1, d),
            BIAS: (jnp.zeros((lyr, 1), dtype) if own_bias_l is None
                   else jnp.asarray(own_bias_l, dtype).reshape(lyr, 1))}


def upcycle(layout: ParamLayout, base: Mapping[str, jax.Array], base_cfg: ModelConfig,
            own_router_ld: jax.Array, own_bias_l: jax.Array | None = None
            ) -> tuple[Flat, Flat]:
    """(trainable, frozen) of a coordinated branch from the base's flat parameters: the
    owner's expert = the base's expert 0, its router row = `own_router_ld` (L, D), its
    bias `own_bias_l` (L,) or 0; the base's experts, rows and biases frozen as they are (a
    dense base: zero row, zero bias)."""
    n, lyr, d = base_cfg.n_experts, base_cfg.n_layers, base_cfg.d_model
    dtype = layout.dtypes[W_GATE]
    base = dict(base)
    if not base_cfg.is_moe:
        base[ROUTER] = jnp.zeros((lyr, n, d), dtype)
    if BIAS not in base:
        base[BIAS] = jnp.zeros((lyr, n), dtype)
    own = {**{name: base[name][:, :1] for name in FFN_EXPERT},
           **own_router_slices(own_router_ld, own_bias_l, dtype)}
    trainable = {n_: base[n_] for n_ in layout.trainable}
    trainable.update({n_: own[n_] for n_ in layout.split})
    frozen = {n_: base[n_] for n_ in (*layout.frozen, *layout.split)}
    return trainable, frozen


def split_full(layout: ParamLayout, full: Mapping[str, jax.Array]) -> tuple[Flat, Flat]:
    """(trainable, frozen) from full parameters of the layout's model (pretraining, dense
    branches, or an initialised model)."""
    trainable = {n: full[n] for n in layout.trainable}
    frozen = {n: full[n] for n in layout.frozen}
    for n in layout.split:
        trainable[n] = full[n][:, layout.base_experts:]
        frozen[n] = full[n][:, :layout.base_experts]
    return trainable, frozen
