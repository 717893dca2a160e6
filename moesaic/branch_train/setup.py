"""The set-up every training step is built by: the job's layout on a mesh, the shardings of
its arrays, the optimizer and the jitted step. The trainer, `moesaic plan` (which compiles
the step for abstract arguments) and bench/train_step.py all call `set_up`, so what they run,
plan and time is one program.

    step_config, step = set_up(config, "branch", mesh, base_cfg)
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, step_index)

The step assembles the full parameters from the trainable and frozen trees, runs the model
functionally, and updates the trainable tree only; `frozen` is an input, never an output, so
it cannot change. With `config.train.microbatches` = M > 1 the batch's rows are split into M
equal microbatches, the step scans over them summing gradients and applies one update with
their mean (`accumulating_step`); M = 1 is the plain step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moesaic.branch_train import dp, kinds, lora
from moesaic.branch_train.optimizer import make_optimizer, schedule
from moesaic.branch_train.precision import Precision
from moesaic.branch_train.upcycle import ParamLayout
from moesaic.model.config import ModelConfig
from moesaic.model.sharding import Rules, activate, logical_to_spec
from moesaic.model.transformer import lm_loss


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a train step is built from; the shapes and shardings of its arguments follow."""
    layout: ParamLayout
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    rules: Rules
    batch_shape: tuple[int, int]  # (global batch, seq_len + 1)
    microbatches: int = 1  # equal row splits of the batch, one update from their mean gradient
    precision: Precision | None = None  # the dtypes arrays are held in; None: as the layout's

    @functools.cached_property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @functools.cached_property
    def trainable_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        shapes = self.layout.trainable_shapes()
        return self.precision.trainable_shapes(shapes) if self.precision else shapes

    @functools.cached_property
    def frozen_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        shapes = self.layout.frozen_shapes()
        return self.precision.frozen_shapes(shapes) if self.precision else shapes

    @functools.cached_property
    def opt_shapes(self):
        return jax.eval_shape(self.optimizer.init, self.trainable_shapes)

    @functools.cached_property
    def trainable_shardings(self) -> dict[str, NamedSharding]:
        return self.layout.shardings(self.trainable_shapes, self.mesh, self.rules)

    @functools.cached_property
    def frozen_shardings(self) -> dict:
        """By logical axes; a quantized tensor's codes and scales each by the tensor's axes
        (a dimension the mesh does not divide stays replicated)."""
        def by_axes(name, s):
            return NamedSharding(self.mesh, logical_to_spec(self.layout.axes[name], self.rules,
                                                            self.mesh, s.shape))
        return {n: jax.tree.map(functools.partial(by_axes, n), s)
                for n, s in self.frozen_shapes.items()}

    @functools.cached_property
    def opt_shardings(self):
        """The optimizer state sharded like the parameters it belongs to; counts replicated."""
        return optax.tree_map_params(self.optimizer, lambda _, s: s, self.opt_shapes,
                                     self.trainable_shardings,
                                     transform_non_params=lambda _: self.replicated)

    @functools.cached_property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(("batch", "length"), self.rules,
                                                        self.mesh, self.batch_shape))

    @functools.cached_property
    def microbatch_sharding(self) -> NamedSharding:
        """The batch as (microbatches, rows each, seq_len + 1): every microbatch's rows are
        sharded over the batch's mesh axes, as the whole batch's are."""
        rows, length = self.batch_shape[0] // self.microbatches, self.batch_shape[1]
        spec = logical_to_spec(("batch", "length"), self.rules, self.mesh, (rows, length))
        return NamedSharding(self.mesh, PartitionSpec(None, *spec))


def check_microbatches(microbatches, global_batch: int, mesh_shape: Mapping[str, int],
                       rules: Rules) -> None:
    """Refuses, before anything is compiled, a `config.train.microbatches` that is not a whole
    number >= 1, that does not divide the global batch, or (when > 1) whose microbatch the
    mesh axes the batch is sharded over (`rules`: batch -> data, fsdp) do not split evenly."""
    field = f"config.train.microbatches={microbatches!r}"
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"{field}: must be a whole number >= 1 (1: no accumulation)")
    if global_batch % microbatches:
        raise ValueError(f"{field} does not divide config.data.global_batch={global_batch}: "
                         "the microbatches must be equal")
    if microbatches == 1:
        return  # the plain step, its batch sharded as it always was
    target = dict(rules).get("batch")
    axes = tuple(a for a in ((target,) if isinstance(target, str) else tuple(target or ()))
                 if mesh_shape[a] > 1)
    parallel = math.prod(mesh_shape[a] for a in axes)
    rows = global_batch // microbatches
    if rows % parallel:
        raise ValueError(f"{field}: a microbatch of {rows} rows (config.data.global_batch="
                         f"{global_batch} / {microbatches}) does not split over the "
                         f"{parallel} data-parallel devices of the mesh ({' x '.join(axes)}); "
                         f"global_batch / microbatches must be a multiple of {parallel}")


def make_train_step(sc: StepConfig, custom=None):
    """jit(step)(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics):
    the full parameters assembled from both trees, the model run functionally, gradients
    and updates for the trainable tree only, a trained router bias projected back onto <= 0
    (or onto 0: `ParamLayout.project`); trainable and optimizer state donated. The model runs
    on `compute_view` of the trainable tree (`moesaic.branch_train.precision`)."""
    layout, tx, lr_at, mesh, rules = sc.layout, sc.optimizer, sc.schedule, sc.mesh, sc.rules
    view = sc.precision.compute_view if sc.precision else dict

    def train_step(trainable, opt_state, frozen, batch, step):
        def loss_fn(params):
            with activate(mesh, rules):
                return lm_loss(layout.model(view(params), frozen), batch)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = layout.project(optax.apply_updates(trainable, updates))
        metrics = dict(loss=loss, nll=aux["nll"], z_loss=aux["z_loss"],
                       grad_norm=optax.tree.norm(grads), lr=lr_at(step))
        return trainable, opt_state, metrics

    if custom is not None:  # another unjitted step of the same signature (dp.private_step)
        train_step = custom
    elif sc.microbatches > 1:
        train_step = accumulating_step(sc)
    return jax.jit(
        train_step, donate_argnums=(0, 1),
        in_shardings=(sc.trainable_shardings, sc.opt_shardings, sc.frozen_shardings,
                      sc.batch_sharding, sc.replicated),
        out_shardings=(sc.trainable_shardings, sc.opt_shardings, sc.replicated))


def accumulating_step(sc: StepConfig):
    """The unjitted step of `make_train_step` over `sc.microbatches` = M > 1 microbatches:
    `lax.scan` over them, gradients summed (in float32 at least) and loss, nll and z-loss
    averaged, then one update with the mean gradient. Row r of the batch goes to microbatch
    r % M, so the rows a device holds stay on it; only one microbatch's activations live at
    a time. Equal to the full batch's step where the loss is a mean over equal token counts
    (packed rows; not the load-balancing loss, which is nonlinear in the batch)."""
    layout, tx, lr_at, mesh, rules = sc.layout, sc.optimizer, sc.schedule, sc.mesh, sc.rules
    m, (batch_rows, length) = sc.microbatches, sc.batch_shape
    view = sc.precision.compute_view if sc.precision else dict

    def train_step(trainable, opt_state, frozen, batch, step):
        def loss_fn(params, rows):
            with activate(mesh, rules):
                return lm_loss(layout.model(view(params), frozen), rows)

        micro = jax.lax.with_sharding_constraint(
            batch.reshape(batch_rows // m, m, length).swapaxes(0, 1), sc.microbatch_sharding)

        def accumulate(carry, rows):
            grads, sums = carry
            (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, rows)
            grads = jax.tree.map(lambda a, x: a + x.astype(a.dtype), grads, g)
            sums = tuple(s + v.astype(s.dtype)
                         for s, v in zip(sums, (loss, aux["nll"], aux["z_loss"])))
            return (grads, sums), None

        zeros = jax.lax.with_sharding_constraint(
            {n: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32))
             for n, p in trainable.items()}, sc.trainable_shardings)
        sums = tuple(jnp.zeros((), jnp.float32) for _ in range(3))
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums), micro)
        grads = {n: (g / m).astype(trainable[n].dtype) for n, g in grads.items()}
        loss, nll, z_loss = (s / m for s in sums)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = layout.project(optax.apply_updates(trainable, updates))
        metrics = dict(loss=loss, nll=nll, z_loss=z_loss,
                       grad_norm=optax.tree.norm(grads), lr=lr_at(step))
        return trainable, opt_state, metrics

    return train_step


def set_up(config: ml_collections.ConfigDict, kind: str, mesh: Mesh,
           base_cfg: ModelConfig | None = None):
    """(StepConfig, jitted step) of a `kind` job (`kinds.KINDS`) of `config` on `mesh`;
    `base_cfg`: the model config of the base a branch, dense or ffn job starts from.
    A bad `config.train.microbatches`, `master_dtype`, `frozen_dtype` or
    `branch.lora.quantize` is refused here, before anything is compiled."""
    batch_shape = (int(config.data.global_batch), int(config.data.seq_len) + 1)
    rules = tuple(tuple(r) for r in config.rules)
    microbatches = config.train.get("microbatches", 1)
    check_microbatches(microbatches, batch_shape[0], dict(mesh.shape), rules)
    layout = kinds.kind_of(kind).layout(config, base_cfg)
    precision = Precision.from_config(config.train, layout.cfg, base_cfg is not None,
                                      lora.quantize_setting(config, kind))
    sc = StepConfig(layout, make_optimizer(config.train), schedule(config.train), mesh,
                    rules, batch_shape, microbatches, precision)
    private = dp.DpSettings.of(config) if kind != "pretrain" else None
    return sc, make_train_step(sc, private and dp.private_step(sc, private, int(config.seed)))
