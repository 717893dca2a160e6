"""The merge: layout and values of the merged model, every refusal, opt-out and join bit for
bit, streaming writes identical to whole writes. Branches are synthetic artifacts built
from a tiny base the way the branch job builds them (own expert = base expert 0 + noise)."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx

from moesaic.branch_train import artifact
from moesaic.merge import fuse, sources
from moesaic.merge.sources import MergeRefused
from moesaic.model import Decoder, ModelConfig, io
from moesaic.routing import registry

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=48,
                  eos_id=62, pad_id=63)


def make_base(path, cfg=CFG, seed=0):
    io.save_model(path, Decoder(cfg, rngs=nnx.Rngs(seed)), {"kind": "public"})
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


def make_branch(base_path, path, source, seed, *, tamper=None, noise=0.01):
    """A branch artifact as the branch job writes it. `tamper(own, stats, meta, hashes)` may
    change anything before it is saved."""
    meta = io.read_meta(base_path)
    cfg = io.model_config(meta)
    base = io.load_tensors(base_path, io.tensor_metadata(base_path))
    rng = np.random.default_rng(seed)
    lyr, d, eb = cfg.n_layers, cfg.d_model, cfg.n_experts
    own = {n: (base[n][:, :1] + noise * rng.standard_normal(base[n][:, :1].shape)
               ).astype(base[n].dtype) for n in sources.FFN_EXPERT}
    own[sources.ROUTER] = (0.1 * rng.standard_normal((lyr, 1, d))).astype(np.float32)
    own[sources.BIAS] = (-np.abs(0.1 * rng.standard_normal((lyr, 1)))).astype(np.float32)
    hashes = {n: io.tensor_hash(v) for n, v in base.items()}
    if eb == 1:
        hashes[sources.ROUTER] = io.tensor_hash(np.zeros((lyr, 1, d), np.float32))
        hashes[sources.BIAS] = io.tensor_hash(np.zeros((lyr, 1), np.float32))
    stats, n_tokens = synthetic_stats(cfg, seed + 1000)
    branch_meta = {"source": source, "base_fingerprint": meta["fingerprint"],
                   "frozen_hashes": hashes, "base_experts": eb,
                   "model": cfg.replace(n_experts=eb + 1, top_k=eb + 1).to_dict(),
                   "config": {}, "tokens_seen": 1000, "stats_tokens": n_tokens,
                   "stats_documents": 4, "steps": 3}
    if tamper:
        tamper(own, stats, branch_meta, hashes)
    artifact.save(path, own, stats, branch_meta)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = make_base(root / "base")
    branches = {s: make_branch(base, root / f"b_{s}", s, seed)
                for seed, s in enumerate(["code", "math", "law"], start=1)}
    pub = root / "public_stats"
    stats, n = synthetic_stats(CFG, 99)
    io.save(pub, stats, {"kind": "router_stats", "stats_tokens": n})
    return {"root": root, "base": base, "branches": branches, "public": pub}


def all_tensors(path):
    return io.load_tensors(path, io.tensor_metadata(path))


def test_merged_layout_values_and_loads(world, tmp_path):
    out = tmp_path / "m"
    b = world["branches"]
    meta = fuse.merge_paths(world["base"], [b["code"], b["math"]], router="learned-rows",
                            top_k=2, out=out, log=lambda s: None)
    assert meta["kind"] == "merged" and meta["model"]["n_experts"] == 3
    assert [e["source"] for e in meta["experts"]] == ["public", "code", "math"]
    assert meta["base_fingerprint"] == io.read_meta(world["base"])["fingerprint"]
    assert meta["router"]["kind"] == "learned-rows" and meta["router"]["top_k"] == 2
    merged, base = all_tensors(out), all_tensors(world["base"])
    code, math = all_tensors(b["code"]), all_tensors(b["math"])
    for name in base:
        if name not in sources.FFN_EXPERT:
            np.testing.assert_array_equal(merged[name], base[name])
    for name in sources.FFN_EXPERT:
        np.testing.assert_array_equal(merged[name][:, :1], base[name])
        np.testing.assert_array_equal(merged[name][:, 1:2], code[name])
        np.testing.assert_array_equal(merged[name][:, 2:3], math[name])
    router = merged[sources.ROUTER]
    np.testing.assert_array_equal(router[:, 0], 0)  # dense base: the zero public row
    np.testing.assert_array_equal(router[:, 1:2], code[sources.ROUTER])
    np.testing.assert_array_equal(merged[sources.BIAS][:, 2:3], math[sources.BIAS])
    np.testing.assert_array_equal(merged["stats/math/xtx"], math["stats/xtx"])
    assert meta["fingerprint"] == io.fingerprint(merged)  # streamed fingerprint is the real one

    model, _ = io.load(out)
    assert model.cfg.n_experts == 3 and not model.cfg.router_trainable
    assert not isinstance(model.blocks.ffn.router, nnx.Param)  # RouterState: no optimizer
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 60
    logits, _ = model(tokens)
    assert np.isfinite(np.asarray(logits)).all()


def test_merge_of_one_branch_equals_the_branch_model(world, tmp_path):
    """Merging one branch with learned rows gives exactly the model the branch trained:
    base + its expert, zero public row, its row and bias."""
    out = tmp_path / "m"
    fuse.merge_paths(world["base"], [world["branches"]["code"]], router="learned-rows",
                     top_k=2, out=out, log=lambda s: None)
    merged, _ = io.load(out)
    code = all_tensors(world["branches"]["code"])
    base = all_tensors(world["base"])
    flat = dict(base)
    for name in sources.FFN_EXPERT:
        flat[name] = np.concatenate([base[name], code[name]], axis=1)
    flat[sources.ROUTER] = np.concatenate(
        [np.zeros_like(code[sources.ROUTER]), code[sources.ROUTER]], axis=1)
    flat[sources.BIAS] = np.concatenate([np.zeros_like(code[sources.BIAS]),
                                         code[sources.BIAS]], axis=1)
    branch_model = Decoder(CFG.replace(n_experts=2, top_k=2), rngs=nnx.Rngs(0))
    nnx.update(branch_model, nnx.State(io.unflatten(flat)))
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 60
    np.testing.assert_array_equal(np.asarray(merged(tokens)[0]),
                                  np.asarray(branch_model(tokens)[0]))


def _expect_refusal(world, tmp_path, branch_paths, match, **kw):
    out = tmp_path / "refused"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MergeRefused, match=match):
        fuse.merge_paths(world["base"], branch_paths, router=kw.pop("router", "learned-rows"),
                         top_k=1, out=out, log=lambda s: None, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not out.exists() and not out.with_name("refused.partial").exists()


def test_refuses_branch_of_another_base(world, tmp_path):
    other = make_base(tmp_path / "other_base", seed=7)
    stray = make_branch(other, tmp_path / "stray", "stray", 5)
    _expect_refusal(world, tmp_path, [world["branches"]["code"], stray],
                    r"branch 'stray'.*another base")


def test_refuses_modified_frozen_tensor(world, tmp_path):
    def tamper(own, stats, meta, hashes):
        meta["frozen_hashes"]["blocks/attn/q"] = "0" * 64
    bad = make_branch(world["base"], tmp_path / "bad", "bad", 5, tamper=tamper)
    _expect_refusal(world, tmp_path, [bad], r"branch 'bad'.*frozen tensor 'blocks/attn/q'")


def test_refuses_trained_shared_tensor(world, tmp_path):
    def tamper(own, stats, meta, hashes):
        del meta["frozen_hashes"]["embed"]
    bad = make_branch(world["base"], tmp_path / "bad", "bad", 5, tamper=tamper)
    _expect_refusal(world, tmp_path, [bad], r"branch 'bad'.*\['embed'\].*frozen_hashes")


def test_refuses_shape_mismatch(world, tmp_path):
    def tamper(own, stats, meta, hashes):
        own["blocks/ffn/w_up"] = own["blocks/ffn/w_up"][:, :, :, :40]
    bad = make_branch(world["base"], tmp_path / "bad", "bad", 5, tamper=tamper)
    _expect_refusal(world, tmp_path, [bad], r"branch 'bad'.*'blocks/ffn/w_up' has shape")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_refuses_nan_and_inf(world, tmp_path, value):
    def tamper(own, stats, meta, hashes):
        own["blocks/ffn/w_down"][1, 0, 3, 4] = value
    bad = make_branch(world["base"], tmp_path / "bad", "bad", 5, tamper=tamper)
    _expect_refusal(world, tmp_path, [bad],
                    r"branch 'bad'.*'blocks/ffn/w_down' holds NaN or Inf.*\(1, 0, 3, 4\)")


def test_refuses_uncommitted_checkpoint(world, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(world["branches"]["law"], half.with_name("half.partial"))
    _expect_refusal(world, tmp_path, [half], r"never committed.*half.partial")
    no_meta = tmp_path / "no_meta"
    shutil.copytree(world["branches"]["law"], no_meta)
    (no_meta / io.META).unlink()
    _expect_refusal(world, tmp_path, [no_meta], r"not a committed checkpoint")


def test_refuses_duplicate_sources(world, tmp_path):
    twin = make_branch(world["base"], tmp_path / "twin", "code", 9)
    _expect_refusal(world, tmp_path, [world["branches"]["code"], twin], r"'code' appears twice")


def _prefix_branch(world, path, source, seed):
    def prefix(own, stats, meta, hashes):
        meta["model"]["router_input"] = "prefix_mean"
    return make_branch(world["base"], path, source, seed, tamper=prefix)


def test_router_input_travels_and_must_agree(world, tmp_path):
    a = _prefix_branch(world, tmp_path / "pa", "code", 1)
    b = _prefix_branch(world, tmp_path / "pb", "math", 2)
    meta = fuse.merge_paths(world["base"], [a, b], router="learned-rows", top_k=2,
                            out=tmp_path / "m", log=lambda s: None)
    assert meta["model"]["router_input"] == "prefix_mean"
    model, _ = io.load(tmp_path / "m")
    assert model.cfg.router_input == "prefix_mean"
    # a token-routed branch next to prefix-routed ones: refused, naming both
    _expect_refusal(world, tmp_path, [a, world["branches"]["math"]],
                    r"disagree on model.router_input.*'code': 'prefix_mean'.*'math': 'token'")
    # public statistics of another router input would mislead ridge and centroid rows
    with pytest.raises(MergeRefused, match="sums of router input 'token'.*route on "
                                           "'prefix_mean'"):
        fuse.merge_paths(world["base"], [a, b], router="ridge", top_k=2, out=tmp_path / "r",
                         public_stats=world["public"], log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_refuses_modified_base(world, tmp_path):
    base = tmp_path / "base_copy"
    shutil.copytree(world["base"], base)
    meta = json.loads((base / io.META).read_text())
    meta["fingerprint"] = "f" * 64
    (base / io.META).write_text(json.dumps(meta))
    with pytest.raises(MergeRefused, match="do not match its recorded fingerprint"):
        fuse.merge_paths(base, [], router="learned-rows", top_k=1, out=tmp_path / "o",
                         log=lambda s: None)


def _params(path):
    return all_tensors(path)


def _assert_same(a, b):
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
    assert io.read_meta(a)["fingerprint"] == io.read_meta(b)["fingerprint"]


@pytest.mark.parametrize("router", sorted(registry.KINDS))
def test_remove_and_add_are_exact(world, tmp_path, router):
    b = world["branches"]
    kw = dict(router=router, top_k=2, public_stats=world["public"], log=lambda s: None)
    fuse.merge_paths(world["base"], [b["code"], b["math"], b["law"]], out=tmp_path / "all", **kw)
    fuse.merge_paths(world["base"], [b["code"], b["law"]], out=tmp_path / "no_math", **kw)
    fuse.merge_paths(world["base"], [b["code"], b["math"]], out=tmp_path / "two", **kw)

    fuse.remove(tmp_path / "all", "math", out=tmp_path / "removed", log=lambda s: None)
    _assert_same(tmp_path / "removed", tmp_path / "no_math")
    fuse.add(tmp_path / "two", [b["law"]], out=tmp_path / "added", log=lambda s: None)
    _assert_same(tmp_path / "added", tmp_path / "all")


def test_remove_unknown_source_and_add_verifies(world, tmp_path):
    b = world["branches"]
    fuse.merge_paths(world["base"], [b["code"]], router="learned-rows", top_k=1,
                     out=tmp_path / "m", log=lambda s: None)
    with pytest.raises(MergeRefused, match="no party 'law'"):
        fuse.remove(tmp_path / "m", "law", out=tmp_path / "r", log=lambda s: None)
    other = make_base(tmp_path / "other", seed=3)
    stray = make_branch(other, tmp_path / "stray", "stray", 4)
    with pytest.raises(MergeRefused, match="another base"):
        fuse.add(tmp_path / "m", [stray], out=tmp_path / "a", log=lambda s: None)
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()


def test_streaming_write_equals_whole_write(tmp_path):
    rng = np.random.default_rng(0)
    flat = {"a/w": rng.standard_normal((5, 3, 4)).astype(np.float32),
            "b": np.arange(7, dtype=np.int32), "c": np.array(2.5, np.float32)}
    io.save(tmp_path / "whole", flat, {"kind": "x"})

    def pieces(v):
        return (lambda: [v]) if v.ndim == 0 else (lambda: [v[i:i + 2] for i in range(0, len(v), 2)])
    hashes = io.save_streaming(tmp_path / "stream", {
        k: io.TensorSource(v.shape, v.dtype, pieces(v)) for k, v in flat.items()}, {"kind": "x"})
    assert hashes == {k: io.tensor_hash(v) for k, v in flat.items()}
    assert io.read_meta(tmp_path / "stream")["fingerprint"] == \
        io.read_meta(tmp_path / "whole")["fingerprint"]
    read = (pathlib.Path(tmp_path) / p / io.PARAMS / "_METADATA" for p in ("whole", "stream"))
    assert len({r.read_text() for r in read}) == 1  # same tree metadata on disk
    got = io.load_tensors(tmp_path / "stream", flat)
    for k in flat:
        np.testing.assert_array_equal(got[k], flat[k])
    assert io.TensorReader(tmp_path / "whole", "a/w").hash() == io.tensor_hash(flat["a/w"])

    def broken():
        yield flat["a/w"][:2]
        raise RuntimeError("source failed")
    with pytest.raises(RuntimeError, match="source failed"):
        io.save_streaming(tmp_path / "broken", {"a/w": io.TensorSource((5, 3, 4), np.float32,
                                                                        broken)}, {})
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.partial").exists()


def test_cli_merge_remove_add_and_refusal(world, tmp_path, capsys):
    from moesaic.launch.cli import main
    b = world["branches"]
    out = tmp_path / "m"
    assert main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--branch", str(b["math"]), "--router", "centroid", "--top-k", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "routing report" in printed and "max cos" in printed
    assert io.read_meta(out)["router"]["inputs"]["public"].startswith("normalised mean")
    assert main(["merge", "remove", str(out), "--source", "math", "--out",
                 str(tmp_path / "r")]) == 0
    assert [e["source"] for e in io.read_meta(tmp_path / "r")["experts"]] == ["public", "code"]
    assert main(["merge", "add", str(tmp_path / "r"), "--branch", str(b["law"]), "--out",
                 str(tmp_path / "a")]) == 0
    assert io.read_meta(tmp_path / "a")["model"]["n_experts"] == 3
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--branch", str(b["code"]), "--router", "learned-rows", "--out",
                 str(tmp_path / "dup")])
    assert code == 2 and "appears twice" in capsys.readouterr().err
    assert not (tmp_path / "dup").exists()
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "ridge", "--out", str(tmp_path / "ridge")])
    assert code == 2 and "--public-stats" in capsys.readouterr().err
    # remove / add keep the merged rows: a router flag would be ignored, so it is refused
    code = main(["merge", "remove", str(out), "--source", "math", "--router", "ridge",
                 "--router-scale", "5", "--out", str(tmp_path / "r2")])
    assert code == 2 and "takes no --router, --router-scale" in capsys.readouterr().err
    code = main(["merge", "add", str(tmp_path / "r"), "--branch", str(b["law"]), "--seed", "3",
                 "--out", str(tmp_path / "a2")])
    assert code == 2 and "takes no --seed" in capsys.readouterr().err
    # a data folder that is not there: refused in one line, not a traceback
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "ridge", "--public-data", str(tmp_path / "no_data"),
                 "--out", str(tmp_path / "pd")])
    assert code == 2 and "no prepared source 'public'" in capsys.readouterr().err
    # kind options: set from the command line, refused when the kind does not read them
    assert main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "contrast", "--public-stats", str(world["public"]),
                 "--router-option", "selectivity=1.5", "--router-option", "margin=3",
                 "--out", str(tmp_path / "c")]) == 0
    assert io.read_meta(tmp_path / "c")["router"]["options"] == {"margin": 3.0,
                                                                  "selectivity": 1.5}
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "centroid", "--router-option", "marign=3", "--ridge-lambda", "1",
                 "--out", str(tmp_path / "c2")])
    assert code == 2 and ("router 'centroid' takes no option marign, ridge_lambda (it takes: "
                          "scale)") in capsys.readouterr().err
    # a name the atomic write reserves would be written and then never read as a checkpoint
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "learned-rows", "--out", str(tmp_path / "m.partial")])
    assert code == 2 and "may not end in '.partial'" in capsys.readouterr().err
    assert not any(p.name.startswith(("r2", "a2", "pd", "m.partial", "c2"))
                   for p in tmp_path.iterdir())


def test_public_stats_in_an_artifact_layout_carry_their_router_input(world, tmp_path):
    """A branch artifact records its router input in its model config, not at the top."""
    a = _prefix_branch(world, tmp_path / "pa", "code", 1)
    b = _prefix_branch(world, tmp_path / "pb", "math", 2)
    stats_like = _prefix_branch(world, tmp_path / "pub", "web", 9)
    meta = fuse.merge_paths(world["base"], [a, b], router="ridge", top_k=2,
                            public_stats=stats_like, out=tmp_path / "m", log=lambda s: None)
    assert meta["model"]["router_input"] == "prefix_mean"
    with pytest.raises(MergeRefused, match="sums of router input 'prefix_mean'.*route on "
                                           "'token'"):
        fuse.merge_paths(world["base"], [world["branches"]["code"]], router="ridge", top_k=1,
                         public_stats=stats_like, out=tmp_path / "t", log=lambda s: None)


def test_public_stats_and_a_base_are_checked_like_any_input(world, tmp_path):
    b = world["branches"]
    other = make_base(tmp_path / "other", seed=7)
    elsewhere = make_branch(other, tmp_path / "elsewhere", "web", 9)  # stats under another base
    with pytest.raises(MergeRefused, match="public stats .*computed under another model"):
        fuse.merge_paths(world["base"], [b["code"]], router="ridge", top_k=1,
                         public_stats=elsewhere, out=tmp_path / "m", log=lambda s: None)
    flat = all_tensors(world["base"])
    flat["blocks/attn/q"] = flat["blocks/attn/q"].copy()
    flat["blocks/attn/q"][1, 2] = np.nan
    io.save(tmp_path / "nan_base", flat, io.read_meta(world["base"]) | {"fingerprint": None})
    meta = json.loads((tmp_path / "nan_base" / io.META).read_text())
    meta["fingerprint"] = io.fingerprint(flat)
    (tmp_path / "nan_base" / io.META).write_text(json.dumps(meta))
    with pytest.raises(MergeRefused, match=r"base .*'blocks/attn/q' holds NaN or Inf \(first "
                                           r"at index \(1, 2"):
        fuse.merge_paths(tmp_path / "nan_base", [], router="learned-rows", top_k=1,
                         out=tmp_path / "n", log=lambda s: None)
    assert not (tmp_path / "m").exists() and not (tmp_path / "n").exists()


@pytest.mark.parametrize("router", ["contrast", "ridge"])
def test_the_last_party_can_opt_out(world, tmp_path, router):
    """With public stats of prefix means and contrast rows (which need a party to stack)."""
    a = _prefix_branch(world, tmp_path / "pa", "code", 1)
    pub = _prefix_branch(world, tmp_path / "pub", "web", 9)
    fuse.merge_paths(world["base"], [a], router=router, top_k=1, public_stats=pub,
                     out=tmp_path / "m", log=lambda s: None)
    meta = fuse.remove(tmp_path / "m", "code", out=tmp_path / "none", log=lambda s: None)
    assert [e["source"] for e in meta["experts"]] == ["public"]
    fuse.merge_paths(world["base"], [], router=router, top_k=1, public_stats=pub,
                     out=tmp_path / "empty", log=lambda s: None)
    _assert_same(tmp_path / "none", tmp_path / "empty")


def _rewrite(path, out, change):
    """A copy of the checkpoint at `path` with tensors changed and its meta.json as it was
    (recorded fingerprints included): what editing the files in place would give."""
    flat = all_tensors(path)
    change(flat)
    io.save(out, flat, io.read_meta(path))
    return out


def test_refuses_party_tensors_modified_after_they_were_written(world, tmp_path):
    b = world["branches"]

    def bump(name, index=None):
        def change(flat):
            flat[name] = flat[name].copy()
            if index is None:
                flat[name] += 1
            else:
                flat[name][:, index] += 1
        return change
    code = _rewrite(b["code"], tmp_path / "code", bump("blocks/ffn/w_up"))
    _expect_refusal(world, tmp_path, [code, b["math"]],
                    r"branch 'code'.*do not match the fingerprint")
    kw = dict(router="ridge", top_k=2, public_stats=world["public"], log=lambda s: None)
    fuse.merge_paths(world["base"], [b["code"], b["math"], b["law"]], out=tmp_path / "m", **kw)
    slot = _rewrite(tmp_path / "m", tmp_path / "m_slot", bump("blocks/ffn/w_up", 1))
    with pytest.raises(MergeRefused, match=r"branch 'code' \(.*m_slot\).*do not match the "
                                           r"fingerprint"):
        fuse.remove(slot, "math", out=tmp_path / "r", log=lambda s: None)
    stats = _rewrite(tmp_path / "m", tmp_path / "m_stats", bump("stats/law/x_sum"))
    with pytest.raises(MergeRefused, match=r"branch 'law'.*do not match the fingerprint"):
        fuse.add(stats, [], out=tmp_path / "a", log=lambda s: None)
    public = _rewrite(tmp_path / "m", tmp_path / "m_pub", bump("stats/public/xtx"))
    with pytest.raises(MergeRefused, match=r"public stats .*m_pub.*recorded fingerprint"):
        fuse.remove(public, "math", out=tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()
    meta = fuse.remove(tmp_path / "m", "math", out=tmp_path / "r", log=lambda s: None)
    assert meta["merge"]["public_stats_fingerprint"] == io.read_meta(world["public"])[
        "fingerprint"]


def test_refuses_a_merged_base(world, tmp_path):
    """A merged model as --base would keep only its base and silently drop its parties; a
    branch trained from one could never be merged."""
    import ml_collections

    from moesaic.branch_train import base_model

    b = world["branches"]
    fuse.merge_paths(world["base"], [b["code"], b["math"]], router="learned-rows", top_k=2,
                     out=tmp_path / "m", log=lambda s: None)
    with pytest.raises(MergeRefused, match=r"merged checkpoint.*drop its parties \['code', "
                                           r"'math'\].*moesaic merge add"):
        fuse.merge_paths(tmp_path / "m", [b["law"]], router="learned-rows", top_k=2,
                         out=tmp_path / "o", log=lambda s: None)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="'merged' checkpoint; a branch starts from"):
        base_model.read_base(tmp_path / "m", ml_collections.ConfigDict({"model": {}}))


def test_remove_names_an_inherited_top_k(world, tmp_path):
    b = world["branches"]
    fuse.merge_paths(world["base"], [b["code"], b["math"]], router="learned-rows", top_k=3,
                     out=tmp_path / "m", log=lambda s: None)
    with pytest.raises(MergeRefused, match=r"^the merged model's top_k 3 exceeds the 2 experts "
                                           r"left.*pass --top-k$"):
        fuse.remove(tmp_path / "m", "math", out=tmp_path / "r", log=lambda s: None)
    with pytest.raises(MergeRefused, match=r"^--top-k 3: the merged model has 2 experts"):
        fuse.remove(tmp_path / "m", "math", out=tmp_path / "r", top_k=3, log=lambda s: None)
    meta = fuse.remove(tmp_path / "m", "math", out=tmp_path / "r", top_k=2, log=lambda s: None)
    assert meta["router"]["top_k"] == 2


def test_public_stats_of_another_shape_are_named(world, tmp_path):
    stats, n = synthetic_stats(CFG.replace(d_model=16), 3)
    io.save(tmp_path / "small", stats, {"kind": "router_stats", "stats_tokens": n})
    with pytest.raises(MergeRefused, match=r"public stats .*small: tensor 'stats/x_sum' has "
                                           r"shape \(2, 16\).*computed under a model of another"):
        fuse.merge_paths(world["base"], [world["branches"]["code"]], router="ridge", top_k=1,
                         out=tmp_path / "o", public_stats=tmp_path / "small",
                         log=lambda s: None)


def test_cli_refuses_top_k_below_one(world, tmp_path, capsys):
    from moesaic.launch.cli import main
    for value in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_:
            main(["merge", "--base", str(world["base"]), "--branch",
                  str(world["branches"]["code"]), "--router", "learned-rows", "--top-k", value,
                  "--out", str(tmp_path / "m")])
        assert exit_.value.code == 2 and "at least 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    code = main(["merge", "--base", str(world["base"]), "--branch",
                 str(world["branches"]["code"]), "--router", "learned-rows", "--out",
                 str(tmp_path / "m")])
    assert code == 0
    code = main(["merge", "--base", str(tmp_path / "m"), "--router", "centroid",
                 "--public-data", str(tmp_path / "no_data"), "--out", str(tmp_path / "o")])
    assert code == 2 and "merge add" in capsys.readouterr().err
