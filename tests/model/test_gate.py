"""The party gate (moesaic.model.gate) and the bigram counts it is built from
(moesaic.routing.ngram)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moesaic.model import gate
from moesaic.routing import ngram


def test_buckets_are_the_pairs_for_a_small_vocabulary_and_a_hash_the_same_everywhere():
    prev, cur = np.array([0, 3, 263, 5]), np.array([1, 263, 0, 5])
    np.testing.assert_array_equal(gate.bucket(prev, cur, 264, 264 * 264, xp=np),
                                  prev * 264 + cur)
    rng = np.random.default_rng(0)
    prev, cur = rng.integers(0, 50_000, 1000), rng.integers(0, 50_000, 1000)
    buckets = gate.buckets_for(50_000)
    assert buckets == gate.MAX_BUCKETS
    on_host = gate.bucket(prev, cur, 50_000, buckets, xp=np)
    np.testing.assert_array_equal(on_host, np.asarray(gate.bucket(jnp.asarray(prev),
                                                                  jnp.asarray(cur), 50_000,
                                                                  buckets)))
    assert on_host.min() >= 0 and on_host.max() < buckets and len(set(on_host)) > 990


def test_counts_of_rows():
    counts = ngram.count(np.array([[1, 2, 1], [2, 2, 0]]), vocab_size=4, eos_id=3)
    pairs = counts["bigram"].reshape(4, 4)
    assert pairs[3, 1] == 1 and pairs[3, 2] == 1  # each row starts after eos
    assert pairs[1, 2] == 1 and pairs[2, 1] == 1 and pairs[2, 2] == 1 and pairs[2, 0] == 1
    assert pairs.sum() == 6
    np.testing.assert_array_equal(counts["context"], [0, 1, 3, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ngram.count(np.array([[4]]), vocab_size=4, eos_id=3)


def test_mix_is_each_party_alone_weighted_by_the_gate():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 2, (5, 4)))  # one base expert, three parties
    g = jax.nn.softmax(jnp.asarray(rng.normal(0, 1, (5, 3))), axis=-1)
    w = np.asarray(gate.mix(logits, g))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    want = np.zeros((5, 4))
    for p in range(3):
        alone = np.asarray(jax.nn.softmax(logits[:, [0, 1 + p]], axis=-1))
        want[:, 0] += np.asarray(g[:, p]) * alone[:, 0]
        want[:, 1 + p] += np.asarray(g[:, p]) * alone[:, 1]
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7)


def test_the_gate_is_causal_and_favours_the_party_whose_counts_fit():
    v = 8
    rows_a = np.tile([1, 2, 3], 20)[None]  # party a: 1 2 3 1 2 3 ...
    rows_b = np.tile([4, 5], 30)[None]
    counts = [ngram.count(r, vocab_size=v, eos_id=0) for r in (rows_a, rows_b)]
    big, ctx = gate.tables([c["bigram"] for c in counts], [c["context"] for c in counts],
                           temperature=1.0)
    tokens = jnp.asarray([[1, 2, 3, 1, 4, 5, 4, 5, 4, 5]])
    def gated(t):
        return np.asarray(gate.probs(gate.scores(jnp.asarray(big), jnp.asarray(ctx), t, 0),
                                     jnp.zeros(2)))

    g = gated(tokens)
    assert g[0, 3, 0] > 0.99 and g[0, -1, 1] > 0.9  # a's text, then b's takes over
    later = tokens.at[0, 6:].set(1)
    g2 = gated(later)
    np.testing.assert_array_equal(g[0, :6], g2[0, :6])  # position t sees tokens up to t
