"""Router tuning after a merge (FlexOlmo's optional step): the router rows of a merged model
are trained on data the caller provides (public proxy data), everything else frozen.

Only the rows reach the optimizer (optax AdamW, weight decay 0): every other tensor is a
constant of the loss, so it gets no gradient and no optimizer state. The output is the merged
checkpoint with new rows (still RouterState in the model: frozen after tuning), written
tensor by tensor; meta.router.tuned records the data, steps and learning rate. A later
`merge remove/add` rebuilds the router by its kind, so tuning must then be run again.

On a `mesh` with an expert axis the model is expert-parallel (its experts padded to a multiple
of the axis, `moesaic.model.expert_parallel`; the padding rows get no gradient and are cut
before the rows are written), the batch split over the data and expert axes.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from moesaic.configs.common import DEFAULT_RULES
from moesaic.data.loader import TokenBatches
from moesaic.merge.sources import MergeRefused, View
from moesaic.model import checkpoint, expert_parallel, streaming
from moesaic.model.names import ROUTER
from moesaic.model.params import build_model
from moesaic.model.sharding import activate, logical_to_spec, make_mesh
from moesaic.model.transformer import lm_loss
from moesaic.routing import report


def tune_router(merged: str | pathlib.Path, out: str | pathlib.Path,
                batches: Callable[[int], np.ndarray], *, steps: int, lr: float = 1e-3,
                data: dict | None = None, log=print, progress: bool = True,
                mesh: jax.sharding.Mesh | None = None, dispatch: str = "") -> dict:
    """Trains the router rows for `steps` on `batches(step)` (int32 (B, T+1)); writes `out`.
    A progress bar shows the steps and the loss unless `progress` is False. `mesh`: where the
    model runs (default: one device); `dispatch`: the model's (default: its own)."""
    merged = pathlib.Path(merged)
    checkpoint.output_path(out)  # an --out that cannot be written is refused before any step runs
    meta = checkpoint.read_meta(merged)
    if meta.get("kind") not in ("merged", "btx"):
        raise MergeRefused(f"{merged}: a {meta.get('kind')!r} checkpoint; tune-router takes a "
                           f"merged model")
    if steps < 1:
        raise MergeRefused(f"--steps {steps}: must be at least 1")
    cfg = checkpoint.model_config(meta)
    mesh = mesh or make_mesh({"data": 1}, devices=jax.local_devices()[:1])
    expert_parallel.check_expert_axis(cfg.n_experts, mesh.shape["expert"], "the mesh")
    rules = expert_parallel.runtime_rules(DEFAULT_RULES, mesh)
    names = list(checkpoint.flatten(jax.tree.map(lambda v: v, _abstract_params(cfg))))
    stored = checkpoint.tensor_metadata(merged)  # {name: (shape, dtype)} as written, read once
    cfg, params = expert_parallel.load_merged(  # read onto the mesh, padded, split
        merged, cfg.replace(dispatch=dispatch or cfg.dispatch), mesh, rules, tensors=names)
    rows = params.pop(ROUTER)
    optimizer = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.0)
    opt_state = optimizer.init(rows)

    def loss(rows, frozen, batch):
        return lm_loss(build_model(cfg, {**frozen, ROUTER: rows}), batch)[1]["nll"]

    def place(batch):
        spec = logical_to_spec(("batch", "length"), rules, mesh, batch.shape)
        return jax.device_put(jnp.asarray(batch), jax.sharding.NamedSharding(mesh, spec))

    @jax.jit
    def step(rows, opt_state, frozen, batch):
        value, grad = jax.value_and_grad(loss)(rows, frozen, batch)
        updates, opt_state = optimizer.update(grad, opt_state, rows)
        return optax.apply_updates(rows, updates), opt_state, value

    first = last = None
    bar = tqdm(range(steps), desc="tune-router", unit="step", disable=not progress,
               dynamic_ncols=True, leave=False)
    for i in bar:
        with activate(mesh, rules):
            rows, opt_state, value = step(rows, opt_state, params, place(batches(i)))
        last = float(value)
        first = last if first is None else first
        bar.set_postfix(loss=f"{last:.4f}", refresh=False)
    bar.close()
    log(f"tune-router: {steps} steps, loss {first:.4f} -> {last:.4f}")
    rows = expert_parallel.unpadded(cfg, {ROUTER: rows})[ROUTER]  # the padding cut
    new_rows = np.asarray(rows).astype(stored[ROUTER][1])
    tensors = {}
    for name in stored:
        if name == ROUTER:
            tensors[name] = streaming.TensorSource(new_rows.shape, new_rows.dtype,
                                                   lambda: [new_rows])
        else:
            tensors[name] = View(merged, name).source()
    router = dict(meta["router"], tuned={"steps": steps, "lr": lr, "data": data or {},
                                         "loss_first": first, "loss_last": last})
    new_meta = {k: v for k, v in meta.items() if k != "fingerprint"}
    new_meta["router"] = router
    # the report describes the rows the model now holds, not the ones it was merged with
    names = [str(e.get("source", i)) for i, e in enumerate(meta.get("experts") or [])]
    reports, warnings = report.routing_report(np.asarray(rows, np.float32), names)
    new_meta.update(routing_report=reports, routing_warnings=warnings)
    streaming.save_streaming(out, tensors, new_meta)
    return checkpoint.read_meta(out)


def tune_router_on_data(merged: str | pathlib.Path, out: str | pathlib.Path,
                        data_dir: str | pathlib.Path, mixture: str, *, seq_len: int, batch: int,
                        seed: int, steps: int, lr: float = 1e-3, log=print,
                        progress: bool = True, mesh: jax.sharding.Mesh | None = None,
                        dispatch: str = "") -> dict:
    """`tune_router` on batches of `mixture` from a prepared data folder (the loader's
    deterministic (seed, step) batches); meta.router.tuned.data records where they came from."""
    batches = TokenBatches(data_dir, mixture, seq_len=seq_len, global_batch=batch, seed=seed)
    return tune_router(merged, out, batches.get, steps=steps, lr=lr, log=log, progress=progress,
                       data={"dir": str(data_dir), "mixture": mixture, "seq_len": seq_len,
                             "batch": batch, "seed": seed}, mesh=mesh, dispatch=dispatch)


def _abstract_params(cfg):
    from flax import nnx
    return nnx.state(checkpoint.abstract_model(cfg))
