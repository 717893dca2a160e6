"""What moesaic does on a GPU or TPU: the training step's model FLOP utilisation and the MoE
layer's kernels, in one run. On a machine with only CPUs it says so and exits 0.

    python bench/accelerator.py                      # one H100: a few minutes (expected)
    python bench/accelerator.py --batch 16 --microbatches 4 --repeats 10

It prints
  1. the branch step's MFU (`moesaic.branch_train.profiling`: model FLOPs from the shapes,
     against the device kind's bf16 peak, or --peak-tflops) for the OLMo-2 1B shapes
     (configs/olmo2_1b.py, bf16 compute over float32 master parameters, full remat): the
     dense model trained whole (a dense branch), and the 2-expert coordinated branch over it
     (the own expert trains, the base's is frozen and held in bf16);
  2. the MoE layer, forward + backward in bf16: the dropless path on `jax.lax.ragged_dot`
     against one dense SwiGLU matmul over exactly the routed tokens (the same FLOPs, no
     routing or grouping: the limit a grouped kernel can reach);
  3. with 2 or more devices, the MoE layer on an expert axis over all of them: the explicit
     all-to-all dispatch (model.dispatch=all_to_all) against the compiler's (dropless); on
     one device there is nothing to send and this part is skipped, saying so.

What to expect on one H100 80GB SXM (989 TFLOP/s bf16 dense). These are expectations from
the FLOP counts and what comparable JAX stacks reach on that card, NOT measurements: the
machines this repository is developed on have no accelerator.
  1B dense step, 8 x 4096 tokens in 2 microbatches:      MFU 0.35 to 0.50
  2-expert branch of it (about 2 x the FFN FLOPs):       MFU 0.30 to 0.45 (fewer weight
                                                          gradients than FLOPs suggest)
  ragged_dot layer vs one dense matmul, 16384 tokens,
  D 2048, F 8192, 8 experts, top-2:                      1.1x to 1.6x the dense time
  all_to_all vs compiler: skipped on one device; on 8 H100s (NVLink) expect the explicit
  path within 0.7x to 1.3x of the compiler's.
Measured figures belong in docs/scale.md with the device and the exact command.
"""

from __future__ import annotations

import argparse
import sys
import timeit

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moesaic.branch_train import profiling, setup, upcycle
from moesaic.configs import olmo2_1b
from moesaic.configs.common import DEFAULT_RULES
from moesaic.model import checkpoint, dispatch, moe
from moesaic.model.config import ModelConfig
from moesaic.model.sharding import activate, make_mesh
from moesaic.model.transformer import Decoder

NEEDS_ACCELERATOR = ("bench/accelerator.py needs a GPU or TPU: jax sees only CPU devices here, "
                     "so nothing was measured (the figures to expect are in its docstring)")


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn` (which blocks), after one untimed call."""
    fn()
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def step_state(sc, kind: str, base_cfg: ModelConfig):
    """(trainable, opt_state, frozen) of a `kind` job over a random base of `base_cfg`,
    placed with the step's shardings and dtypes."""
    def init():
        base = checkpoint.flatten(nnx.state(Decoder(base_cfg, rngs=nnx.Rngs(0))))
        if kind == "branch":
            row = jax.random.normal(jax.random.key(1), (base_cfg.n_layers, base_cfg.d_model))
            trainable, frozen = upcycle.upcycle(sc.layout, base, base_cfg, 0.02 * row)
        else:
            trainable, frozen = upcycle.split_full(sc.layout, base)
        return sc.precision.hold_trainable(trainable), sc.precision.hold_frozen(frozen)

    trainable, frozen = jax.jit(init, out_shardings=(sc.trainable_shardings,
                                                     sc.frozen_shardings))()
    opt_state = jax.jit(sc.optimizer.init, out_shardings=sc.opt_shardings)(trainable)
    return trainable, opt_state, frozen


def step_mfu(args, kind: str) -> str:
    config = olmo2_1b.get_config("source=bench")
    config.data.update(global_batch=args.batch, seq_len=args.seq_len)
    config.train.microbatches = args.microbatches
    config.mesh.update(data=-1, fsdp=1)
    if args.layers:
        config.model.n_layers = args.layers
    if args.width:
        heads = max(1, args.width // 128)
        config.model.update(d_model=args.width, d_ff=4 * args.width, n_heads=heads,
                            n_kv_heads=heads)
    base_cfg = ModelConfig.from_config(config.model).replace(n_experts=1, top_k=1)
    sc, step = setup.set_up(config, kind, make_mesh({"data": -1}), base_cfg)
    state = list(step_state(sc, kind, base_cfg))
    tokens = np.random.default_rng(0).integers(0, 50_000, sc.batch_shape).astype(np.int32)
    batch = jax.device_put(tokens, sc.batch_sharding)

    def run():
        state[0], state[1], metrics = step(state[0], state[1], state[2], batch, jnp.int32(0))
        jax.block_until_ready(metrics)

    seconds = best_time(run, args.repeats)
    n_tokens = args.batch * args.seq_len
    flops = profiling.model_flops_per_token(sc.layout, args.seq_len) * n_tokens
    peak = profiling.peak_tflops(jax.devices()[0].device_kind, args.peak_tflops)
    devices = jax.device_count()
    mfu = f"MFU {flops / seconds / (peak * 1e12 * devices):.3f}" if peak else "MFU ? (no peak)"
    counts = sc.layout.counts()
    cfg = sc.layout.cfg
    return (f"{kind:6s} L={cfg.n_layers} D={cfg.d_model} {cfg.n_experts} expert(s), "
            f"{counts['trainable'] / 1e9:.2f}B "
            f"trainable {counts['frozen'] / 1e9:.2f}B frozen: {seconds * 1e3:8.1f} ms/step "
            f"{n_tokens / seconds:10,.0f} tokens/s  {flops / seconds / 1e12 / devices:6.1f} "
            f"TFLOP/s/device  {mfu}")


def moe_weights(args, dtype):
    keys = jax.random.split(jax.random.key(0), 5)
    t, d, f, e = args.tokens, args.moe_d_model, args.moe_d_ff, args.experts
    x = jax.random.normal(keys[0], (t, d), dtype)
    w_gate = (jax.random.normal(keys[1], (e, d, f)) * d ** -0.5).astype(dtype)
    w_up = (jax.random.normal(keys[2], (e, d, f)) * d ** -0.5).astype(dtype)
    w_down = (jax.random.normal(keys[3], (e, f, d)) * f ** -0.5).astype(dtype)
    router = jax.random.normal(keys[4], (e, d), jnp.float32)
    return x, w_gate, w_up, w_down, router


def layer_grad(path: str, top_k: int):
    """jit(grad) of the MoE layer's forward through dispatch `path`, summed squares."""
    def loss(x, w_gate, w_up, w_down, router):
        r = moe.route(x, router, None, top_k, False)
        y, _ = dispatch.get(path)(x, r.weights_tk, r.experts_tk, w_gate, w_up, w_down)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def moe_layer(args) -> list[str]:
    dtype = jnp.bfloat16
    x, w_gate, w_up, w_down, router = moe_weights(args, dtype)
    routed = x[jnp.arange(args.tokens * args.top_k) % args.tokens]  # the T*k routed rows

    def dense_loss(xs, w_gate, w_up, w_down):
        h = jax.nn.silu(xs @ w_gate) * (xs @ w_up)
        return jnp.sum(jnp.square((h @ w_down).astype(jnp.float32)))

    dense = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2, 3)))
    dense_s = best_time(lambda: jax.block_until_ready(
        dense(routed, w_gate[0], w_up[0], w_down[0])), args.repeats)
    ragged = layer_grad("dropless_ragged", args.top_k)
    ragged_s = best_time(lambda: jax.block_until_ready(
        ragged(x, w_gate, w_up, w_down, router)), args.repeats)
    flops = 3 * 3 * 2 * args.tokens * args.top_k * args.moe_d_model * args.moe_d_ff
    return [f"MoE layer fwd+bwd bf16, T={args.tokens} D={args.moe_d_model} F={args.moe_d_ff} "
            f"E={args.experts} k={args.top_k}:",
            f"  one dense matmul over the routed tokens {dense_s * 1e3:8.2f} ms "
            f"({flops / dense_s / 1e12:6.1f} TFLOP/s)",
            f"  dropless_ragged (ragged_dot)            {ragged_s * 1e3:8.2f} ms "
            f"({flops / ragged_s / 1e12:6.1f} TFLOP/s, {ragged_s / dense_s:.2f}x the dense)"]


def dispatch_comparison(args) -> list[str]:
    n = jax.device_count()
    if n < 2:
        return ["all_to_all vs compiler dispatch: skipped, one device (an expert axis of 1 "
                "sends nothing); run on 2 or more devices"]
    experts = args.experts + (-args.experts % n)  # the stacked experts must divide the axis
    mesh = make_mesh({"data": 1, "expert": n})
    rules = tuple(DEFAULT_RULES)
    bigger = argparse.Namespace(**{**vars(args), "experts": experts})
    x, w_gate, w_up, w_down, router = moe_weights(bigger, jnp.bfloat16)

    def put(a, spec):
        return jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))

    x = put(x, (("data", "fsdp", "expert"), None))
    w_gate, w_up, w_down = (put(w, ("expert", None, None)) for w in (w_gate, w_up, w_down))
    router = put(router, ())
    lines = [f"MoE layer fwd+bwd on an expert axis of {n} ({experts} experts):"]
    times = {}
    for path in ("dropless", "all_to_all"):
        grad = layer_grad(path, args.top_k)

        def run(grad=grad):
            with activate(mesh, rules):
                jax.block_until_ready(grad(x, w_gate, w_up, w_down, router))

        times[path] = best_time(run, args.repeats)
        lines.append(f"  {path:10s} {times[path] * 1e3:8.2f} ms "
                     f"({times[path] / times['dropless']:.2f}x the compiler's)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--layers", type=int, default=0, help="default: the 1B config's 16")
    parser.add_argument("--width", type=int, default=0,
                        help="d_model (d_ff 4x, heads of 128); default: the 1B config's")
    parser.add_argument("--tokens", type=int, default=16384, help="MoE layer tokens")
    parser.add_argument("--moe-d-model", type=int, default=2048)
    parser.add_argument("--moe-d-ff", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="one device's peak; default: by its kind (profiling.PEAK_TFLOPS)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on CPU anyway, to check the script (give small shapes)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    if device.platform == "cpu" and not args.allow_cpu:
        print(NEEDS_ACCELERATOR)
        return 0
    peak = profiling.peak_tflops(device.device_kind, args.peak_tflops)
    print(f"{jax.device_count()} x {device.device_kind} ({device.platform}), bf16 peak "
          f"{peak or '?'} TFLOP/s per device; jax {jax.__version__}", flush=True)
    print(f"OLMo-2 1B shapes, {args.batch} x {args.seq_len} tokens in {args.microbatches} "
          "microbatch(es), bf16 compute, float32 master:", flush=True)
    for kind in ("dense", "branch"):
        print("  " + step_mfu(args, kind), flush=True)
    for line in [*moe_layer(args), *dispatch_comparison(args)]:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
