"""The party gate: which party's text is this? A naive-Bayes posterior over the parties, from
the token bigrams of the prefix, that splits each token's router weight among the parties.

A merged model whose parties were each trained against the public expert alone (FlexOlmo) has
rows that are not calibrated against each other: a row learned to beat the public row on its own
data also beats it, and the other parties' rows, on text it never saw. The gate is what each row
lacks. With each party's bigram model q_p (its counts: `moesaic.routing.ngram`), position t of a
row scores

    z_p(t) = bias_p + sum_{s <= t} log q_p(x_s | x_{s-1}) / temperature       (x_{-1} = eos)
    g(t)   = softmax_p z_p(t)

and the router mixes, with weights g, what each party's model alone (the base experts and that
party, as `merge` of that one branch makes it) would give:

    weight(base expert e) = sum_p g_p softmax_{base + p}(logits)_e
    weight(party p)       = g_p softmax_{base + p}(logits)_p

then top-k as usual. With g one-hot on party p the model computes exactly the merge of p alone;
the gate is causal (position t sees tokens up to t), so the model stays a language model.

Tables: gate_bigram (buckets, P) holds log(count(a, b) + alpha) / temperature at bucket(a, b),
gate_context (V, P) holds log(count(a) + alpha V) / temperature, so log q_p(b | a) / temperature
is one gather from each; gate_bias (P,) is each party's log prior (0: all alike). A vocabulary
whose V^2 exceeds `MAX_BUCKETS` shares buckets (a multiplicative hash, the same here and in the
counts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAX_BUCKETS = 1 << 20  # bigram buckets at most: exact pairs for V <= 1024


def buckets_for(vocab_size: int) -> int:
    return min(vocab_size * vocab_size, MAX_BUCKETS)


def bucket(prev, cur, vocab_size: int, buckets: int, xp=jnp):
    """Bucket of each pair (prev, cur): prev * V + cur, in uint32 arithmetic (wrapping, then
    modulo `buckets`); the pair itself when V^2 <= buckets. `xp`: jnp or np, the same values."""
    u32 = xp.uint32
    index = prev.astype(u32) * u32(vocab_size) + cur.astype(u32)
    if vocab_size * vocab_size > buckets:  # a hash: mix the high bits in before the modulo
        index = (index ^ (index >> u32(16))) * u32(0x45D9F3B)
    return (index % u32(buckets)).astype(xp.int32)


def previous_tokens(tokens_bt: jax.Array, eos_id: int, first_b: jax.Array | None = None,
                    valid_bt: jax.Array | None = None) -> jax.Array:
    """The token before each position: the last valid one before it in its row, else `first_b`
    (default eos: a row starts a document)."""
    b, t = tokens_bt.shape
    first = jnp.full((b,), eos_id, tokens_bt.dtype) if first_b is None else first_b
    if valid_bt is None:
        return jnp.concatenate([first[:, None], tokens_bt[:, :-1]], axis=1)
    index = jnp.where(valid_bt, jnp.arange(t)[None, :], -1)
    last = jax.lax.cummax(index, axis=1)  # the last valid position at or before t
    before = jnp.concatenate([jnp.full((b, 1), -1, last.dtype), last[:, :-1]], axis=1)
    taken = jnp.take_along_axis(tokens_bt, jnp.maximum(before, 0), axis=1)
    return jnp.where(before >= 0, taken, first[:, None])


def log_likelihoods(bigram_hp: jax.Array, context_vp: jax.Array, tokens_bt: jax.Array,
                    prev_bt: jax.Array, vocab_size: int) -> jax.Array:
    """(B, T, P) float32: log q_p(token | previous) / temperature of every position."""
    h = bucket(prev_bt, tokens_bt, vocab_size, bigram_hp.shape[0])
    return (bigram_hp.astype(jnp.float32)[h]
            - context_vp.astype(jnp.float32)[jnp.clip(prev_bt, 0, vocab_size - 1)])


def scores(bigram_hp: jax.Array, context_vp: jax.Array, tokens_bt: jax.Array, eos_id: int, *,
           first_b: jax.Array | None = None, valid_bt: jax.Array | None = None,
           start_bp: jax.Array | None = None) -> jax.Array:
    """(B, T, P) float32: each party's running log-likelihood / temperature at every position,
    over the valid tokens (all without `valid_bt`), from `start_bp` (0: a row's first token,
    which follows `first_b`, default eos). Decoding passes what its cache kept."""
    tokens_bt = jnp.asarray(tokens_bt)
    prev = previous_tokens(tokens_bt, eos_id, first_b, valid_bt)
    ll = log_likelihoods(bigram_hp, context_vp, tokens_bt, prev, context_vp.shape[0])
    if valid_bt is not None:
        ll = jnp.where(valid_bt[..., None], ll, 0.0)
    z = jnp.cumsum(ll, axis=1)
    return z if start_bp is None else z + start_bp[:, None, :]


def probs(scores_btp: jax.Array, bias_p: jax.Array) -> jax.Array:
    """(B, T, P) the gate: a softmax over the parties of their scores and log priors."""
    return jax.nn.softmax(scores_btp + bias_p.astype(jnp.float32), axis=-1)


def mix(logits_te: jax.Array, gate_tp: jax.Array) -> jax.Array:
    """(T, E) router weights: each party's model alone (softmax over the base experts and that
    party), mixed by the gate (module docstring). Rows sum to 1."""
    n_parties = gate_tp.shape[-1]
    base, party = logits_te[:, :-n_parties], logits_te[:, -n_parties:]
    base_lse = jax.nn.logsumexp(base, axis=-1, keepdims=True)
    lse = jnp.logaddexp(base_lse, party)  # (T, P): each party's softmax normaliser
    w_party = gate_tp * jnp.exp(party - lse)
    w_base = jnp.exp(base) * jnp.sum(gate_tp * jnp.exp(-lse), axis=-1, keepdims=True)
    return jnp.concatenate([w_base, w_party], axis=-1)


def tables(bigrams: list[np.ndarray], contexts: list[np.ndarray], *, temperature: float,
           alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(gate_bigram (buckets, P), gate_context (V, P)) float32 from each party's counts
    (`moesaic.routing.ngram`), add-`alpha` smoothed."""
    big = np.stack([np.asarray(c, np.float64) for c in bigrams], axis=-1)
    ctx = np.stack([np.asarray(c, np.float64) for c in contexts], axis=-1)
    vocab = ctx.shape[0]
    return ((np.log(big + alpha) / temperature).astype(np.float32),
            (np.log(ctx + alpha * vocab) / temperature).astype(np.float32))
