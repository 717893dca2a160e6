"""Decoding with the key/value cache equals recomputing the whole prefix each step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moesaic.eval.generate import generate
from moesaic.model import ModelConfig
from moesaic.model.transformer import Decoder

KINDS = {
    "dense": dict(n_experts=1, top_k=1),
    "moe": dict(n_experts=4, top_k=2, router_input="token"),
    "prefix_mean": dict(n_experts=3, top_k=1, router_input="prefix_mean"),
    "gated": dict(n_experts=3, top_k=2, router_input="prefix_mean", gate_parties=2,
                  gate_buckets=64),  # a party gate over a hashed bigram table
}


def _model(kind: str) -> Decoder:
    # init_std 0.3 spreads the logits, so greedy picks are no near ties
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      init_std=0.3, eos_id=-1, pad_id=-1, **KINDS[kind])
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    if cfg.gate_parties:  # tables that move the gate (zeros would keep it uniform)
        rng = np.random.default_rng(4)
        model.gate_bigram[...] = jnp.asarray(rng.normal(0, 2, model.gate_bigram.shape))
        model.gate_context[...] = jnp.asarray(rng.normal(0, 1, model.gate_context.shape))
        model.gate_bias[...] = jnp.asarray([0.5, -0.5])
    return model


def _recomputed(model: Decoder, prompt: np.ndarray, n: int, width: int = 16) -> list[int]:
    """Greedy decoding that runs the model's own forward over the whole prefix every step. The
    model is causal, so the prefix is right-padded to one width (one compile) and the logits
    of its last real token read."""
    forward = jax.jit(lambda t, i: model(t)[0][0, i])
    tokens = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(tokens)] = tokens
        tokens.append(int(jnp.argmax(forward(padded, len(tokens) - 1))))
    return tokens[len(prompt):]


def _prompts() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 40, size=n) for n in (5, 2, 9)]  # left-padded to 9


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_with_the_cache_equals_recomputing_the_prefix(kind):
    model = _model(kind)
    prompts = _prompts()
    out = generate(model, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, out.tokens):
        assert got.tolist() == _recomputed(model, prompt, 6)


def test_sampling_with_a_seed_is_deterministic_and_seeds_differ():
    model = _model("prefix_mean")
    prompts = _prompts()  # the shapes compiled above

    def sample(seed):
        out = generate(model, prompts, max_new_tokens=6, temperature=1.5, top_p=0.9, seed=seed)
        return [t.tolist() for t in out.tokens]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = generate(model, prompts, max_new_tokens=6).tokens
    assert [t.tolist() for t in greedy] != sample(7)


def test_generation_stops_at_eos_and_excludes_it():
    model = _model("dense")
    prompts = _prompts()
    free = generate(model, prompts, max_new_tokens=6).tokens
    eos = int(free[0][2])  # the third greedy token of row 0, taken as end of document
    out = generate(model, prompts, max_new_tokens=6, eos_id=eos)
    for row, got, stopped in zip(free, out.tokens, out.stopped_at_eos):
        hits = np.flatnonzero(row == eos)
        assert got.tolist() == row[:hits[0] if hits.size else 6].tolist()
        assert stopped == bool(hits.size)
    assert out.stopped_at_eos[0]


@pytest.mark.parametrize("prompts, n, context, message", [
    ([], 4, None, "no prompts"),
    ([np.array([], np.int32)], 4, None, "prompt 0 is empty"),
    ([np.array([1, 2])], 0, None, "max_new_tokens must be at least 1"),
    ([np.array([1, 2]), np.arange(10)], 4, 12, "prompt 1 has 10 tokens"),
])
def test_bad_requests_are_named(prompts, n, context, message):
    with pytest.raises(ValueError, match=message):
        generate(_model("dense"), prompts, max_new_tokens=n, context=context)
