"""`moesaic plan --job eval|tune-router|decode`: a merged model's step compiled ahead of time
on fake CPU devices, as `moesaic eval`, `moesaic tune-router` and generation run it.

    moesaic plan --config moesaic/configs/flexolmo_7x7b.py --job eval \
        --mesh data=1,expert=8 --hbm 80GB

The merged model is the config's model section (flexolmo_7x7b: 7 experts, top 5), made
expert-parallel as the commands make it (`moesaic.model.expert_parallel`: experts padded to a
multiple of the expert axis and split over it, the batch over the data and expert axes):

  eval         one batch's target log-probabilities: --batch rows of --seq-len + 1 tokens
  tune-router  one router-tuning step: gradients for the router rows only, AdamW on them
  decode       one decoding step: one new token per row against a key/value cache of
               --seq-len slots (`moesaic.model.decode`)

Every array is a `jax.ShapeDtypeStruct` carrying its sharding, so nothing the size of the
model is allocated. The plan reports XLA's per-device memory, the same counted from the
shardings, and the bytes every collective moves per step (`moesaic.launch.collectives`).
"""

from __future__ import annotations

import dataclasses
import math
import time

from moesaic.launch.plan import MemoryReport, xla_memory  # no jax at import

JOBS = ("eval", "tune-router", "decode")


@dataclasses.dataclass
class MergedPlan(MemoryReport):
    job: str
    mesh: dict[str, int]
    experts: int
    padding: int
    dispatch: str
    batch: int
    seq_len: int
    by_hand: dict[str, int]  # per-device bytes: parameters, optimizer, inputs
    xla: dict[str, int]
    collectives: dict
    compile_seconds: float

    def report(self, hbm: int | None) -> str:
        slots = self.experts + self.padding
        per = slots // max(1, self.mesh.get("expert", 1))
        lines = [f"{self.job} step of the merged model on mesh {self.mesh} "
                 f"({math.prod(self.mesh.values())} devices): {self.experts} experts "
                 f"({slots} slots, {per} per device of the expert axis), dispatch "
                 f"{self.dispatch}, batch {self.batch} x {self.seq_len} tokens "
                 f"(compiled in {self.compile_seconds:.1f} s)"]
        return "\n".join([*lines, "", *self.memory_lines(hbm)])


def merged_config(config, dispatch: str):
    """The merged model planned: the config's model section, scanned, with `dispatch`."""
    from moesaic.model.config import ModelConfig

    cfg = ModelConfig.from_config(config.model).replace(scan_layers=True, dispatch=dispatch)
    if not cfg.is_moe:
        raise ValueError("--job: config.model has one expert (a dense model); plan a merged "
                         "model with an MoE config, e.g. moesaic/configs/olmo2_7b.py:experts=4")
    return cfg


def check(config, mesh_shape: dict[str, int], dispatch: str) -> None:
    """Input errors before anything compiles: a dense model, an expert axis the experts
    cannot fill."""
    from moesaic.configs.expert_axis import check_expert_axis

    cfg = merged_config(config, dispatch)
    check_expert_axis(cfg.n_experts, mesh_shape["expert"], "--mesh")


def _abstract(flat_shapes, shardings):
    import jax

    return {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings[n])
            for n, a in flat_shapes.items()}


def _bytes(tree) -> int:
    import jax

    from moesaic.launch.plan import per_device_bytes

    return sum(per_device_bytes(a.shape, a.dtype, a.sharding) for a in jax.tree.leaves(tree))


def make_plan(config, mesh_shape: dict[str, int], job: str, *, batch: int, seq_len: int,
              dispatch: str = "dropless") -> MergedPlan:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from moesaic.configs.common import DEFAULT_RULES
    from moesaic.launch.collectives import collective_bytes
    from moesaic.model import checkpoint, decode
    from moesaic.model.expert_parallel import padded_config, runtime_rules
    from moesaic.model.names import ROUTER
    from moesaic.model.params import build_model
    from moesaic.model.sharding import activate, logical_to_spec, make_mesh, state_shardings
    from moesaic.model.transformer import lm_loss

    if job not in JOBS:
        raise ValueError(f"--job {job!r}: one of {('branch', *JOBS)}")
    check(config, mesh_shape, dispatch)
    devices = math.prod(mesh_shape.values())
    mesh = make_mesh(dict(mesh_shape), devices=jax.devices("cpu")[:devices])
    rules = runtime_rules(tuple(tuple(r) for r in config.rules) or DEFAULT_RULES, mesh)
    cfg = padded_config(merged_config(config, dispatch), mesh.shape["expert"])
    state = nnx.state(checkpoint.abstract_model(cfg))
    params = _abstract(checkpoint.flatten(state),
                       checkpoint.flatten(state_shardings(state, mesh, rules)))

    def sharded(shape, dtype, axes):
        spec = logical_to_spec(axes, rules, mesh, shape)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    by_hand = {"parameters": _bytes(params)}
    if job == "eval":
        tokens = sharded((batch, seq_len + 1), jnp.int32, ("batch", "length"))

        def step(p, t):
            logits, _ = build_model(cfg, p)(t[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            return jnp.take_along_axis(logp, t[:, 1:, None], axis=-1)[..., 0]

        args = (params, tokens)
        by_hand["inputs"] = _bytes(tokens)
    elif job == "tune-router":
        optimizer = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.0)
        rows = params.pop(ROUTER)
        opt_state = jax.eval_shape(optimizer.init, rows)
        opt_state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=(
                rows.sharding if a.shape == rows.shape else NamedSharding(mesh, PartitionSpec()))),
            opt_state)
        tokens = sharded((batch, seq_len + 1), jnp.int32, ("batch", "length"))

        def step(rows, opt_state, frozen, t):
            def loss(r):
                return lm_loss(build_model(cfg, {**frozen, ROUTER: r}), t)[1]["nll"]
            value, grad = jax.value_and_grad(loss)(rows)
            updates, opt_state = optimizer.update(grad, opt_state, rows)
            return optax.apply_updates(rows, updates), opt_state, value

        args = (rows, opt_state, params, tokens)
        by_hand.update(optimizer=_bytes(opt_state), inputs=_bytes(tokens))
    else:
        cache_shapes = jax.eval_shape(lambda: decode.init_cache(cfg, batch=batch, size=seq_len))
        cache_axes = decode.Cache(k=("layers", "batch", None, "kv_heads", "head_dim"),
                                  v=("layers", "batch", None, "kv_heads", "head_dim"),
                                  valid=("batch", None), x_sum=("layers", "batch", "embed"),
                                  count=("batch",), length=(), gate_z=("batch", None),
                                  last=("batch",))
        cache = decode.Cache(*(sharded(s.shape, s.dtype, a)
                               for s, a in zip(cache_shapes, cache_axes)))
        tokens = sharded((batch, 1), jnp.int32, ("batch", None))
        valid = sharded((batch, 1), jnp.bool_, ("batch", None))

        def step(p, t, v, c):
            return decode.forward(build_model(cfg, p), t, v, c)

        args = (params, tokens, valid, cache)
        by_hand.update(cache=_bytes(cache), inputs=_bytes((tokens, valid)))
    start = time.perf_counter()
    with activate(mesh, rules):
        compiled = jax.jit(step).lower(*args).compile()
    seconds = time.perf_counter() - start
    xla = xla_memory(compiled)
    return MergedPlan(job, dict(mesh_shape), cfg.n_experts, cfg.expert_padding, dispatch, batch,
                      seq_len, by_hand, xla, collective_bytes(compiled.as_text()), seconds)
