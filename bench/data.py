"""Loader throughput as a ratio to what a tiny-config training step consumes (aim: >= 10x),
and the share of the trainer's loop spent waiting for data (aim: under 5%).

    .venv/bin/python bench/data.py [--data-dir DIR] [--mixture public] [--steps 200]

Without --data-dir the smoke-size embedded corpora are built into a temporary folder. Both
rates count global_batch * seq_len tokens per batch of the tiny config
(moesaic/configs/tiny.py). The loader reads fresh steps (no batch is read twice); the training
step is a jitted value_and_grad + optax.adamw over nnx.state(model, nnx.Param), timed after
compilation. The data wait runs the trainer's step (`setup.set_up`) on batches from the
loader, read ahead by `data.prefetch` threads (moesaic.data.prefetch) or in the loop, and
reports the time spent in `next()` as a share of the loop's wall time (`data_wait`).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moesaic.branch_train import setup, upcycle
from moesaic.configs import tiny
from moesaic.data import TokenBatches
from moesaic.data.corpora import build_embedded
from moesaic.data.prefetch import ReadAhead
from moesaic.model import Decoder, ModelConfig, checkpoint
from moesaic.model.sharding import make_mesh


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


@functools.cache
def smoke_data_dir() -> str:
    """The smoke-size embedded corpora, built once into a temporary folder of this process."""
    folder = tempfile.mkdtemp(prefix="moesaic-bench-data-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    build_embedded(folder, size="smoke")
    return folder


def data_wait(config, data_dir: str, mixture: str, steps: int, threads: int
              ) -> tuple[float, float]:
    """(share of the loop's wall time spent waiting for batches, seconds per step) of the
    trainer's pretraining step on `steps` batches of `data_dir`, read ahead by `threads`
    threads (0: in the loop), after one compiling step. Like the trainer, the loop reads the
    metrics every config.train.log_every steps and otherwise runs ahead of the device."""
    sc, step = setup.set_up(config, "pretrain", make_mesh({"data": -1}))
    model = Decoder(sc.layout.cfg, rngs=nnx.Rngs(0))
    params, frozen = upcycle.split_full(sc.layout, checkpoint.flatten(nnx.state(model)))
    opt = sc.optimizer.init(params)
    batches = TokenBatches(data_dir, mixture, seq_len=int(config.data.seq_len),
                           global_batch=int(config.data.global_batch), seed=0)
    params, opt, metrics = step(params, opt, frozen, jnp.asarray(batches.get(0)), jnp.int32(0))
    jax.block_until_ready(metrics)  # compiled
    log_every = max(1, int(config.train.log_every))
    with ReadAhead(batches, start=1, stop=steps + 1, threads=threads) as reader:
        start = time.perf_counter()
        for i in range(1, steps + 1):
            batch = jax.make_array_from_process_local_data(sc.batch_sharding, reader.next(),
                                                           sc.batch_shape)
            params, opt, metrics = step(params, opt, frozen, batch, jnp.int32(i))
            if i % log_every == 0:
                jax.device_get(metrics)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
    return reader.waited / elapsed, elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--mixture", default="public")
    parser.add_argument("--steps", type=int, default=200, help="loader steps")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--wait-steps", type=int, default=50, help="data-wait loop steps")
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
        threads = int(config.data.prefetch)
        waits = {n: data_wait(config, data_dir, args.mixture, args.wait_steps, n)
                 for n in (threads, 0)}
    train_rate = train_tokens_per_second(config, sample, args.train_steps)
    print(f"tiny config: seq_len={seq_len} global_batch={batch} mixture={args.mixture!r}")
    print(f"loader, document cache   {warm:12,.0f} tokens/s  ({args.steps} fresh steps)")
    print(f"loader, no cache (cold)  {cold:12,.0f} tokens/s")
    print(f"training step            {train_rate:12,.0f} tokens/s  "
          f"({args.train_steps} steps after compile)")
    print(f"loader / training = {warm / train_rate:.0f}x with the cache, "
          f"{cold / train_rate:.0f}x cold  (aim >= 10x)")
    for n, (share, per_step) in waits.items():
        how = f"read ahead by {n} threads" if n else "read in the loop"
        print(f"data wait, {how:24s} {share:6.1%} of the loop  ({per_step * 1e3:.1f} ms/step, "
              f"{args.wait_steps} steps; aim < 5%)")


if __name__ == "__main__":
    main()
