"""Loader throughput as a ratio to what a tiny-config training step consumes (aim: >= 10x).

    .venv/bin/python bench/data.py [--data-dir DIR] [--mixture public] [--steps 200]

Without --data-dir the smoke-size embedded corpora are built into a temporary folder. Both
rates count global_batch * seq_len tokens per batch of the tiny config
(moesaic/configs/tiny.py). The loader reads fresh steps (no batch is read twice); the training
step is a jitted value_and_grad + optax.adamw over nnx.state(model, nnx.Param), timed after
compilation.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moesaic.configs import tiny
from moesaic.data import TokenBatches
from moesaic.data.corpora import build_embedded
from moesaic.model import Decoder, ModelConfig


def loader_tokens_per_second(data_dir: str, mixture: str, seq_len: int, batch: int,
                             steps: int, cold: bool) -> float:
    """cold: forget decoded documents before every batch (every row decodes its records)."""
    loader = TokenBatches(data_dir, mixture, seq_len=seq_len, global_batch=batch, seed=0)
    loader.get(10_000)  # open files, first epoch tables
    start = time.perf_counter()
    for step in range(steps):
        if cold:
            for stream in loader.streams.values():
                stream.clear_cache()
        loader.get(step)
    return steps * batch * seq_len / (time.perf_counter() - start)


def train_tokens_per_second(config, batch_tokens: np.ndarray, steps: int) -> float:
    model = Decoder(ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(config.train.lr)
    opt_state = tx.init(params)

    def loss_fn(params, rest, tokens):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    @jax.jit
    def step(params, opt_state, rest, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tokens = jnp.asarray(batch_tokens)
    params, opt_state, loss = step(params, opt_state, rest, tokens)  # compile
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, rest, tokens)
    loss.block_until_ready()
    b, t = batch_tokens.shape
    return steps * b * (t - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--mixture", default="public")
    parser.add_argument("--steps", type=int, default=200, help="loader steps")
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args()
    config = tiny.get_config()
    seq_len, batch = config.data.seq_len, config.data.global_batch
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        if not args.data_dir:
            build_embedded(tmp, size="smoke")
        warm, cold = (loader_tokens_per_second(data_dir, args.mixture, seq_len, batch,
                                               args.steps, cold) for cold in (False, True))
        sample = TokenBatches(data_dir, args.mixture, seq_len=seq_len, global_batch=batch,
                              seed=0).get(0)
    train_rate = train_tokens_per_second(config, sample, args.train_steps)
    print(f"tiny config: seq_len={seq_len} global_batch={batch} mixture={args.mixture!r}")
    print(f"loader, document cache   {warm:12,.0f} tokens/s  ({args.steps} fresh steps)")
    print(f"loader, no cache (cold)  {cold:12,.0f} tokens/s")
    print(f"training step            {train_rate:12,.0f} tokens/s  "
          f"({args.train_steps} steps after compile)")
    print(f"loader / training = {warm / train_rate:.0f}x with the cache, "
          f"{cold / train_rate:.0f}x cold  (aim >= 10x)")


if __name__ == "__main__":
    main()
