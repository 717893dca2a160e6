"""One training step (forward, backward, AdamW update) of the trainer, as tokens/s and model
FLOP utilisation, for the tiny and small configs.

    python bench/train_step.py [--configs tiny,small] [--batch 4 --seq-len 256] [--repeats 3]
                               [--experts E --top-k K] [--unroll] [--system-malloc] [--branch]
                               [--parts] [--one-thread]

All figures are ratios to rates measured in this same run, so they hold on any machine:
  MFU      model FLOPs per step / step time / the jnp.dot rate (float32 2048^3, best of 5)
  vs HF    our step time / transformers' FlexOlmoForCausalLM forward+backward on the same
           shapes (torch, CPU; needs the `hf` extra). Ours also applies the AdamW update.
  data     the share of the trainer's loop spent waiting for batches of the smoke corpora
           read ahead by data.prefetch threads (`data_wait` in bench/data.py; aim < 5%);
           --data-steps 0 skips it.
  --branch what freezing by construction saves: a coordinated branch's step (`moesaic branch`:
           only the owner's expert, router row and bias train; a base of --experts experts,
           default 1, plus the owner's) over pretraining every parameter of the same model
           (base experts + 1, top-k all, router bias), same shapes, taking turns each round.
  --parts  the step's components (attention, projections, norms, FFN, head, AdamW) and the
           whole step against torch's, as CPU and wall time (bench/train_parts.py);
           --one-thread runs XLA and torch on one thread each (docs/training.md, Speed on CPU).
Like the `moesaic` command, it keeps freed host memory for reuse (moesaic.model.host_memory)
unless --system-malloc; --unroll runs the layers as a loop (model.scan_layers=False).
Model FLOPs per token: 6 * (attention + top_k experts + router + lm_head parameters)
+ 12 * layers * seq_len * heads * head_dim (attention scores, PaLM's count).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import train_parts  # bench/train_parts.py, beside this script
from data import data_wait, smoke_data_dir  # bench/data.py, beside this script
from flax import nnx

from moesaic.branch_train import setup, upcycle
from moesaic.configs import small, tiny
from moesaic.model import checkpoint, host_memory
from moesaic.model.config import ModelConfig
from moesaic.model.sharding import make_mesh
from moesaic.model.transformer import Decoder

CONFIGS = {"tiny": tiny, "small": small}


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def dot_rate(repeats: int = 5, n: int = 2048) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * n ** 3 / best_of(lambda: dot(a, a).block_until_ready(), repeats)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    d, f, h, hd = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.head_size
    attention = d * hd * (2 * h + 2 * cfg.n_kv_heads)
    experts = cfg.top_k * 3 * d * f + (cfg.n_experts * d if cfg.is_moe else 0)
    params = cfg.n_layers * (attention + experts) + d * cfg.vocab_size
    return 6 * params + 12 * cfg.n_layers * seq_len * h * hd


def step_runner(config, kind: str = "pretrain", base_cfg: ModelConfig | None = None):
    """One call of the trainer's step (`setup.set_up`) of a `kind` job on all devices, data
    parallel, as a function; the parameters of a fresh model split as the job splits them."""
    sc, step = setup.set_up(config, kind, make_mesh({"data": -1}), base_cfg)
    model = Decoder(sc.layout.cfg, rngs=nnx.Rngs(0))
    params, frozen = upcycle.split_full(sc.layout, checkpoint.flatten(nnx.state(model)))
    params = {n: v.astype(sc.trainable_shapes[n].dtype) for n, v in params.items()}
    frozen = {n: v.astype(sc.frozen_shapes[n].dtype) for n, v in frozen.items()}
    opt = sc.optimizer.init(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, sc.batch_shape), jnp.int32)
    state = [params, opt]

    def run():
        state[0], state[1], metrics = step(state[0], state[1], frozen, tokens, jnp.int32(0))
        jax.block_until_ready(metrics)

    return run


def our_step_time(config, repeats: int) -> float:
    """The trainer's pretraining step."""
    return best_of(step_runner(config), repeats)


def branch_vs_full(config, repeats: int) -> tuple[float, float, ModelConfig]:
    """(coordinated branch step, full-training step, the model both run): best of `repeats`
    rounds, each running both once. The base is config.model; the model one expert more."""
    base_cfg = ModelConfig.from_config(config.model)
    runs = {"branch": step_runner(config, "branch", base_cfg)}
    full = config.copy_and_resolve_references()
    cfg = upcycle.branch_config(base_cfg, int(config.branch.train_top_k))
    full.model.n_experts, full.model.top_k, full.model.router_bias = (
        cfg.n_experts, cfg.top_k, True)
    runs["full"] = step_runner(full)
    best = {}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best["branch"], best["full"], cfg


def hf_runner(cfg: ModelConfig, batch: int, seq_len: int, adamw: bool = False):
    """transformers' FlexOlmoForCausalLM forward+backward on the same shapes as a function
    (with `adamw`: then clip 1.0 and torch.optim.AdamW), or None without the `hf` extra."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import torch
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

    torch.manual_seed(0)
    hf = FlexOlmoConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=seq_len,
        num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=False,
        rms_norm_eps=cfg.norm_eps, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    model = FlexOlmoForCausalLM(hf)
    tokens = torch.randint(0, 256, (batch, seq_len + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        if adamw:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    return run


def hf_step_time(cfg: ModelConfig, batch: int, seq_len: int, repeats: int) -> float | None:
    run = hf_runner(cfg, batch, seq_len)
    return None if run is None else best_of(run, repeats)


def parts(config, cfg: ModelConfig, batch: int, seq_len: int, repeats: int) -> None:
    """The component table of bench/train_parts.py, then the whole steps."""
    run = step_runner(config)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(
        nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))))
    steps = {"whole step (ours: AdamW; torch: none)": (run, hf_runner(cfg, batch, seq_len)),
             "whole step (both AdamW + clip)": (run, hf_runner(cfg, batch, seq_len, True))}
    train_parts.component_table(cfg, batch, seq_len, n_params, steps, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--batch", type=int, default=0, help="default: the config's")
    parser.add_argument("--seq-len", type=int, default=0, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experts", type=int, default=0, help="default: the config's")
    parser.add_argument("--top-k", type=int, default=0, help="default: the config's")
    parser.add_argument("--unroll", action="store_true", help="model.scan_layers=False")
    parser.add_argument("--system-malloc", action="store_true",
                        help="glibc's default allocator settings (see host_memory)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--data-steps", type=int, default=20, help="data-wait loop steps")
    parser.add_argument("--one-thread", action="store_true",
                        help="XLA and torch on one thread each (set before JAX starts)")
    parser.add_argument("--parts", action="store_true",
                        help="the step's components against torch's (bench/train_parts.py)")
    parser.add_argument("--branch", action="store_true",
                        help="a coordinated branch's step against full training instead")
    args = parser.parse_args()

    if args.one_thread:  # read when the CPU backend starts, at the first computation
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false")
        if importlib.util.find_spec("torch") is not None:
            import torch
            torch.set_num_threads(1)
    if not args.system_malloc:
        host_memory.keep_freed_memory()  # before the first JAX computation
    rate = dot_rate()
    print(f"jnp.dot float32 2048^3: {rate / 1e9:.1f} GFLOP/s ({jax.devices()[0].platform}, "
          f"{jax.device_count()} device(s))")
    for name in args.configs.split(","):
        config = CONFIGS[name].get_config()
        config.model.n_experts = args.experts or (1 if args.branch else config.model.n_experts)
        config.model.top_k = args.top_k or min(config.model.top_k, config.model.n_experts)
        config.model.scan_layers = not args.unroll
        config.data.global_batch = args.batch or int(config.data.global_batch)
        config.data.seq_len = args.seq_len or int(config.data.seq_len)
        cfg = ModelConfig.from_config(config.model)
        batch, seq_len = int(config.data.global_batch), int(config.data.seq_len)
        if args.branch:
            branch, full, cfg = branch_vs_full(config, args.repeats)
            print(f"{name:5s} B={batch} T={seq_len} E={cfg.n_experts} k={cfg.top_k}: "
                  f"coordinated branch step {branch * 1e3:8.1f} ms, full training "
                  f"{full * 1e3:8.1f} ms: {branch / full:.2f}x", flush=True)
            continue
        if args.parts:
            parts(config, cfg, batch, seq_len, args.repeats)
            continue
        ours = our_step_time(config, args.repeats)
        tokens = batch * seq_len
        achieved = flops_per_token(cfg, seq_len) * tokens / ours
        line = (f"{name:5s} B={batch} T={seq_len} E={cfg.n_experts} k={cfg.top_k}: "
                f"{ours * 1e3:8.1f} ms/step  {tokens / ours:9,.0f} tokens/s  "
                f"MFU vs jnp.dot {achieved / rate:.3f}")
        hf = None if args.no_hf else hf_step_time(cfg, batch, seq_len, args.repeats)
        if hf is not None:
            line += f"  step time vs HF FlexOlmo fwd+bwd {ours / hf:.2f}x ({hf * 1e3:.1f} ms)"
        print(line, flush=True)
        if args.data_steps:
            share, _ = data_wait(config, smoke_data_dir(), "public", args.data_steps,
                                 int(config.data.prefetch))
            print(f"      data wait {share:.1%} of the step ({config.data.prefetch} threads "
                  f"reading ahead, {args.data_steps} steps)", flush=True)


if __name__ == "__main__":
    main()
