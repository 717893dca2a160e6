"""The training step's components, ours (JAX, the model's own functions) against torch on the
same shapes: where the step's time goes. `python bench/train_step.py --parts` prints it.

Each row runs one component's forward and backward (the optimizer row: one clipped AdamW
update of the whole model's parameters) on both sides, taking turns, and reports the best
CPU time of the process (all threads) and the best wall time of each. CPU time is what a
shared machine measures least badly: another job's load lengthens the wall time of both
sides, not the work each does. Per layer where the row says so; the step rows are the whole
model: ours with AdamW, torch's FlexOlmoForCausalLM forward+backward with and without
torch.optim.AdamW (clip 1.0).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moesaic.model.config import ModelConfig
from moesaic.model.layers import dense, rms_norm, rope
from moesaic.model.moe import swiglu


def _timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def _pairs(cfg: ModelConfig, batch: int, seq_len: int):
    """{row: (ours, torch)}, each a no-argument function running one forward+backward."""
    import torch
    import torch.nn.functional as tf

    b, t, d, n, hd, f, v = (batch, seq_len, cfg.d_model, cfg.n_heads, cfg.head_size,
                            cfg.d_ff, cfg.vocab_size)
    kh, eps = cfg.n_kv_heads, cfg.norm_eps
    keys = iter(jax.random.split(jax.random.key(0), 16))

    def rand(*shape, scale=1.0):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    def to_torch(a):
        return torch.from_numpy(np.array(a)).requires_grad_(True)

    x, q, k, val = rand(b, t, d), rand(b, t, n, hd), rand(b, t, kh, hd), rand(b, t, kh, hd)
    wq, wk, wv, wo = (rand(d, n, hd, scale=0.02), rand(d, kh, hd, scale=0.02),
                      rand(d, kh, hd, scale=0.02), rand(n, hd, d, scale=0.02))
    wg, wu, wd, head = (rand(d, f, scale=0.02), rand(d, f, scale=0.02), rand(f, d, scale=0.02),
                        rand(d, v, scale=0.02))
    norm_w = jnp.ones((n, hd))
    targets = jax.random.randint(next(keys), (b, t), 0, v)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))

    def grad_fn(loss, *args):
        g = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        return lambda: jax.block_until_ready(g(*args))

    def torch_fn(loss, *args):
        ts = [to_torch(a) for a in args]

        def run():
            for a in ts:
                a.grad = None
            loss(*ts).backward()
        return run

    def ours_attention(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) ** 2)

    def torch_attention(q, k, v):
        out = tf.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True,
                                              enable_gqa=kh != n)
        return (out ** 2).sum()

    def ours_projections(x, wq, wk, wv, wo):
        y = dense(x, wq) + dense(x, wk) + dense(x, wv)  # n == kh in the bench configs
        return jnp.sum(dense(y, wo, n_in=2) ** 2)

    def torch_projections(x, wq, wk, wv, wo):
        flat = x.reshape(-1, d)
        y = flat @ wq.reshape(d, -1) + flat @ wk.reshape(d, -1) + flat @ wv.reshape(d, -1)
        return ((y @ wo.reshape(-1, d)) ** 2).sum()

    def ours_norm_rope(q, k, w):
        q = rope(rms_norm(q, w, eps, 2), positions, cfg.rope_theta)
        k = rope(rms_norm(k, w, eps, 2), positions, cfg.rope_theta)
        return jnp.sum(q * k)

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.arange(t).float()[:, None] * inv_freq
    cos, sin = (torch.cat([freqs, freqs], -1).cos()[None, :, None, :],
                torch.cat([freqs, freqs], -1).sin()[None, :, None, :])

    def torch_norm_rope(q, k, w):
        def one(a):
            a = a * torch.rsqrt(a.pow(2).mean((-2, -1), keepdim=True) + eps) * w
            a1, a2 = a.chunk(2, -1)
            return a * cos + torch.cat([-a2, a1], -1) * sin
        return (one(q) * one(k)).sum()

    def ours_ffn(x, wg, wu, wd):
        return jnp.sum(swiglu(x, wg, wu, wd) ** 2)

    def torch_ffn(x, wg, wu, wd):
        flat = x.reshape(-1, d)
        return (((tf.silu(flat @ wg) * (flat @ wu)) @ wd) ** 2).sum()

    def ours_head(x, w):
        logp = jax.nn.log_softmax(dense(x, w), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    torch_targets = torch.from_numpy(np.array(targets)).long().reshape(-1)

    def torch_head(x, w):
        return tf.cross_entropy(x.reshape(-1, d) @ w, torch_targets)

    return {
        "attention core, 1 layer": (grad_fn(ours_attention, q, k, val),
                                    torch_fn(torch_attention, q, k, val)),
        "q/k/v/o projections, 1 layer": (grad_fn(ours_projections, x, wq, wk, wv, wo),
                                         torch_fn(torch_projections, x, wq, wk, wv, wo)),
        "q/k norm + RoPE, 1 layer": (grad_fn(ours_norm_rope, q, q, norm_w),
                                     torch_fn(torch_norm_rope, q, q, norm_w)),
        "SwiGLU FFN, 1 layer": (grad_fn(ours_ffn, x, wg, wu, wd),
                                torch_fn(torch_ffn, x, wg, wu, wd)),
        "lm_head + cross-entropy": (grad_fn(ours_head, x, head), torch_fn(torch_head, x, head)),
    }


def _optimizer_pair(n_params: int, clip: float = 1.0):
    import torch

    tx = optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.0))
    params = {"w": jnp.zeros((n_params,), jnp.float32)}
    grads = {"w": jnp.full((n_params,), 1e-3, jnp.float32)}
    state = [params, tx.init(params)]

    def update(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    update = jax.jit(update, donate_argnums=(0, 1))

    def ours():
        state[0], state[1] = update(state[0], state[1], grads)
        jax.block_until_ready(state[0])

    tp = torch.zeros(n_params, requires_grad=True)
    tp.grad = torch.full((n_params,), 1e-3)
    opt = torch.optim.AdamW([tp], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)

    def theirs():
        torch.nn.utils.clip_grad_norm_([tp], clip)
        opt.step()

    return ours, theirs


def component_table(cfg: ModelConfig, batch: int, seq_len: int, n_params: int,
                    steps: dict, repeats: int) -> list[str]:
    """Lines of the table: per row, ours and torch's best CPU and wall ms and the ratio of
    CPU times. `steps`: {row: (ours, torch)} of whole steps (run by the caller's functions)."""
    pairs = {**_pairs(cfg, batch, seq_len),
             f"AdamW + clip, {n_params / 1e6:.1f} M params": _optimizer_pair(n_params),
             **steps}
    lines = [f"{'component (fwd+bwd)':38s} {'ours cpu':>9s} {'torch cpu':>9s} {'ratio':>6s}"
             f" {'ours wall':>9s} {'torch wall':>10s}  (ms, best of {repeats})"]
    for name, (ours, theirs) in pairs.items():
        ours(), theirs()
        best = {"ours": [np.inf, np.inf], "torch": [np.inf, np.inf]}
        for _ in range(repeats):
            for side, fn in (("ours", ours), ("torch", theirs)):
                best[side] = np.minimum(best[side], _timed(fn))
        (oc, ow), (tc, tw) = best["ours"], best["torch"]
        lines.append(f"{name:38s} {oc * 1e3:9.1f} {tc * 1e3:9.1f} {oc / tc:5.2f}x"
                     f" {ow * 1e3:9.1f} {tw * 1e3:10.1f}")
        print(lines[-1], flush=True)
    return lines
