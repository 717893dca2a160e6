"""Synthetic merge inputs: a tiny base and branch artifacts built from it the way the
branch job builds them (own expert = base expert 0 + noise), and the checks the merge tests
share."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from flax import nnx

from moesaic.branch_train import artifact
from moesaic.merge import fuse
from moesaic.merge.sources import MergeRefused
from moesaic.model import Decoder, ModelConfig, checkpoint, names
from moesaic.routing import ngram

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=48,
                  eos_id=62, pad_id=63)


def make_base(path, cfg=CFG, seed=0):
    checkpoint.save_model(path, Decoder(cfg, rngs=nnx.Rngs(seed)), {"kind": "public"})
    return path


def synthetic_stats(cfg, seed, n_tokens=200):
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(cfg.d_model) * 3
    x = centre + rng.standard_normal((cfg.n_layers, n_tokens, cfg.d_model))
    x = x.astype(np.float64)
    x_sum = x.sum(axis=1)
    xtx = np.einsum("ltd,lte->lde", x, x)
    return {"stats/x_sum": x_sum.astype(np.float32), "stats/xtx": xtx.astype(np.float32),
            "stats/mean_hidden": (x_sum / n_tokens).astype(np.float32)}, n_tokens


def synthetic_ngram(cfg, seed):
    """Token-bigram counts (moesaic.routing.ngram) of a made-up party: skewed, its own."""
    rng = np.random.default_rng(seed)
    v = cfg.vocab_size
    pairs = rng.gamma(0.3, 20.0, size=(v, v)).round()
    counts = ngram.count(np.zeros((1, 1), np.int64), vocab_size=v, eos_id=cfg.eos_id)
    if counts["bigram"].shape[0] == v * v:
        counts = {"bigram": pairs.reshape(-1), "context": pairs.sum(axis=1)}
    else:
        counts = {"bigram": rng.gamma(0.3, 20.0, counts["bigram"].shape).round(),
                  "context": pairs.sum(axis=1)}
    return ngram.tensors(counts)


def make_branch(base_path, path, source, seed, *, tamper=None, noise=0.01):
    """A branch artifact as the branch job writes it. `tamper(own, stats, meta, hashes)` may
    change anything before it is saved."""
    meta = checkpoint.read_meta(base_path)
    cfg = checkpoint.model_config(meta)
    base = checkpoint.load_tensors(base_path, checkpoint.tensor_metadata(base_path))
    rng = np.random.default_rng(seed)
    lyr, d, eb = cfg.n_layers, cfg.d_model, cfg.n_experts
    own = {n: (base[n][:, :1] + noise * rng.standard_normal(base[n][:, :1].shape)
               ).astype(base[n].dtype) for n in names.FFN_EXPERT}
    own[names.ROUTER] = (0.1 * rng.standard_normal((lyr, 1, d))).astype(np.float32)
    own[names.BIAS] = (-np.abs(0.1 * rng.standard_normal((lyr, 1)))).astype(np.float32)
    hashes = {n: checkpoint.tensor_hash(v) for n, v in base.items()}
    if eb == 1:
        hashes[names.ROUTER] = checkpoint.tensor_hash(np.zeros((lyr, 1, d), np.float32))
        hashes[names.BIAS] = checkpoint.tensor_hash(np.zeros((lyr, 1), np.float32))
    stats, n_tokens = synthetic_stats(cfg, seed + 1000)
    stats.update(synthetic_ngram(cfg, seed + 2000))
    branch_meta = {"source": source, "base_fingerprint": meta["fingerprint"],
                   "frozen_hashes": hashes, "base_experts": eb,
                   "model": cfg.replace(n_experts=eb + 1, top_k=eb + 1).to_dict(),
                   "config": {}, "tokens_seen": 1000, "stats_tokens": n_tokens,
                   "stats_documents": 4, "steps": 3}
    if tamper:
        tamper(own, stats, branch_meta, hashes)
    artifact.save(path, own, stats, branch_meta)
    return path


def make_world(root: pathlib.Path) -> dict:
    """A base, three branches of it (code, math, law) and public statistics under `root`."""
    base = make_base(root / "base")
    branches = {s: make_branch(base, root / f"b_{s}", s, seed)
                for seed, s in enumerate(["code", "math", "law"], start=1)}
    pub = root / "public_stats"
    stats, n = synthetic_stats(CFG, 99)
    checkpoint.save(pub, stats, {"kind": "router_stats", "stats_tokens": n})
    return {"root": root, "base": base, "branches": branches, "public": pub}


def all_tensors(path):
    return checkpoint.load_tensors(path, checkpoint.tensor_metadata(path))


def expect_refusal(world, tmp_path, branch_paths, match, **kw):
    out = tmp_path / "refused"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MergeRefused, match=match):
        fuse.merge_paths(world["base"], branch_paths, router=kw.pop("router", "learned-rows"),
                         top_k=1, out=out, log=lambda s: None, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not out.exists() and not out.with_name("refused.partial").exists()


def prefix_branch(world, path, source, seed):
    def prefix(own, stats, meta, hashes):
        meta["model"]["router_input"] = "prefix_mean"
    return make_branch(world["base"], path, source, seed, tamper=prefix)


def assert_same(a, b):
    pa, pb = all_tensors(a), all_tensors(b)
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
    assert checkpoint.read_meta(a)["fingerprint"] == checkpoint.read_meta(b)["fingerprint"]


def rewrite(path, out, change):
    """A copy of the checkpoint at `path` with tensors changed and its meta.json as it was
    (recorded fingerprints included): what editing the files in place would give."""
    flat = all_tensors(path)
    change(flat)
    checkpoint.save(out, flat, checkpoint.read_meta(path))
    return out
