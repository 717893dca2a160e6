"""Weight-merge baselines over dense branches (whole models, kind "dense_branch"):

- Model soup: every tensor the weighted mean of the branches' tensors. Uniform, or weighted
  by each branch's loss on a sample the caller provides: `softmax` weights
  w_i = exp(-loss_i) / sum_j exp(-loss_j) (a branch 0.7 nats better gets twice the weight),
  or `inverse` weights w_i = (1 / loss_i) / sum_j (1 / loss_j) (gentler).
- BTX-style (Sukhbaatar et al.): each branch's FFN becomes an expert, every other tensor is
  the uniform mean, the router is built by a chosen kind (centroid / ridge need the
  branches' stats/ tensors; random needs nothing; learned-rows and contrast are refused:
  dense branches train no rows, and contrast needs a public expert). No public expert: the
  experts are the branches, so there is no remove/add for it.

Both stream a layer of one tensor at a time, like the merge, and check their inputs the same
way (committed, unique sources, same shapes and dtypes, finite, same base, tensors matching
the recorded fingerprint).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from moesaic.branch_train.artifact import DENSE_KIND
from moesaic.merge import sources as src
from moesaic.merge.sources import MergeRefused, View
from moesaic.merge.verify import check_unique, scan
from moesaic.model import checkpoint, streaming
from moesaic.model.names import BIAS, FFN_EXPERT, ROUTER, STAT_NAMES, STATS, stat_name
from moesaic.model.transformer import lm_loss
from moesaic.routing import registry, report


class DenseBranch:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.meta = src.committed_meta(self.path, f"dense branch {self.path}")
        if "model" not in self.meta:
            raise MergeRefused(f"dense branch {self.path}: not a model checkpoint")
        kind = self.meta.get("kind")
        if kind != DENSE_KIND or not self.meta.get("base_fingerprint"):
            raise MergeRefused(f"dense branch {self.path}: a {kind!r} checkpoint without the "
                               f"base it started from; soup and BTX take {DENSE_KIND!r} "
                               "checkpoints (`moesaic branch --config.branch.mode=dense`), "
                               "which record it")
        self.source = str(self.meta.get("source") or self.path.name)
        self.cfg = checkpoint.model_config(self.meta)
        if self.cfg.n_experts != 1:
            raise MergeRefused(f"dense branch {self.path}: has {self.cfg.n_experts} experts; "
                               f"soup and BTX take dense (E = 1) models")
        self.tensors = {n: View(self.path, n) for n in checkpoint.tensor_metadata(self.path)}


def open_dense(paths) -> list[DenseBranch]:
    branches = [DenseBranch(p) for p in paths]
    if len(branches) < 2:
        raise MergeRefused("soup / btx need at least two dense branches")
    check_unique([b.source for b in branches])
    first = branches[0]
    for b in branches:
        label = f"dense branch {b.source!r} ({b.path})"
        fp, fp0 = b.meta.get("base_fingerprint"), first.meta.get("base_fingerprint")
        if fp != fp0:
            raise MergeRefused(f"{label}: started from another base than {first.source!r}")
        params = {n for n in b.tensors if not n.startswith(STATS)}
        want = {n for n in first.tensors if not n.startswith(STATS)}
        if params != want:
            raise MergeRefused(f"{label}: tensors {sorted(params ^ want)} differ from "
                               f"{first.source!r}'s")
        for name in sorted(params):
            got, ref = b.tensors[name], first.tensors[name]
            if got.shape != ref.shape or got.dtype != ref.dtype:
                raise MergeRefused(f"{label}: tensor {name!r} is {got.dtype}{got.shape}, "
                                   f"{first.source!r} has {ref.dtype}{ref.shape}")
        algorithm = checkpoint.hash_algorithm(b.meta)
        hashes = {name: scan(label, view, algorithm=algorithm)
                  for name, view in sorted(b.tensors.items())}
        if checkpoint.fingerprint_of_hashes(hashes) != b.meta.get("fingerprint"):
            raise MergeRefused(f"{label}: its tensors do not match its recorded fingerprint "
                               f"{str(b.meta.get('fingerprint'))[:12]}...; the checkpoint was "
                               f"modified after it was written")
    return branches


def _mean_source(views: list[View], weights: np.ndarray) -> streaming.TensorSource:
    """The weighted mean of same-shaped tensors, a piece at a time, summed in float64 in
    branch order."""
    first = views[0]

    def pieces():
        streams = [v.pieces() for v in views]
        for parts in zip(*streams):
            total = sum(w * p.astype(np.float64) for w, p in zip(weights, parts))
            yield total.astype(first.dtype)

    return streaming.TensorSource(first.shape, first.dtype, pieces,
                           rows_per_chunk=first.row_block() if first.shape else None)


def soup_weights(losses: list[float], weighting: str) -> np.ndarray:
    loss = np.asarray(losses, np.float64)
    if weighting == "softmax":
        w = np.exp(-(loss - loss.min()))
    elif weighting == "inverse":
        w = 1.0 / loss
    else:
        raise ValueError(f"weighting {weighting!r}: one of softmax, inverse")
    return w / w.sum()


def sample_loss(path: str | pathlib.Path, sample_bt1: np.ndarray, batch_rows: int = 8) -> float:
    """Mean next-token loss of a checkpoint on `sample_bt1` (N, T+1)."""
    model, _ = checkpoint.load(path)
    step = jax.jit(lambda m, b: lm_loss(m, b)[1]["nll"])
    losses, weights = [], []
    for start in range(0, len(sample_bt1), batch_rows):
        batch = sample_bt1[start:start + batch_rows]
        losses.append(float(step(model, batch)))
        weights.append(len(batch))
    return float(np.average(losses, weights=weights))


def soup(branch_paths, out: str | pathlib.Path, *, sample_bt1: np.ndarray | None = None,
         weighting: str = "softmax", log=print) -> dict:
    """Writes the soup of dense branches: uniform without a sample, else loss-weighted."""
    branches = open_dense(branch_paths)
    if sample_bt1 is None:
        losses, weights, how = None, np.full(len(branches), 1 / len(branches)), "uniform"
    else:
        losses = [sample_loss(b.path, sample_bt1) for b in branches]
        weights, how = soup_weights(losses, weighting), weighting
    tensors = {n: _mean_source([b.tensors[n] for b in branches], weights)
               for n in branches[0].tensors if not n.startswith(STATS)}
    meta = {"kind": "soup", "model": branches[0].cfg.to_dict(),
            "sources": [b.source for b in branches], "weights": [float(w) for w in weights],
            "weighting": how, "losses": losses,
            "base_fingerprint": branches[0].meta.get("base_fingerprint"),
            **src.seq_len_record([b.meta for b in branches])}
    streaming.save_streaming(out, tensors, meta)
    log(f"soup ({how}) of {[b.source for b in branches]} weights "
        f"{np.round(weights, 3).tolist()} -> {out}")
    return checkpoint.read_meta(out)


def btx(branch_paths, out: str | pathlib.Path, *, router: str, top_k: int,
        options: dict | None = None, log=print) -> dict:
    """BTX-style MoE: the branches' FFNs as experts, other tensors averaged uniformly."""
    try:
        registry.check_options(router, dict(options or {}))
    except ValueError as err:
        raise MergeRefused(f"btx: {err}") from None
    branches = open_dense(branch_paths)
    n = len(branches)
    if router == "learned-rows":
        raise MergeRefused("btx: dense branches trained no router rows; use centroid, ridge "
                           "or random")
    if router == "contrast":
        raise MergeRefused("btx: contrast scores each party against the public expert, and a "
                           "BTX model has none; use centroid, ridge or random")
    if not 1 <= top_k <= n:
        raise MergeRefused(f"--top-k {top_k}: the BTX model has {n} experts")
    needs_stats = router in ("centroid", "ridge")
    if needs_stats:
        missing = [b.source for b in branches
                   if any(stat_name(s) not in b.tensors for s in STAT_NAMES)]
        if missing:
            raise MergeRefused(f"btx --router {router}: dense branches {missing} carry no "
                               "stats/ tensors (written before dense jobs kept them, or with "
                               "config.branch.stats_batches=0); use --router random")
    cfg = branches[0].cfg
    inputs = registry.RouterInputs(
        n_layers=cfg.n_layers, d_model=cfg.d_model, sources=[b.source for b in branches],
        base_experts=0, base_rows=None, base_bias=None,
        party_rows=lambda i: None, party_bias=lambda i: None,
        party_stat=lambda i, s, layer: branches[i].tensors[stat_name(s)].rows(layer, layer + 1)[0],
        party_tokens=[int(b.meta.get("stats_tokens", 0)) for b in branches],
        public_stat=None, public_tokens=0, options=dict(options or {}))
    try:
        built = registry.get(router)(inputs)
    except ValueError as err:
        raise MergeRefused(f"btx --router {router}: {err}") from None
    reports, warnings = report.routing_report(built.rows, inputs.sources)
    log(report.format_report(reports, inputs.sources))
    for w in warnings:
        log(f"WARNING: {w}")
    uniform = np.full(n, 1 / n)
    tensors = {}
    for name in branches[0].tensors:
        if name.startswith(STATS) or name in FFN_EXPERT:
            continue
        tensors[name] = _mean_source([b.tensors[name] for b in branches], uniform)
    for name in FFN_EXPERT:
        tensors[name] = src.stack_experts([b.tensors[name] for b in branches])
    dtype = branches[0].tensors[FFN_EXPERT[0]].dtype
    tensors[ROUTER] = streaming.TensorSource(built.rows.shape, dtype,
                                             lambda: [built.rows.astype(dtype)])
    tensors[BIAS] = streaming.TensorSource(built.bias.shape, dtype,
                                           lambda: [built.bias.astype(dtype)])
    merged_cfg = cfg.replace(n_experts=n, top_k=top_k, router_bias=True, router_trainable=False)
    meta = {"kind": "btx", "model": merged_cfg.to_dict(),
            "experts": [{"source": b.source, "fingerprint": b.meta.get("fingerprint")}
                        for b in branches],
            "router": {"kind": router, "top_k": top_k, "options": dict(options or {}),
                       "inputs": built.inputs, "trainable": False},
            "base_fingerprint": branches[0].meta.get("base_fingerprint"),
            "routing_warnings": warnings, **src.seq_len_record([b.meta for b in branches])}
    streaming.save_streaming(out, tensors, meta)
    log(f"btx of {inputs.sources} with router {router!r}, top-{top_k} -> {out}")
    return checkpoint.read_meta(out)
