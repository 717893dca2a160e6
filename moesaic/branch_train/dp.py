"""Private training for a party that asks for it: DP-SGD in the branch job.

    moesaic branch ... --config.branch.dp.clip_norm=1.0 --config.branch.dp.noise_multiplier=1.1 \
        --config.branch.dp.delta=1e-5

With `branch.dp.clip_norm` > 0 the step computes each row's gradient of the trainable tree
(jax-privacy's `clipped_grad`: per-example gradients, each clipped to an L2 norm of at most
clip_norm over the whole tree, summed), adds Gaussian noise of standard deviation
noise_multiplier * clip_norm to every coordinate (keyed by the train seed and the step),
divides by the rows of the batch and hands that to the optimizer (any optimizer update of a
privatised gradient is post-processing). An example is one packed row of seq_len + 1 tokens:
a document longer than a row spans several examples, so the guarantee is per row, not per
document.

The accountant (jax-privacy's DP-SGD accountant over dp-accounting's RDP accountant) reports
epsilon at `delta` after each logged step, in the job's metrics (`epsilon`): the sampling
rate is the party's rows per batch (global_batch times its share of the mixture: public rows
replayed beside it are public) over its rows per epoch. Like most DP-SGD reports it assumes
Poisson sampling; the loader shuffles every epoch instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax_privacy import clipping
from jax_privacy.accounting import accountants, analysis

from moesaic.model.sharding import activate
from moesaic.model.transformer import lm_loss

DEFAULTS = dict(clip_norm=0.0, noise_multiplier=0.0, delta=1e-5)  # clip_norm 0: off


@dataclasses.dataclass(frozen=True)
class DpSettings:
    clip_norm: float
    noise_multiplier: float
    delta: float

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> DpSettings | None:
        """The job's settings, None when private training is off; a bad value is a
        ValueError naming the field."""
        dp = config.branch.get("dp")
        if dp is None or not float(dp.get("clip_norm", 0.0)):
            return None
        s = cls(float(dp.clip_norm), float(dp.noise_multiplier), float(dp.delta))
        if not math.isfinite(s.clip_norm) or s.clip_norm < 0:
            raise ValueError(f"config.branch.dp.clip_norm={s.clip_norm}: a finite number > 0 "
                             "(0 turns private training off)")
        if not math.isfinite(s.noise_multiplier) or s.noise_multiplier < 0:
            raise ValueError(f"config.branch.dp.noise_multiplier={s.noise_multiplier}: a "
                             "finite number >= 0")
        if not 0 < s.delta < 1:
            raise ValueError(f"config.branch.dp.delta={s.delta}: must be in (0, 1)")
        if int(config.train.get("microbatches", 1)) != 1:
            raise ValueError("config.branch.dp with config.train.microbatches > 1: private "
                             "training clips per row over the whole batch; use 1")
        return s


def private_step(sc, dp: DpSettings, seed: int):
    """The unjitted DP-SGD step of `setup.make_train_step` (same arguments and outputs);
    metrics add clipped (the share of rows whose gradient was clipped)."""
    layout, tx, lr_at, mesh, rules = sc.layout, sc.optimizer, sc.schedule, sc.mesh, sc.rules
    view = sc.precision.compute_view if sc.precision else dict
    rows = sc.batch_shape[0]

    def train_step(trainable, opt_state, frozen, batch, step):
        def loss_fn(params, row):
            with activate(mesh, rules):
                loss, aux = lm_loss(layout.model(view(params), frozen), row)
            return loss, (aux["nll"], aux["z_loss"])

        grad_fn = clipping.clipped_grad(loss_fn, has_aux=True, l2_clip_norm=dp.clip_norm,
                                        batch_argnums=1, return_values=True,
                                        return_grad_norms=True, dtype=jnp.float32)
        summed, out = grad_fn(trainable, batch)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        leaves, treedef = jax.tree.flatten(summed)
        keys = jax.random.split(key, len(leaves))
        std = dp.noise_multiplier * dp.clip_norm
        noisy = [(g + std * jax.random.normal(k, g.shape, jnp.float32)) / rows
                 for g, k in zip(leaves, keys)]
        grads = {n: g.astype(trainable[n].dtype)
                 for n, g in jax.tree.unflatten(treedef, noisy).items()}
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = layout.project(optax.apply_updates(trainable, updates))
        nll, z_loss = out.aux
        metrics = dict(loss=jnp.mean(out.values), nll=jnp.mean(nll), z_loss=jnp.mean(z_loss),
                       grad_norm=optax.tree.norm(grads), lr=lr_at(step),
                       clipped=jnp.mean((out.grad_norms > dp.clip_norm).astype(jnp.float32)))
        return trainable, opt_state, metrics

    return train_step


@functools.lru_cache(maxsize=64)
def epsilon(noise_multiplier: float, batch_rows: int, num_rows: int, steps: int,
            delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `steps` DP-SGD steps of `batch_rows` of `num_rows` examples
    (Poisson sampling rate batch_rows / num_rows), by jax-privacy's DP-SGD accountant over
    dp-accounting's RDP ("rdp") or privacy-loss-distribution ("pld") accountant."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    config = (accountants.RdpAccountantConfig() if accountant == "rdp"
              else accountants.PldAccountantConfig())
    params = analysis.DpParams(noise_multipliers=noise_multiplier, num_samples=num_rows,
                               batch_size=batch_rows, delta=delta)
    return float(analysis.DpsgdTrainingAccountant(config).compute_epsilon(steps, params))


@dataclasses.dataclass(frozen=True)
class Accountant:
    """epsilon(step) of one job: the party's rows per batch and per epoch."""
    dp: DpSettings
    batch_rows: int
    num_rows: int

    @classmethod
    def of(cls, dp: DpSettings, batches, source: str, global_batch: int) -> Accountant:
        """From the job's TokenBatches: `source`'s share of each batch and its rows."""
        share = batches.weights.get(source, 1.0)
        stream = batches.streams.get(source) or next(iter(batches.streams.values()))
        return cls(dp, max(1, round(global_batch * share)), stream.per_epoch)

    def epsilon(self, step: int) -> float:
        return epsilon(self.dp.noise_multiplier, self.batch_rows, self.num_rows, step,
                       self.dp.delta)
