"""MoE layer forward+backward: each dispatch path against the limit and the loop reference.

    python bench/moe_layer.py [--tokens 8192 --d-model 512 --d-ff 1408 --experts 8 --top-k 2]

Prints, for each dispatch path, its time as a ratio to
  (a) the limit: one batched SwiGLU matmul over exactly the routed tokens (T*k rows split
      evenly over the experts), forward+backward, no routing or data movement;
  (b) the loop reference: every expert on every token, mixed by the routing weights.
The last timed row is `dropless` (the path the backend picks) with the router scoring prefix
means (model.router_input=prefix_mean, the T tokens taken as one sequence) instead of tokens.
All timings are best-of-N in this one run, the paths taking turns in each round (so a busy
machine slows them alike), and the ratios hold on any machine.

"temp" is the compiled program's scratch memory (XLA's memory analysis: activations and
buffers, not the inputs or the gradients returned). The last lines compile the dropless paths
with more experts at the same T and k: a path whose buffers follow the routed tokens keeps
its scratch memory; one that computes every expert on every token grows it E-fold.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from moesaic.model import dispatch, moe
from moesaic.model.reference import moe_reference


def best_times(runs: dict, repeats: int) -> dict[str, float]:
    """{name: (fn, args)} -> {name: best seconds}, each round running every fn once."""
    best = {}
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))
    for _ in range(repeats):
        for name, (fn, args) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def temp_mb(fn, args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 1e6


def random_weights(e: int, d: int, f: int):
    keys = jax.random.split(jax.random.key(e), 4)
    return (jax.random.normal(keys[0], (e, d, f)) * d ** -0.5,
            jax.random.normal(keys[1], (e, d, f)) * d ** -0.5,
            jax.random.normal(keys[2], (e, f, d)) * f ** -0.5,
            jax.random.normal(keys[3], (e, d)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-experts", type=int, nargs="*", default=[32],
                        help="expert counts to compile (not run) the dropless paths at")
    args = parser.parse_args()
    t, d, f, e, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k

    x = jax.random.normal(jax.random.key(0), (t, d))
    weights = random_weights(e, d, f)

    def layer(path, router_input="token"):
        def loss(x, w_gate, w_up, w_down, router):
            scored = moe.router_inputs(x[None], router_input)[0]
            r = moe.route(scored, router, None, k, False)
            if path == "reference":
                y = moe_reference(x, r, w_gate, w_up, w_down)
            else:
                y, _ = dispatch.get(path)(x, r.weights_tk, r.experts_tk, w_gate, w_up, w_down,
                                          capacity_factor=args.capacity_factor)
            return jnp.sum(y * y)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    rows = t * k // e
    xs = jax.random.normal(jax.random.key(1), (e, rows, d))

    def limit(xs, w_gate, w_up, w_down):
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xs, w_gate)) * jnp.einsum(
            "ecd,edf->ecf", xs, w_up)
        return jnp.sum(jnp.einsum("ecf,efd->ecd", h, w_down) ** 2)

    runs = {"limit": (jax.jit(jax.grad(limit, argnums=(0, 1, 2, 3))), (xs, *weights[:3])),
            "reference": (layer("reference"), (x, *weights))}
    paths = ("dropless_blocked", "dropless_ragged", "dropless_gather", "capacity")
    for path in paths:
        runs[path] = (layer(path), (x, *weights))
    runs["prefix_mean"] = (layer("dropless", "prefix_mean"), (x, *weights))
    best = best_times(runs, args.repeats)
    limit_time, reference_time = best["limit"], best["reference"]
    flops = 3 * 3 * 2 * t * k * d * f  # 3 matmuls over the routed tokens; bwd = 2x fwd
    print(f"MoE layer fwd+bwd: T={t} D={d} F={f} E={e} k={k} on {jax.devices()[0].platform}")
    print(f"  limit (batched matmul of routed tokens): {limit_time * 1e3:8.1f} ms "
          f"({flops / limit_time / 1e9:.1f} GFLOP/s)  temp {temp_mb(*runs['limit']):7.0f} MB")
    print(f"  loop reference (every expert, every token): {reference_time * 1e3:8.1f} ms  "
          f"temp {temp_mb(*runs['reference']):7.0f} MB")
    for path in (*paths, "prefix_mean"):
        label = "dropless, prefix_mean routing" if path == "prefix_mean" else path
        seconds = best[path]
        print(f"  {label:16s} {seconds * 1e3:8.1f} ms   vs limit {seconds / limit_time:5.2f}x"
              f"   vs loop reference {seconds / reference_time:5.2f}x"
              f"   temp {temp_mb(*runs[path]):7.0f} MB")
    for n_experts in args.memory_experts:
        more = (x, *random_weights(n_experts, d, f))
        sizes = "  ".join(f"{path} {temp_mb(layer(path), more):7.0f} MB"
                          for path in ("dropless_blocked", "dropless_gather"))
        print(f"  temp with E={n_experts} (compiled, not run): {sizes}")

if __name__ == "__main__":
    main()
