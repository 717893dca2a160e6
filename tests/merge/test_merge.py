"""The merge: layout and values of the merged model, opt-out and join bit for bit,
streaming writes identical to whole writes (the refusals and the command line are in
test_refusals.py)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from flax import nnx

from moesaic.merge import fuse, sources
from moesaic.merge.sources import MergeRefused
from moesaic.model import Decoder, checkpoint, streaming
from moesaic.routing import registry
from tests.support.merging import (
    CFG,
    all_tensors,
    assert_same,
    expect_refusal,
    make_base,
    make_branch,
    prefix_branch,
)


def test_merged_layout_values_and_loads(world, tmp_path):
    out = tmp_path / "m"
    b = world["branches"]
    meta = fuse.merge_paths(world["base"], [b["code"], b["math"]], router="learned-rows",
                            top_k=2, out=out, log=lambda s: None)
    assert meta["kind"] == "merged" and meta["model"]["n_experts"] == 3
    assert [e["source"] for e in meta["experts"]] == ["public", "code", "math"]
    assert meta["base_fingerprint"] == checkpoint.read_meta(world["base"])["fingerprint"]
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
    # the streamed fingerprint is the real one
    assert meta["fingerprint"] == checkpoint.fingerprint(merged)

    model, _ = checkpoint.load(out)
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
    merged, _ = checkpoint.load(out)
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
    nnx.update(branch_model, nnx.State(checkpoint.unflatten(flat)))
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 60
    np.testing.assert_array_equal(np.asarray(merged(tokens)[0]),
                                  np.asarray(branch_model(tokens)[0]))


def test_router_input_travels_and_must_agree(world, tmp_path):
    a = prefix_branch(world, tmp_path / "pa", "code", 1)
    b = prefix_branch(world, tmp_path / "pb", "math", 2)
    meta = fuse.merge_paths(world["base"], [a, b], router="learned-rows", top_k=2,
                            out=tmp_path / "m", log=lambda s: None)
    assert meta["model"]["router_input"] == "prefix_mean"
    model, _ = checkpoint.load(tmp_path / "m")
    assert model.cfg.router_input == "prefix_mean"
    # a token-routed branch next to prefix-routed ones: refused, naming both
    expect_refusal(world, tmp_path, [a, world["branches"]["math"]],
                    r"disagree on model.router_input.*'code': 'prefix_mean'.*'math': 'token'")
    # public statistics of another router input would mislead ridge and centroid rows
    with pytest.raises(MergeRefused, match="sums of router input 'token'.*route on "
                                           "'prefix_mean'"):
        fuse.merge_paths(world["base"], [a, b], router="ridge", top_k=2, out=tmp_path / "r",
                         public_stats=world["public"], log=lambda s: None)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("router", sorted(registry.KINDS))
def test_remove_and_add_are_exact(world, tmp_path, router):
    b = world["branches"]
    kw = dict(router=router, top_k=2, public_stats=world["public"], log=lambda s: None)
    fuse.merge_paths(world["base"], [b["code"], b["math"], b["law"]], out=tmp_path / "all", **kw)
    fuse.merge_paths(world["base"], [b["code"], b["law"]], out=tmp_path / "no_math", **kw)
    fuse.merge_paths(world["base"], [b["code"], b["math"]], out=tmp_path / "two", **kw)

    fuse.remove(tmp_path / "all", "math", out=tmp_path / "removed", log=lambda s: None)
    assert_same(tmp_path / "removed", tmp_path / "no_math")
    fuse.add(tmp_path / "two", [b["law"]], out=tmp_path / "added", log=lambda s: None)
    assert_same(tmp_path / "added", tmp_path / "all")


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
    with pytest.raises(MergeRefused, match="'code' is already a party of .*merge remove"):
        fuse.add(tmp_path / "m", [b["code"]], out=tmp_path / "a", log=lambda s: None)
    assert not (tmp_path / "a").exists()


def test_streaming_write_equals_whole_write(tmp_path):
    rng = np.random.default_rng(0)
    flat = {"a/w": rng.standard_normal((5, 3, 4)).astype(np.float32),
            "b": np.arange(7, dtype=np.int32), "c": np.array(2.5, np.float32)}
    checkpoint.save(tmp_path / "whole", flat, {"kind": "x"})

    def pieces(v):
        return (lambda: [v]) if v.ndim == 0 else (lambda: [v[i:i + 2] for i in range(0, len(v), 2)])
    sources = {k: streaming.TensorSource(v.shape, v.dtype, pieces(v)) for k, v in flat.items()}
    hashes = streaming.save_streaming(tmp_path / "stream", sources, {"kind": "x"})
    assert hashes == {k: checkpoint.tensor_hash(v) for k, v in flat.items()}
    assert checkpoint.read_meta(tmp_path / "stream")["fingerprint"] == \
        checkpoint.read_meta(tmp_path / "whole")["fingerprint"]
    read = (pathlib.Path(tmp_path) / p / checkpoint.PARAMS / "_METADATA"
            for p in ("whole", "stream"))
    assert len({r.read_text() for r in read}) == 1  # same tree metadata on disk
    got = checkpoint.load_tensors(tmp_path / "stream", flat)
    for k in flat:
        np.testing.assert_array_equal(got[k], flat[k])
    whole_hash = checkpoint.TensorReader(tmp_path / "whole", "a/w").hash()
    assert whole_hash == checkpoint.tensor_hash(flat["a/w"])

    def broken():
        yield flat["a/w"][:2]
        raise RuntimeError("source failed")
    with pytest.raises(RuntimeError, match="source failed"):
        source = streaming.TensorSource((5, 3, 4), np.float32, broken)
        streaming.save_streaming(tmp_path / "broken", {"a/w": source}, {})
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.partial").exists()


def test_public_stats_in_an_artifact_layout_carry_their_router_input(world, tmp_path):
    """A branch artifact records its router input in its model config, not at the top."""
    a = prefix_branch(world, tmp_path / "pa", "code", 1)
    b = prefix_branch(world, tmp_path / "pb", "math", 2)
    stats_like = prefix_branch(world, tmp_path / "pub", "web", 9)
    meta = fuse.merge_paths(world["base"], [a, b], router="ridge", top_k=2,
                            public_stats=stats_like, out=tmp_path / "m", log=lambda s: None)
    assert meta["model"]["router_input"] == "prefix_mean"
    with pytest.raises(MergeRefused, match="sums of router input 'prefix_mean'.*route on "
                                           "'token'"):
        fuse.merge_paths(world["base"], [world["branches"]["code"]], router="ridge", top_k=1,
                         public_stats=stats_like, out=tmp_path / "t", log=lambda s: None)


@pytest.mark.parametrize("router", ["contrast", "ridge"])
def test_the_last_party_can_opt_out(world, tmp_path, router):
    """With public stats of prefix means and contrast rows (which need a party to stack)."""
    a = prefix_branch(world, tmp_path / "pa", "code", 1)
    pub = prefix_branch(world, tmp_path / "pub", "web", 9)
    fuse.merge_paths(world["base"], [a], router=router, top_k=1, public_stats=pub,
                     out=tmp_path / "m", log=lambda s: None)
    meta = fuse.remove(tmp_path / "m", "code", out=tmp_path / "none", log=lambda s: None)
    assert [e["source"] for e in meta["experts"]] == ["public"]
    fuse.merge_paths(world["base"], [], router=router, top_k=1, public_stats=pub,
                     out=tmp_path / "empty", log=lambda s: None)
    assert_same(tmp_path / "none", tmp_path / "empty")


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


def test_the_parties_sequence_length_travels_to_the_merged_model(world, tmp_path):
    """`moesaic eval` and `tune-router` default to it; without it they would use 128."""
    def trained_on(length):
        def tamper(own, stats, meta, hashes):
            meta["config"] = {"data": {"seq_len": length}}
        return tamper
    a = make_branch(world["base"], tmp_path / "a", "code", 1, tamper=trained_on(16))
    b = make_branch(world["base"], tmp_path / "b", "math", 2, tamper=trained_on(16))
    c = make_branch(world["base"], tmp_path / "c", "law", 3, tamper=trained_on(32))
    kw = dict(router="learned-rows", top_k=2, log=lambda s: None)
    meta = fuse.merge_paths(world["base"], [a, b], out=tmp_path / "m", **kw)
    assert meta["config"] == {"data": {"seq_len": 16}}
    assert "config" not in fuse.merge_paths(world["base"], [a, c], out=tmp_path / "m2", **kw)
    meta = fuse.remove(tmp_path / "m", "math", out=tmp_path / "r", log=lambda s: None)
    assert meta["config"] == {"data": {"seq_len": 16}}


def test_a_merge_reads_each_streamed_input_once_and_writes_expert_by_expert(world, tmp_path,
                                                                           monkeypatch):
    """Verification and the write share one read of every tensor the merge streams out as it
    is (the base's tensors, the parties' experts): each is read exactly once, whole. The
    stacked experts are stored in chunks of one layer of one expert."""
    import collections

    from moesaic.model.names import BIAS, FFN_EXPERT, ROUTER, W_GATE

    read = collections.Counter()
    original = checkpoint.TensorReader.__getitem__

    def counting(self, index):
        block = original(self, index)
        read[(pathlib.Path(self.path).name, self.name)] += block.nbytes
        return block
    monkeypatch.setattr(checkpoint.TensorReader, "__getitem__", counting)
    branches = [world["branches"]["code"], world["branches"]["math"]]
    fuse.merge_paths(world["base"], branches, router="learned-rows", top_k=2,
                     out=tmp_path / "m", log=lambda s: None)
    expected = {(world["base"].name, name): int(np.prod(shape)) * dtype.itemsize
                for name, (shape, dtype) in checkpoint.tensor_metadata(world["base"]).items()
                if name not in (ROUTER, BIAS)}
    for path in branches:
        stored = checkpoint.tensor_metadata(path)
        expected.update({(path.name, n): int(np.prod(stored[n][0])) * stored[n][1].itemsize
                         for n in FFN_EXPERT})
    assert {key: read[key] for key in expected} == expected
    chunk = checkpoint.TensorReader(tmp_path / "m", W_GATE)._store.chunk_layout.read_chunk.shape
    assert tuple(chunk[:2]) == (1, 1)
