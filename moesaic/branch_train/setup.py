"""The set-up every training step is built by: the job's layout on a mesh, the shardings of
its arrays, the optimizer and the jitted step. The trainer, `moesaic plan` (which compiles
the step for abstract arguments) and bench/train_step.py all call `set_up`, so what they run,
plan and time is one program.

    step_config, step = set_up(config, "branch", mesh, base_cfg)
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, step_index)

The step assembles the full parameters from the trainable and frozen trees, runs the model
functionally, and updates the trainable tree only; `frozen` is an input, never an output, so
it cannot change.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moesaic.branch_train import kinds
from moesaic.branch_train.optimizer import make_optimizer, schedule
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

    @functools.cached_property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @functools.cached_property
    def trainable_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        return self.layout.trainable_shapes()

    @functools.cached_property
    def frozen_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        return self.layout.frozen_shapes()

    @functools.cached_property
    def opt_shapes(self):
        return jax.eval_shape(self.optimizer.init, self.trainable_shapes)

    @functools.cached_property
    def trainable_shardings(self) -> dict[str, NamedSharding]:
        return self.layout.shardings(self.trainable_shapes, self.mesh, self.rules)

    @functools.cached_property
    def frozen_shardings(self) -> dict[str, NamedSharding]:
        return self.layout.shardings(self.frozen_shapes, self.mesh, self.rules)

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


def make_train_step(sc: StepConfig):
    """jit(step)(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics):
    the full parameters assembled from both trees, the model run functionally, gradients
    and updates for the trainable tree only, a trained router bias projected back onto <= 0
    (or onto 0: `ParamLayout.project`); trainable and optimizer state donated."""
    layout, tx, lr_at, mesh, rules = sc.layout, sc.optimizer, sc.schedule, sc.mesh, sc.rules

    def train_step(trainable, opt_state, frozen, batch, step):
        def loss_fn(params):
            with activate(mesh, rules):
                return lm_loss(layout.model(params, frozen), batch)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = layout.project(optax.apply_updates(trainable, updates))
        metrics = dict(loss=loss, nll=aux["nll"], z_loss=aux["z_loss"],
                       grad_norm=optax.tree.norm(grads), lr=lr_at(step))
        return trainable, opt_state, metrics

    return jax.jit(
        train_step, donate_argnums=(0, 1),
        in_shardings=(sc.trainable_shardings, sc.opt_shardings, sc.frozen_shardings,
                      sc.batch_sharding, sc.replicated),
        out_shardings=(sc.trainable_shardings, sc.opt_shardings, sc.replicated))


def set_up(config: ml_collections.ConfigDict, kind: str, mesh: Mesh,
           base_cfg: ModelConfig | None = None):
    """(StepConfig, jitted step) of a `kind` job (`kinds.KINDS`) of `config` on `mesh`;
    `base_cfg`: the model config of the base a branch, dense or ffn job starts from."""
    layout = kinds.kind_of(kind).layout(config, base_cfg)
    batch_shape = (int(config.data.global_batch), int(config.data.seq_len) + 1)
    sc = StepConfig(layout, make_optimizer(config.train), schedule(config.train), mesh,
                    tuple(tuple(r) for r in config.rules), batch_shape)
    return sc, make_train_step(sc)
