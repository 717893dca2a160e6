"""MoE layer forward+backward: each dispatch path against the limit and the loop reference.

    python bench/moe_layer.py [--tokens 8192 --d-model 512 --d-ff 1408 --experts 8 --top-k 2]

Prints, for each dispatch path, its time as a ratio to
  (a) the limit: one batched SwiGLU matmul over exactly the routed tokens (T*k rows split
      evenly over the experts), forward+backward, no routing or data movement;
  (b) the loop reference: every expert on every token, mixed by the routing weights.
The last row is the CPU's dropless path with the router scoring prefix means
(model.router_input=prefix_mean, the T tokens taken as one sequence) instead of tokens.
All timings are best-of-N in this one run, so the ratios hold on any machine.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from moesaic.model import dispatch, moe
from moesaic.model.reference import moe_reference


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    t, d, f, e, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k

    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d))
    w_gate = jax.random.normal(keys[1], (e, d, f)) * d ** -0.5
    w_up = jax.random.normal(keys[2], (e, d, f)) * d ** -0.5
    w_down = jax.random.normal(keys[3], (e, f, d)) * f ** -0.5
    router = jax.random.normal(keys[4], (e, d))
    weights = (w_gate, w_up, w_down, router)

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
    xs = jax.random.normal(keys[0], (e, rows, d))

    def limit(xs, w_gate, w_up, w_down):
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xs, w_gate)) * jnp.einsum(
            "ecd,edf->ecf", xs, w_up)
        return jnp.sum(jnp.einsum("ecf,efd->ecd", h, w_down) ** 2)

    limit_time = best_time(jax.jit(jax.grad(limit, argnums=(0, 1, 2, 3))), xs, *weights[:3],
                           repeats=args.repeats)
    reference_time = best_time(layer("reference"), x, *weights, repeats=args.repeats)
    flops = 3 * 3 * 2 * t * k * d * f  # 3 matmuls over the routed tokens; bwd = 2x fwd
    print(f"MoE layer fwd+bwd: T={t} D={d} F={f} E={e} k={k} on {jax.devices()[0].platform}")
    print(f"  limit (batched matmul of routed tokens): {limit_time * 1e3:8.1f} ms "
          f"({flops / limit_time / 1e9:.1f} GFLOP/s)")
    print(f"  loop reference (every expert, every token): {reference_time * 1e3:8.1f} ms")
    for path in ("dropless_ragged", "dropless_gather", "capacity"):
        seconds = best_time(layer(path), x, *weights, repeats=args.repeats)
        print(f"  {path:9s} {seconds * 1e3:8.1f} ms   vs limit {seconds / limit_time:5.2f}x"
              f"   vs loop reference {seconds / reference_time:5.2f}x")
    seconds = best_time(layer("dropless_gather", "prefix_mean"), x, *weights,
                        repeats=args.repeats)
    print(f"  dropless_gather, prefix_mean routing {seconds * 1e3:8.1f} ms   vs limit "
          f"{seconds / limit_time:5.2f}x   vs loop reference {seconds / reference_time:5.2f}x")


if __name__ == "__main__":
    main()
