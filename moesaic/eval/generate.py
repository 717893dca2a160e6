"""Text generation: batched decoding with a key/value cache (moesaic.model.decode), greedy or
sampled (temperature, nucleus top-p), stopping at end of document.

    out = generate(model, [prompt_ids, ...], max_new_tokens=64, temperature=0.8, top_p=0.95,
                   seed=0, eos_id=model.cfg.eos_id)
    out.tokens[i]     # the new tokens of prompt i, eos excluded
    out.decode_tokens_per_s, out.prefill_tokens_per_s

Prompts are cut into batches of `batch_size` rows, each left-padded to its longest prompt and
prefilled in one call; then one compiled step per new token decodes every row of the batch
until each has produced eos or `max_new_tokens`. A seed makes sampling deterministic: the key
of step i is fold_in(PRNGKey(seed), i), the same whatever the batch holds. Temperature 0 is
greedy (argmax).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from moesaic.model import decode
from moesaic.model.transformer import Decoder


@dataclasses.dataclass
class Generation:
    tokens: list[np.ndarray]  # new tokens per prompt, eos excluded
    stopped_at_eos: list[bool]
    prefill_tokens: int = 0  # real prompt tokens prefilled
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens the decode steps computed (after the prefill's first)
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / max(self.decode_seconds, 1e-9)


def check_request(prompts: Sequence[np.ndarray], max_new_tokens: int,
                  context: int | None) -> None:
    """ValueError naming what is wrong: no prompt, an empty one, no new tokens, or a prompt
    that with its new tokens does not fit the context."""
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if context is not None and len(p) + max_new_tokens > context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new tokens "
                             f"that is {len(p) + max_new_tokens}, more than the context of "
                             f"{context} tokens (the sequence length the model trained on)")


def _pick(logits_bv, key, temperature, top_p):
    """Greedy where temperature == 0, else a sample from the top-p nucleus of
    softmax(logits / temperature)."""
    greedy = jnp.argmax(logits_bv, axis=-1)
    scaled = logits_bv / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass ranked above each token
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the best always stays
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, tokens_bt, valid_bt, cache, key, temperature, top_p):
    model = nnx.merge(graphdef, state)
    logits, cache = decode.forward(model, tokens_bt, valid_bt, cache)
    return _pick(logits[:, -1], key, temperature, top_p), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _step(graphdef, state, tokens_b, cache, key, temperature, top_p):
    model = nnx.merge(graphdef, state)
    ones = jnp.ones((tokens_b.shape[0], 1), bool)
    logits, cache = decode.forward(model, tokens_b[:, None], ones, cache)
    return _pick(logits[:, -1], key, temperature, top_p), cache


def generate(model: Decoder, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, context: int | None = None, batch_size: int = 16,
             pad_id: int = 0, progress: bool = False, desc: str = "generate") -> Generation:
    """New tokens for each prompt (int token arrays); see the module docstring."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    check_request(prompts, max_new_tokens, context)
    graphdef, state = nnx.split(model)
    base_key = jax.random.PRNGKey(seed)
    temp, nucleus = jnp.float32(temperature), jnp.float32(top_p)
    out = Generation(tokens=[None] * len(prompts), stopped_at_eos=[False] * len(prompts))
    bar = tqdm(total=len(prompts) * max_new_tokens, desc=desc, unit="tok", disable=not progress,
               leave=False, dynamic_ncols=True)
    for lo in range(0, len(prompts), batch_size):
        rows = prompts[lo:lo + batch_size]
        width = max(len(p) for p in rows)
        tokens = np.full((len(rows), width), pad_id, np.int32)
        valid = np.zeros((len(rows), width), bool)
        for i, p in enumerate(rows):
            tokens[i, width - len(p):], valid[i, width - len(p):] = p, True
        cache = decode.init_cache(model.cfg, batch=len(rows), size=width + max_new_tokens)
        t0 = time.perf_counter()
        nxt, cache = _prefill(graphdef, state, tokens, valid, cache,
                              jax.random.fold_in(base_key, 0), temp, nucleus)
        new = [np.asarray(nxt)]
        t1 = time.perf_counter()
        out.prefill_tokens += int(valid.sum())
        out.prefill_seconds += t1 - t0
        done = new[0] == eos_id if eos_id is not None else np.zeros(len(rows), bool)
        bar.update(len(rows))
        for step in range(1, max_new_tokens):
            if done.all():
                break
            nxt, cache = _step(graphdef, state, nxt, cache, jax.random.fold_in(base_key, step),
                               temp, nucleus)
            new.append(np.asarray(nxt))
            if eos_id is not None:
                done |= new[-1] == eos_id
            bar.update(len(rows))
        out.decode_seconds += time.perf_counter() - t1
        steps = np.stack(new, axis=1)
        for i in range(len(rows)):
            row = steps[i]
            hit = np.flatnonzero(row == eos_id) if eos_id is not None else np.array([], int)
            end = int(hit[0]) if hit.size else len(row)
            out.tokens[lo + i] = row[:end]
            out.stopped_at_eos[lo + i] = bool(hit.size)
        out.decode_tokens += len(rows) * (len(new) - 1)  # every row computed each step
    bar.close()
    return out
