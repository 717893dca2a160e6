"""Low-rank parties in a merge: a one-hot router gives the party's adapted model, opting out
and joining are exact (also beside FFN parties), and bad inputs are named."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moesaic.branch_train import artifact
from moesaic.interop.hf_export import export_hf
from moesaic.merge import fuse
from moesaic.model import checkpoint, lora, moe, names
from moesaic.model.params import build_model
from tests.support.merging import assert_same, expect_refusal, synthetic_stats

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def make_lora_branch(base_path, path, source, seed, *, rank=4, targets=TARGETS, tamper=None):
    """A low-rank branch artifact as `moesaic branch --config.branch.mode=lora` writes it."""
    meta = checkpoint.read_meta(base_path)
    cfg = checkpoint.model_config(meta)
    base = checkpoint.load_tensors(base_path, checkpoint.tensor_metadata(base_path))
    branch_cfg = cfg.replace(n_experts=cfg.n_experts + 1, top_k=cfg.n_experts + 1,
                             lora_experts=1, lora_rank=rank, lora_targets=targets)
    rng = np.random.default_rng(seed)
    own = {n: (0.2 * rng.standard_normal(s)).astype(np.float32)
           for n, s in lora.shapes(branch_cfg).items()}
    lyr, d = cfg.n_layers, cfg.d_model
    own[names.ROUTER] = (0.1 * rng.standard_normal((lyr, 1, d))).astype(np.float32)
    own[names.BIAS] = (-np.abs(0.1 * rng.standard_normal((lyr, 1)))).astype(np.float32)
    hashes = {n: checkpoint.tensor_hash(v) for n, v in base.items()}
    hashes[names.ROUTER] = checkpoint.tensor_hash(np.zeros((lyr, 1, d), np.float32))
    hashes[names.BIAS] = checkpoint.tensor_hash(np.zeros((lyr, 1), np.float32))
    stats, n_tokens = synthetic_stats(cfg, seed + 1000)
    branch_meta = {"source": source, "base_fingerprint": meta["fingerprint"],
                   "frozen_hashes": hashes, "base_experts": 1, "model": branch_cfg.to_dict(),
                   "config": {}, "tokens_seen": 1000, "stats_tokens": n_tokens,
                   "stats_documents": 4, "steps": 3}
    if tamper:
        tamper(own, branch_meta)
    artifact.save(path, own, stats, branch_meta)
    return path


@pytest.fixture(scope="module")
def low(world):
    root = world["root"]
    return {s: make_lora_branch(world["base"], root / f"lora_{s}", s, seed)
            for seed, s in enumerate(["prose", "law2"], start=7)}


def _merge(world, branches, out, router="learned-rows", top_k=2):
    return fuse.merge_paths(world["base"], branches, router=router, top_k=top_k, out=out,
                            log=lambda s: None)


def test_one_hot_router_gives_the_partys_adapted_model(world, low, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    meta = _merge(world, [low["prose"], world["branches"]["code"], low["law2"]], out)
    cfg = checkpoint.model_config(meta)
    assert (cfg.n_experts, cfg.lora_experts) == (4, 2)
    assert [e["source"] for e in meta["experts"]] == ["public", "code", "prose", "law2"]
    with pytest.raises(ValueError, match="2 low-rank experts"):
        export_hf(out, tmp_path / "hf")  # FlexOlmoForCausalLM holds FFN experts only
    assert not (tmp_path / "hf").exists()
    merged = checkpoint.load_tensors(out, checkpoint.tensor_metadata(out))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 60, (2, 12)))
    base = checkpoint.load_tensors(world["base"], checkpoint.tensor_metadata(world["base"]))
    for slot, source in ((2, "prose"), (3, "law2")):
        party = checkpoint.load_tensors(low[source], checkpoint.tensor_metadata(low[source]))
        branch_cfg = checkpoint.model_config(checkpoint.read_meta(low[source]))
        expected = lora.adapted(branch_cfg, {**base, **party}, 0)
        want, _ = build_model(lora.dense_config(branch_cfg), expected)(tokens)

        original = moe.route

        def one_hot(x_td, router_ed, bias_e, top_k, norm, gate_tp=None, *, slot=slot,
                    original=original):
            r = original(x_td, router_ed, bias_e, top_k, norm, gate_tp)
            t = x_td.shape[0]
            return moe.Routing(jnp.zeros((t, top_k)).at[:, 0].set(1.0),
                               jnp.full((t, top_k), slot, jnp.int32), r.probs_te, r.logits_te)

        monkeypatch.setattr(moe, "route", one_hot)
        got, _ = build_model(cfg, merged)(tokens)
        monkeypatch.setattr(moe, "route", original)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["learned-rows", "arrow"])
def test_remove_and_add_are_exact_beside_ffn_parties(world, low, tmp_path, router):
    code, math_ = world["branches"]["code"], world["branches"]["math"]
    full = tmp_path / "full"
    _merge(world, [code, low["prose"], math_, low["law2"]], full, router)
    removed = tmp_path / "removed"
    fuse.remove(full, "prose", out=removed, log=lambda s: None)
    never = tmp_path / "never"
    _merge(world, [code, math_, low["law2"]], never, router)
    assert_same(removed, never)
    added = tmp_path / "added"
    fuse.add(never, [low["prose"]], out=added, log=lambda s: None)
    at_once = tmp_path / "at_once"
    _merge(world, [code, math_, low["law2"], low["prose"]], at_once, router)
    assert_same(added, at_once)
    last = tmp_path / "no_low_rank"
    fuse.remove(never, "law2", out=last, log=lambda s: None)
    ffn_only = tmp_path / "ffn_only"
    _merge(world, [code, math_], ffn_only, router)
    assert_same(last, ffn_only)  # the last low-rank party out: no low-rank tensors left


def test_low_rank_inputs_that_do_not_fit_are_named(world, low, tmp_path):
    other = make_lora_branch(world["base"], tmp_path / "r2", "r2", 3, rank=2)
    expect_refusal(world, tmp_path, [low["prose"], other], "differ from branch 'prose'")

    def shape(own, meta):
        own[lora.tensor_name("q", "b")] = own[lora.tensor_name("q", "b")][..., :16]
    bad = make_lora_branch(world["base"], tmp_path / "bad", "bad", 4, tamper=shape)
    expect_refusal(world, tmp_path, [bad], "blocks/lora/q_b")


def test_arrow_rows_are_the_top_singular_vectors_of_the_updates(world, low, tmp_path):
    out = tmp_path / "arrow"
    code = world["branches"]["code"]
    _merge(world, [low["prose"], code, low["law2"]], out, router="arrow")
    rows = checkpoint.load_tensors(out, [names.ROUTER])[names.ROUTER]
    base = checkpoint.load_tensors(world["base"], [names.W_GATE, names.W_UP])
    np.testing.assert_array_equal(rows[:, 0], 0)  # the public expert
    for slot, path in ((1, code), (2, low["prose"]), (3, low["law2"])):
        own = checkpoint.load_tensors(path, checkpoint.tensor_metadata(path))
        for layer in range(rows.shape[0]):
            if lora.tensor_name("gate", "a") in own:  # s = 1 (alpha 0)
                blocks = [own[lora.tensor_name(t, "a")][layer, 0] @ own[lora.tensor_name(t, "b")]
                          [layer, 0] for t in ("gate", "up")]
            else:
                blocks = [own[n][layer, 0] - base[n][layer, 0] for n in (names.W_GATE, names.W_UP)]
            u = np.linalg.svd(np.hstack(blocks).astype(np.float64))[0][:, 0]
            u = u if u @ own["stats/mean_hidden"][layer] >= 0 else -u
            np.testing.assert_allclose(rows[layer, slot], u, atol=1e-5)


def test_low_rank_conversion_of_ffn_experts(world, tmp_path):
    """FlexMoRE: at full rank the converted merge computes the FFN merge; at rank 2 each
    update is the truncated SVD of the expert's difference from the public FFN; opting out
    stays exact; a rank above a projection's is named."""
    code, math_ = world["branches"]["code"], world["branches"]["math"]
    ffn, full, low2 = tmp_path / "ffn", tmp_path / "full", tmp_path / "low2"
    fuse.merge_paths(world["base"], [code, math_], router="learned-rows", top_k=2, out=ffn,
                     log=lambda s: None)
    fuse.merge_paths(world["base"], [code, math_], router="learned-rows", top_k=2, out=full,
                     log=lambda s: None, low_rank_to=32)  # d_model 32 < d_ff 48
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 60, (2, 12)))
    logits = [build_model(checkpoint.model_config(checkpoint.read_meta(p)),
                          checkpoint.load_tensors(p, checkpoint.tensor_metadata(p)))(tokens)[0]
              for p in (ffn, full)]
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(logits[0]), atol=1e-4)

    meta = fuse.merge_paths(world["base"], [code, math_], router="learned-rows", top_k=2,
                            out=low2, log=lambda s: None, low_rank_to=2)
    assert checkpoint.model_config(meta).lora_experts == 2
    merged = checkpoint.load_tensors(low2, checkpoint.tensor_metadata(low2))
    base = checkpoint.load_tensors(world["base"], [names.W_UP])[names.W_UP]
    own = checkpoint.load_tensors(math_, [names.W_UP])[names.W_UP]
    u, s, vt = np.linalg.svd((own[1, 0] - base[1, 0]).astype(np.float64))
    best = (u[:, :2] * s[:2]) @ vt[:2]
    got = merged[lora.tensor_name("up", "a")][1, 1] @ merged[lora.tensor_name("up", "b")][1, 1]
    np.testing.assert_allclose(got, best, atol=1e-5)

    removed, never = tmp_path / "removed", tmp_path / "never"
    fuse.remove(low2, "code", out=removed, log=lambda s: None)
    fuse.merge_paths(world["base"], [math_], router="learned-rows", top_k=2, out=never,
                     log=lambda s: None, low_rank_to=2)
    assert_same(removed, never)
    expect_refusal(world, tmp_path, [code], "blocks/ffn/w_gate", low_rank_to=33)


def test_arrow_with_public_stats_puts_the_boundary_between_the_means(world, low, tmp_path):
    out = tmp_path / "arrow_public"
    fuse.merge_paths(world["base"], [low["prose"]], router="arrow", top_k=2, out=out,
                     public_stats=world["public"], log=lambda s: None)
    got = checkpoint.load_tensors(out, [names.ROUTER, names.BIAS])
    own = checkpoint.load_tensors(low["prose"], ["stats/mean_hidden"])["stats/mean_hidden"]
    public = checkpoint.load_tensors(world["public"], ["stats/mean_hidden"])["stats/mean_hidden"]
    for layer in range(own.shape[0]):
        v = got[names.ROUTER][layer, 1]
        assert v @ (own[layer] - public[layer]) >= 0
        np.testing.assert_allclose(got[names.BIAS][layer, 1],
                                   min(0.0, -v @ (own[layer] + public[layer]) / 2), rtol=1e-5)
