"""The public expert's router statistics, computed from public data under the base model
(`moesaic merge --public-data DIR`): the same sums a party computes on its own data
(moesaic.routing.stats), saved in the branch artifact's stats/ layout so the merge reads
them like a party's."""

from __future__ import annotations

import pathlib
import tempfile

from moesaic.model import checkpoint
from moesaic.model.sharding import make_mesh


def compute_public_stats(base_path: str | pathlib.Path, data_dir: str | pathlib.Path, *,
                         source: str = "public", seq_len: int = 128, max_sequences: int = 64,
                         batch_rows: int = 8, workdir: str | None = None,
                         router_input: str = "token") -> pathlib.Path:
    """Writes stats/{x_sum,xtx,mean_hidden} of `source` under the base model to a new
    temporary checkpoint (under `workdir` if given) and returns its path; the caller removes
    it when the merge has copied it. `router_input` is the branches' model.router_input:
    the sums are of what their routers score."""
    from moesaic.routing import stats

    base_meta = checkpoint.read_meta(base_path)
    cfg = checkpoint.model_config(base_meta).replace(router_input=router_input)
    model, _ = checkpoint.load(base_path, cfg=cfg)
    sequences, n_docs = stats.stats_sequences(data_dir, source, seq_len=seq_len,
                                              max_sequences=max_sequences,
                                              batch_rows=batch_rows)
    rows = min(batch_rows, len(sequences))
    collected = stats.collect(model, sequences, n_docs, batch_rows=rows, mesh=make_mesh())
    out = pathlib.Path(tempfile.mkdtemp(prefix="public_stats_", dir=workdir)) / "stats"
    checkpoint.save(out, collected.tensors(), {"kind": "router_stats", "source": source,
                                       "router_input": router_input,
                                       "base_fingerprint": base_meta["fingerprint"],
                                       "stats_tokens": collected.n_tokens,
                                       "stats_documents": collected.n_documents})
    return out
