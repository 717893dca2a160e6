"""What a QLoRA branch job's start needs per device, beside its step (`moesaic plan`): the
programs the start runs under the base, compiled for abstract arguments as the step is.

    start = start_memory(sc, base_cfg)   # {"held": ..., "quantize": ..., "stats": ..., "needed"}

A QLoRA start (branch.lora.quantize int8 / nf4, `branch_train.quantized_base`) holds the base
as the step holds its frozen tree: projections quantized, the rest in the compute dtype. It
runs in two phases:

    quantize  loading: what is placed so far (at most the whole held base, `held`) plus one
              layer of the largest projection quantized on the device
    stats     the router statistics over one global batch (`routing.stats.stats_program`:
              the held base's forward with collect_stats, xtx (L, D, D) out), the held base
              its argument

"needed" is the larger phase; the job needs the larger of it and the step's. Other jobs'
starts load the base as stored and are not planned (empty: `moesaic plan` reports the step).
"""

from __future__ import annotations


def start_memory(sc, base_cfg) -> dict[str, int]:
    """Per-device bytes of the start of the job of step config `sc` from a base of
    `base_cfg`; {} unless its frozen base is held quantized."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moesaic.launch.plan import per_device_bytes, xla_memory
    from moesaic.model import checkpoint, params, quantized
    from moesaic.routing import stats

    if sc.precision.quantize == "none":
        return {}
    mesh, rules = sc.mesh, sc.rules
    names = checkpoint.flatten(nnx.state(checkpoint.abstract_model(base_cfg)))
    held = {n: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            sc.frozen_shapes[n], sc.frozen_shardings[n]) for n in names}
    held_bytes = sum(per_device_bytes(a.shape, a.dtype, a.sharding)
                     for a in jax.tree.leaves(held))

    def needed(compiled) -> int:
        x = xla_memory(compiled)
        return x["argument"] + x["output"] - x["alias"] + x["temp"]

    graphdef, model_state = nnx.split(params.build_model(base_cfg, held))
    rows, length = sc.batch_shape[0], sc.batch_shape[1] - 1
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=stats.stats_batch_sharding(
        mesh, rules, (rows, length)))
    # the largest projection's layer, quantized on one device
    name = max((n for n in names if sc.precision.quantizes(n)),
               key=lambda n: np.prod(names[n].shape[1:]))
    layer = jax.ShapeDtypeStruct(names[name].shape[1:], names[name].dtype)
    quantize = jax.jit(lambda a: quantized.quantize_layer(a, sc.precision.quantize, name))
    out = {"held": held_bytes,
           "quantize": held_bytes + needed(quantize.lower(layer).compile()),
           "stats": needed(stats.stats_program(graphdef, mesh, rules).lower(
               model_state, tokens).compile())}
    return {**out, "needed": max(out["quantize"], out["stats"])}
