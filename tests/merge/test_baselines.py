"""Soups and BTX over dense branches, router tuning (rows only), and the merged model on
an expert-parallel mesh of 8 fake devices equal to one device."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesaic.merge import baselines, fuse
from moesaic.merge.sources import MergeRefused
from moesaic.merge.tune import tune_router
from moesaic.model import checkpoint, names
from tests.support.merging import CFG, make_base, make_branch, synthetic_stats
from tests.support.processes import last_json_line, run_python


def make_dense(base_path, path, source, seed, scale=0.01):
    base = checkpoint.load_tensors(base_path, checkpoint.tensor_metadata(base_path))
    rng = np.random.default_rng(seed)
    flat = {n: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype)
            for n, v in base.items()}
    stats, n = synthetic_stats(CFG, seed + 50)
    checkpoint.save(path, {**flat, **stats}, {
        "kind": "dense_branch", "source": source, "model": CFG.to_dict(), "stats_tokens": n,
        "base_fingerprint": checkpoint.read_meta(base_path)["fingerprint"]})
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    base = make_base(root / "base")
    return base, [make_dense(base, root / s, s, i) for i, s in enumerate(["code", "math"])]


def _params(path):
    return checkpoint.load_tensors(path, checkpoint.tensor_metadata(path))


def test_uniform_and_weighted_soup(dense, tmp_path):
    _, (a, b) = dense
    pa, pb = _params(a), _params(b)
    meta = baselines.soup([a, b], tmp_path / "u", log=lambda s: None)
    assert meta["weighting"] == "uniform" and meta["weights"] == [0.5, 0.5]
    soup = _params(tmp_path / "u")
    assert not any(n.startswith("stats/") for n in soup)
    for name in soup:
        np.testing.assert_allclose(soup[name], (pa[name].astype(np.float64) + pb[name]) / 2,
                                   rtol=1e-6, atol=1e-7)
    sample = (np.arange(4 * 13).reshape(4, 13) * 7 % 60).astype(np.int32)
    meta = baselines.soup([a, b], tmp_path / "w", sample_bt1=sample, weighting="softmax",
                          log=lambda s: None)
    losses = [baselines.sample_loss(p, sample) for p in (a, b)]
    expected = np.exp(-np.array(losses)) / np.exp(-np.array(losses)).sum()
    np.testing.assert_allclose(meta["weights"], expected, rtol=1e-6)
    np.testing.assert_allclose(meta["losses"], losses, rtol=1e-6)
    np.testing.assert_allclose(baselines.soup_weights([1.0, 3.0], "inverse"), [0.75, 0.25])
    w = _params(tmp_path / "w")
    np.testing.assert_allclose(w["embed"], expected[0] * pa["embed"] + expected[1] * pb["embed"],
                               rtol=1e-5, atol=1e-7)
    model, _ = checkpoint.load(tmp_path / "w")
    assert model.cfg.n_experts == 1


def test_btx_stacks_ffns_and_averages_the_rest(dense, tmp_path):
    _, (a, b) = dense
    pa, pb = _params(a), _params(b)
    meta = baselines.btx([a, b], tmp_path / "x", router="centroid", top_k=2,
                         log=lambda s: None)
    assert meta["model"]["n_experts"] == 2 and [e["source"] for e in meta["experts"]] == \
        ["code", "math"]
    x = _params(tmp_path / "x")
    for name in names.FFN_EXPERT:
        np.testing.assert_array_equal(x[name], np.concatenate([pa[name], pb[name]], axis=1))
    np.testing.assert_allclose(x["blocks/attn/q"], (pa["blocks/attn/q"] + pb["blocks/attn/q"]) / 2,
                               rtol=1e-6, atol=1e-7)
    centroid = pa["stats/mean_hidden"] / np.linalg.norm(pa["stats/mean_hidden"], axis=-1,
                                                        keepdims=True)
    np.testing.assert_allclose(x[names.ROUTER][:, 0], centroid, rtol=1e-5)
    model, _ = checkpoint.load(tmp_path / "x")
    assert np.isfinite(np.asarray(model(np.zeros((1, 8), np.int32))[0])).all()
    with pytest.raises(MergeRefused, match="no router rows"):
        baselines.btx([a, b], tmp_path / "y", router="learned-rows", top_k=1, log=print)
    with pytest.raises(MergeRefused, match="'code' appears twice"):
        baselines.soup([a, a], tmp_path / "z", log=print)


def test_btx_refuses_routers_that_need_a_public_expert(dense, tmp_path, capsys):
    """contrast scores parties against a public expert BTX has none of: refused by name, not a
    crash whose advice (--public-stats) btx cannot follow."""
    from moesaic.cli.main import main

    _, (a, b) = dense
    with pytest.raises(MergeRefused, match="btx: contrast .*public expert"):
        baselines.btx([a, b], tmp_path / "c", router="contrast", top_k=1, log=print)
    argv = ["merge", "btx", "--branch", str(a), "--branch", str(b), "--out", str(tmp_path / "c")]
    assert main([*argv, "--router", "contrast"]) == 2
    assert "public expert" in capsys.readouterr().err
    assert main([*argv, "--router", "centroid", "--public-stats", str(a)]) == 2
    assert "takes no --public-stats" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_dense_branch_modified_after_it_was_written_is_refused(dense, tmp_path):
    _, (a, b) = dense
    flat = _params(b)
    flat["blocks/attn/q"] = flat["blocks/attn/q"] + 1
    checkpoint.save(tmp_path / "b", flat, checkpoint.read_meta(b))  # the recorded fingerprint kept
    with pytest.raises(MergeRefused, match=r"dense branch 'math'.*recorded fingerprint"):
        baselines.soup([a, tmp_path / "b"], tmp_path / "s", log=print)


def test_models_that_do_not_name_their_base_are_refused(dense, tmp_path):
    """Two public models (kind "public", no base recorded) are not branches of one base."""
    base, (a, _) = dense
    other = make_base(tmp_path / "other", seed=5)
    for pair in ([base, other], [a, other]):
        with pytest.raises(MergeRefused, match="a 'public' checkpoint without the base"):
            baselines.soup(pair, tmp_path / "s", log=lambda s: None)
        with pytest.raises(MergeRefused, match="a 'public' checkpoint without the base"):
            baselines.btx(pair, tmp_path / "x", router="random", top_k=1, log=lambda s: None)
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_tune_router_trains_rows_only(tmp_path):
    base = make_base(tmp_path / "base")
    branches = [make_branch(base, tmp_path / s, s, i) for i, s in enumerate(["code", "law"])]
    fuse.merge_paths(base, branches, router="random", top_k=2, out=tmp_path / "m",
                     log=lambda s: None)
    batch = (np.arange(4 * 17).reshape(4, 17) * 5 % 60).astype(np.int32)
    meta = tune_router(tmp_path / "m", tmp_path / "t", lambda step: batch, steps=4, lr=5e-2,
                       log=lambda s: None)
    tuned = meta["router"]["tuned"]
    assert tuned["steps"] == 4 and tuned["loss_last"] < tuned["loss_first"]
    before, after = _params(tmp_path / "m"), _params(tmp_path / "t")
    assert not np.array_equal(before[names.ROUTER], after[names.ROUTER])
    for name in before:
        if name != names.ROUTER:
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert meta["fingerprint"] == checkpoint.fingerprint(after)
    from moesaic.routing import report

    want, _ = report.routing_report(after[names.ROUTER], ["public", "code", "law"])
    want = json.loads(json.dumps(want))  # as meta.json holds it
    assert meta["routing_report"] == want != checkpoint.read_meta(tmp_path / "m")["routing_report"]

    def never(step):
        raise AssertionError("trained before refusing its --out")
    with pytest.raises(FileExistsError, match="exists"):
        tune_router(tmp_path / "m", tmp_path / "t", never, steps=4, log=lambda s: None)


def test_tune_router_command_refuses_a_missing_source(tmp_path, capsys):
    from moesaic.cli.main import main

    base = make_base(tmp_path / "base")
    fuse.merge_paths(base, [make_branch(base, tmp_path / "code", "code", 0)], router="random",
                     top_k=2, out=tmp_path / "m", log=lambda s: None)
    (tmp_path / "data").mkdir()
    code = main(["tune-router", str(tmp_path / "m"), "--data", str(tmp_path / "data"),
                 "--source", "public", "--steps", "2", "--out", str(tmp_path / "t")])
    assert code == 2
    assert "no prepared source 'public'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_expert_parallel_logits_equal_single_device(tmp_path):
    base = make_base(tmp_path / "base")
    branches = [make_branch(base, tmp_path / s, s, i)
                for i, s in enumerate(["code", "math", "law"])]
    fuse.merge_paths(base, branches, router="learned-rows", top_k=2, out=tmp_path / "m4",
                     log=lambda s: None)
    fuse.merge_paths(base, branches[:2], router="learned-rows", top_k=2, out=tmp_path / "m3",
                     log=lambda s: None)
    out = run_python(f"""
        import json, jax, numpy as np
        from moesaic.configs.common import DEFAULT_RULES
        from moesaic.model import checkpoint
        from moesaic.model.sharding import activate, make_mesh
        tokens = (np.arange(4 * 12).reshape(4, 12) * 3 % 60).astype(np.int32)
        result = {{}}
        for merged, shapes in (("m4", ({{"data": 2, "expert": 4}},
                                       {{"data": 1, "expert": 4, "tensor": 2}})),
                               ("m3", ({{"data": 2, "expert": 4}},))):
            path = "{tmp_path}/" + merged
            single, _ = checkpoint.load(path, mesh=make_mesh({{"data": 1}},
                                        devices=jax.devices()[:1]))
            ref = np.asarray(single(tokens)[0])
            for shape in shapes:
                mesh = make_mesh(shape)
                model, _ = checkpoint.load(path, mesh=mesh, rules=DEFAULT_RULES)
                spec = model.blocks.ffn.w_gate[...].sharding.spec
                with activate(mesh, DEFAULT_RULES):
                    got = np.asarray(jax.jit(lambda m, t: m(t)[0])(model, tokens))
                result[merged + json.dumps(shape)] = [float(np.abs(got - ref).max()), str(spec)]
        print(json.dumps(result))
    """, devices=8)
    result = last_json_line(out.stdout)
    for shape in ('m4{"data": 2, "expert": 4}', 'm4{"data": 1, "expert": 4, "tensor": 2}'):
        diff, spec = result[shape]
        assert "expert" in spec
        assert diff < 1e-5
    # 3 experts do not split over 4: the expert axis stays whole (replicated), same logits
    diff, spec = result['m3{"data": 2, "expert": 4}']
    assert "expert" not in spec and diff < 1e-5

