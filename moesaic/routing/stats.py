"""Router statistics a party computes locally from its own data under the base model.

Per layer, over the router inputs x (the residual stream entering each FFN) of the party's
tokens: x_sum = X^T 1 (L, D), xtx = X^T X (L, D, D), mean_hidden = x_sum / n_tokens, plus
the token and document counts. These are the sufficient statistics of a ridge router
(DUME), the centroid of a nearest-centroid router, and FlexOlmo's hidden-state init of a
router row. Aggregates only: no text and no per-document values leave the party.

Documents are read in stored order, joined by eos and cut into whole sequences (no
padding, so every counted position is a real token of the party's data); the sequences used
are spread evenly over the training split.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moesaic.model.names import STAT_NAMES, stat_name
from moesaic.model.sharding import Rules, activate, logical_to_spec
from moesaic.model.transformer import Decoder


@dataclasses.dataclass(frozen=True)
class RouterStats:
    x_sum: np.ndarray  # (L, D) float64
    xtx: np.ndarray  # (L, D, D) float64
    n_tokens: int
    n_documents: int
    ngram: dict[str, np.ndarray] | None = None  # token-bigram counts (moesaic.routing.ngram)

    @property
    def mean_hidden(self) -> np.ndarray:
        """(L, D) mean router input."""
        return self.x_sum / max(self.n_tokens, 1)

    def tensors(self) -> dict[str, np.ndarray]:
        """The artifact's stats/* tensors (and ngram/* with counts), float32."""
        out = {stat_name(stat): getattr(self, stat).astype(np.float32) for stat in STAT_NAMES}
        if self.ngram is not None:
            from moesaic.routing import ngram

            out.update(ngram.tensors(self.ngram))
        return out


def stats_sequences(data_dir: str | os.PathLike, source: str, *, seq_len: int,
                    max_sequences: int, batch_rows: int = 1) -> tuple[np.ndarray, int]:
    """(int32 (N, seq_len) sequences, documents that contributed a position): the training
    split's packed rows, N <= max_sequences of them evenly spaced over the split
    (`moesaic.data.loader.packed_rows`), so the statistics describe the party's whole data,
    not its first few documents. N is a multiple of `batch_rows` (what `collect` uses), so
    the document count is of the rows the statistics are summed over."""
    from moesaic.data.loader import packed_rows

    try:
        tokens, _, n_docs = packed_rows(data_dir, source, "train", width=seq_len,
                                        max_rows=max_sequences)
        whole = len(tokens) // batch_rows * batch_rows
        if 0 < whole < len(tokens):  # a short split: only whole batches are summed
            tokens, _, n_docs = packed_rows(data_dir, source, "train", width=seq_len,
                                            max_rows=whole)
    except ValueError as err:
        raise ValueError(f"{err} (in {str(data_dir)!r}), too few for its router "
                         "statistics") from None
    return tokens, n_docs


def collect(model: Decoder, sequences: np.ndarray, n_documents: int, *, batch_rows: int,
            mesh: Mesh, rules: Rules = ()) -> RouterStats:
    """Runs `model` with `collect_stats=True` over `sequences` (the same array on every
    process) in batches of `batch_rows` global rows, sharded over the mesh's batch axes, and
    sums in float64 on the host. A tail shorter than `batch_rows` is left out."""
    n_rows = (len(sequences) // batch_rows) * batch_rows
    if n_rows == 0:
        raise ValueError(f"router statistics need at least {batch_rows} sequences (one global "
                         f"batch), got {len(sequences)}")
    batch_sharding = stats_batch_sharding(mesh, rules, (batch_rows, sequences.shape[1]))
    procs, me = jax.process_count(), jax.process_index()
    if batch_rows % procs:
        raise ValueError(f"batch of {batch_rows} rows does not split over {procs} processes")
    local = batch_rows // procs

    graphdef, state = nnx.split(model)
    sums = stats_program(graphdef, mesh, rules)
    x_sum = xtx = None
    for start in range(0, n_rows, batch_rows):
        rows = sequences[start + me * local: start + (me + 1) * local]
        tokens = jax.make_array_from_process_local_data(
            batch_sharding, rows, (batch_rows, sequences.shape[1]))
        s, q = (np.asarray(a.addressable_data(0), np.float64) for a in sums(state, tokens))
        x_sum = s if x_sum is None else x_sum + s
        xtx = q if xtx is None else xtx + q
    return RouterStats(x_sum, xtx, n_rows * sequences.shape[1], n_documents)


def stats_batch_sharding(mesh: Mesh, rules: Rules, shape: tuple[int, int]) -> NamedSharding:
    """The sharding of one batch of token rows `collect` runs."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh, shape))


def stats_program(graphdef, mesh: Mesh, rules: Rules = ()):
    """jit(sums)(state, tokens) -> (x_sum (L, D), xtx (L, D, D)), replicated: the program
    `collect` runs per batch on a model of `graphdef` (and `moesaic plan` compiles to count
    a job's start)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    @jax.jit
    def sums(state, tokens):
        with activate(mesh, rules):
            _, aux = nnx.merge(graphdef, state)(tokens, collect_stats=True)
        out = (aux["x_sum"], aux["xtx"])
        return jax.lax.with_sharding_constraint(out, replicated)

    return sums


def unit_rows(vectors_ld: np.ndarray) -> jax.Array:
    """Each layer's vector scaled to unit L2 norm (a zero vector stays zero)."""
    v = jnp.asarray(vectors_ld, jnp.float32)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
