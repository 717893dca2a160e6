"""The low-rank branch: frozen by construction (the optimizer state holds only the expert's
A and B, the row and the bias), its artifact, and bad settings named; QLoRA (the frozen base
held int8 or nf4): quantized bytes and error, training, and the merge of its artifact."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from moesaic.branch_train import artifact, base_model, quantized_base, setup
from moesaic.branch_train.trainer import Job, train
from moesaic.merge import fuse
from moesaic.model import checkpoint, lora, names, params, quantized
from moesaic.model.sharding import make_mesh
from tests.support.training import make_data, tiny_config


def _job(kind, workdir, data, base=None) -> Job:
    return Job(kind, pathlib.Path(workdir), pathlib.Path(data), base=base, show_progress=False)


@pytest.fixture(scope="module")
def start_log():
    """What the QLoRA start of `trained` put on a device, and the slices it quantized."""
    return {"placed": [], "quantized": []}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, start_log):
    """A low-rank branch whose frozen base is held in nf4 (QLoRA): one job checks both."""
    data = make_data(tmp_path_factory.mktemp("data"))
    pre = tmp_path_factory.mktemp("pretrain")
    train(tiny_config(train__steps=2), _job("pretrain", pre, data))
    workdir = tmp_path_factory.mktemp("lora")
    config = tiny_config("source=code", train__steps=3)
    config.branch.mode = "lora"
    config.branch.lora.rank = 4
    config.branch.lora.targets = ("q", "v", "gate", "down")
    config.branch.lora.quantize = "nf4"
    place, quantize = quantized_base.place, quantized_base.quantize_layer

    def placing(host, sharding):
        start_log["placed"].append((tuple(host.shape), np.dtype(host.dtype)))
        return place(host, sharding)

    def quantizing(layer, kind, name):
        start_log["quantized"].append((name, tuple(layer.shape)))
        return quantize(layer, kind, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized_base, "place", placing)
        patch.setattr(quantized_base, "quantize_layer", quantizing)
        result = train(config, _job("lora", workdir, data, pre / "public"))
    return data, pre / "public", workdir, result


def test_only_the_adapters_and_the_row_train(trained):
    _, base_path, workdir, result = trained
    base = checkpoint.load_tensors(base_path, checkpoint.tensor_metadata(base_path))
    layout = result.layout
    want = set(lora.tensor_names(("q", "v", "gate", "down")))
    assert set(layout.trainable) == want and set(layout.split) == {names.ROUTER, names.BIAS}
    assert set(base) <= set(layout.frozen)
    for name in set(base) - set(quantized.INPUT_AXES):  # frozen bit for bit
        np.testing.assert_array_equal(np.asarray(result.frozen[name]), base[name], err_msg=name)
    for name in quantized.INPUT_AXES:  # held in nf4
        held = result.frozen[name]
        assert isinstance(held, quantized.Quantized) and held.kind == "nf4", name
        # codes: the float32 base's 1/8; a float32 scale per block of up to 64 weights along
        # the input axis (here d_model 32, or the head size 16 for o)
        assert held.codes.nbytes * 8 == base[name].nbytes, name
        block = np.gcd(base[name].shape[quantized.INPUT_AXES[name][-1]], 64)
        assert held.scale.dtype == np.float32 and held.scale.size * block == base[name].size
    shapes = {n: tuple(a.shape) for n, a in result.trainable.items()}
    assert shapes[lora.tensor_name("gate", "a")] == (2, 1, 32, 4)
    assert shapes[names.ROUTER] == (2, 1, 32)
    _assert_optimizer_holds_only(result, shapes)
    assert not np.any(np.asarray(result.trainable[lora.tensor_name("q", "b")]) == 0), \
        "B did not train"
    assert result.losses[3] < result.losses[1]

    meta = artifact.read_meta(workdir / "artifact")
    stored = checkpoint.tensor_metadata(workdir / "artifact")
    assert set(stored) == want | {names.ROUTER, names.BIAS, *artifact.STATS, *artifact.NGRAM}
    assert meta["model"]["lora_experts"] == 1 and meta["model"]["lora_rank"] == 4
    assert meta["frozen_quantize"] == "nf4"
    assert meta["config"]["branch"]["lora"]["quantize"] == "nf4"
    for name in base:  # the unquantized base's hashes, which the merge checks
        assert meta["frozen_hashes"][name] == checkpoint.tensor_hash(base[name]), name


def test_the_qlora_start_places_only_the_quantized_base(trained, start_log):
    """The start read the base a layer at a time: each projection reached a device one
    layer's float32 slice at a time (to be quantized), and what it placed is the held frozen
    tree, nf4 codes and scales for the projections, never a float stacked projection; the
    codes are those of the whole stacked tensor quantized at once, bit for bit."""
    _, base_path, _, result = trained
    base = checkpoint.load_tensors(base_path, checkpoint.tensor_metadata(base_path))
    projections = sorted(quantized.INPUT_AXES)
    assert sorted(start_log["quantized"]) == sorted(
        (n, base[n].shape[1:]) for n in projections for _ in range(base[n].shape[0]))
    placed = start_log["placed"]
    stacked = {base[n].shape for n in projections}
    assert not [p for p in placed if p[0] in stacked and p[1].kind == "f"], placed
    held = [(tuple(a.shape), np.dtype(a.dtype))
            for a in jax.tree.leaves([result.frozen[n] for n in base])]
    assert sorted(placed, key=str) == sorted(held, key=str)
    wants = jax.jit(lambda d: {n: quantized.quantize(a, "nf4", n) for n, a in d.items()})(
        {n: base[n] for n in projections})
    for name, want in wants.items():
        np.testing.assert_array_equal(np.asarray(result.frozen[name].codes), want.codes, name)
        np.testing.assert_array_equal(np.asarray(result.frozen[name].scale), want.scale, name)


def test_qlora_router_statistics_are_the_quantized_bases(trained):
    """The statistics the start collected (the artifact's) ran through the nf4 base, a layer
    dequantized at a time: equal, to float32 rounding, to those of the stored base whose
    projections are replaced by their dequantized nf4 values (bit for bit on CPU); against
    the stored float32 base's they differ by the quantization alone (15% of their largest
    value on this 2-layer model of width 32, whose nf4 blocks are 32 weights)."""
    data, base_path, workdir, result = trained
    own = checkpoint.load_tensors(workdir / "artifact", artifact.STATS)
    config = tiny_config("source=code")
    meta = base_model.read_base(base_path, config)
    mesh = make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.rules)
    stored = base_model.load_base(base_path, meta, mesh, rules)
    rounded = {**stored.flat, **jax.jit(lambda d: {
        n: quantized.dequantize(quantized.quantize(a, "nf4", n), a.dtype)
        for n, a in d.items()})({n: stored.flat[n] for n in quantized.INPUT_AXES})}
    as_nf4 = base_model.Base(stored.cfg, params.build_model(stored.cfg, rounded), rounded, meta)
    for base, bound in ((as_nf4, 1e-6), (stored, 0.25)):  # measured: 0 and 0.152
        stats = base_model.party_stats(base, config, data, mesh, rules).tensors()
        gaps = {n: np.abs(own[n] - stats[n]).max() / np.abs(stats[n]).max()
                for n in artifact.STATS}
        assert max(gaps.values()) <= bound, gaps
    assert min(gaps.values()) > 1e-3  # the float32 base's differ: it ran on the quantized one


def test_a_damaged_base_is_refused_by_the_qlora_start(trained, tmp_path):
    """Verified as it is read: a base whose bytes are not its fingerprint's, or that holds
    NaN, refused naming it, nothing written."""
    data, base_path, _, result = trained
    config = tiny_config("source=code")
    config.branch.mode = "lora"
    config.branch.lora.quantize = "nf4"
    changed = tmp_path / "changed"
    shutil.copytree(base_path, changed)
    meta = json.loads((changed / checkpoint.META).read_text())
    meta["fingerprint"] = "0" * 64
    (changed / checkpoint.META).write_text(json.dumps(meta))
    nan = checkpoint.load_tensors(base_path, checkpoint.tensor_metadata(base_path))
    nan[names.W_UP] = nan[names.W_UP].copy()
    nan[names.W_UP][0, 0, 3, 5] = np.nan  # layer 0: the read goes on past it
    del meta["fingerprint"]
    checkpoint.save(tmp_path / "nan", nan, meta)
    for base, named in ((changed, "base .*changed.* is damaged: its tensors do not match"),
                        (tmp_path / "nan", r"tensor 'blocks/ffn/w_up' holds NaN.*\(0, 0, 3, 5\)")):
        with pytest.raises(ValueError, match=named):
            train(config, _job("lora", tmp_path / base.name / "w", data, base))
        assert not (tmp_path / base.name / "w" / "artifact").exists()
    # --no-verify: the NaN base read whole all the same (the check stops at the NaN, not the read)
    meta = checkpoint.read_meta(tmp_path / "nan")
    base_cfg = base_model.job_model_config(checkpoint.model_config(meta), config)
    sc, _ = setup.set_up(config, "lora", make_mesh(dict(config.mesh)), base_cfg)
    held, _ = quantized_base.load(tmp_path / "nan", meta, sc, base_cfg, verify=False)
    assert held.flat[names.W_UP].codes.shape == result.frozen[names.W_UP].codes.shape


def _assert_optimizer_holds_only(result, shapes):
    opt_dicts = [node for node in jax.tree.leaves(
        result.opt_state, is_leaf=lambda x: isinstance(x, dict)) if isinstance(node, dict)]
    assert len(opt_dicts) == 2  # Adam's mu and nu, over exactly the trainable leaves
    for tree in opt_dicts:
        assert {n: tuple(a.shape) for n, a in tree.items()} == shapes
    opt_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.opt_state))
    assert opt_size - 2 * result.layout.counts()["trainable"] < 8


@pytest.mark.parametrize("kind, ratio, half_gap", [
    ("int8", 0.26, 0.5 / 127.5),  # codes 1/4 of float32, one scale per output column
    ("nf4", 0.15, 0.1520),  # 1/8, plus a float32 scale per 64 weights; half the widest gap
    # between NF4 levels (-1 to -0.696)
])
def test_a_quantized_matrix_is_smaller_and_within_its_bound(kind, ratio, half_gap):
    """Bytes held against float32, and the dequantized matrix within half a quantization step
    of the original everywhere (step: scale per column for int8, the widest gap between NF4
    levels times the block's absmax for nf4)."""
    w = np.random.default_rng(3).standard_normal((2, 1, 256, 128)).astype(np.float32)
    held = quantized.quantize(jax.numpy.asarray(w), kind, names.W_GATE)
    assert held.codes.dtype == np.uint8 if kind == "nf4" else np.int8
    assert held.shape == w.shape and held.nbytes < ratio * w.nbytes
    back = np.asarray(quantized.dequantize(held, np.float32))
    if kind == "int8":
        absmax = np.abs(w).max(axis=2, keepdims=True)  # over the input axis
    else:
        blocks = np.abs(w).reshape(2, 1, 4, 64, 128).max(axis=3, keepdims=True)
        absmax = np.broadcast_to(blocks, (2, 1, 4, 64, 128)).reshape(w.shape)
    assert np.all(np.abs(back - w) <= half_gap * absmax * (1 + 1e-4))  # float32 rounding
    assert np.abs(back - w).max() > 0  # it did quantize


def test_the_merge_takes_a_qlora_artifact(trained, tmp_path):
    _, base_path, workdir, _ = trained
    out = tmp_path / "merged"
    meta = fuse.merge_paths(base_path, [workdir / "artifact"], router="learned-rows",
                            top_k=2, out=out, log=lambda s: None)
    assert checkpoint.model_config(meta).lora_experts == 1
    merged = checkpoint.load_tensors(out, checkpoint.tensor_metadata(out))
    own = checkpoint.load_tensors(workdir / "artifact",
                                  checkpoint.tensor_metadata(workdir / "artifact"))
    for name in lora.tensor_names(("q", "v", "gate", "down")):
        np.testing.assert_array_equal(merged[name][:, -1:], own[name], err_msg=name)


@pytest.mark.parametrize("mode, quantize, named", [
    ("lora", "int4", r"config.branch.lora.quantize='int4': one of \('none', 'int8', 'nf4'\)"),
    ("coordinated", "nf4", r"config.branch.lora.quantize='nf4'.*'branch' job.*mode=lora"),
])
def test_bad_quantize_settings_are_named(trained, tmp_path, mode, quantize, named):
    data, base_path, _, _ = trained
    config = tiny_config("source=code")
    config.branch.mode = mode
    config.branch.lora.quantize = quantize
    with pytest.raises(ValueError, match=named):
        train(config, _job({"lora": "lora", "coordinated": "branch"}[mode], tmp_path / "w",
                           data, base_path))
    assert not (tmp_path / "w" / "artifact").exists()


@pytest.mark.parametrize("field, value, named", [
    ("rank", 40, "blocks/attn/q"),  # d_model is 32
    ("targets", ("q", "w_in"), "w_in"),
])
def test_bad_low_rank_settings_are_named(trained, tmp_path, field, value, named):
    data, base_path, _, _ = trained
    config = tiny_config("source=code")
    config.branch.mode = "lora"
    config.branch.lora[field] = value
    with pytest.raises(ValueError, match=named):
        train(config, _job("lora", tmp_path / "w", data, base_path))
    assert not (tmp_path / "w" / "artifact").exists()


def test_a_7b_low_rank_branch_trains_under_one_percent_of_an_ffn_branch():
    """What `moesaic plan` plans for olmo2_7b (no compile here): rank 16 of every projection
    and the row, against the coordinated branch's FFN expert, row and bias."""
    from moesaic.configs import olmo2_7b
    from moesaic.launch import plan

    config = olmo2_7b.get_config("source=code")
    ffn = plan.branch_layout(config, base_experts=1).counts()
    config.branch.mode = "lora"
    config.branch.lora.rank = 16
    low = plan.branch_layout(config, base_experts=1).counts()
    assert (ffn["trainable"], low["trainable"]) == (4_328_652_832, 40_108_064)
    assert low["frozen"] == 7_298_748_448  # the whole 7B base, router row and bias slots


def test_a_7b_nf4_base_is_held_in_about_a_third_of_bf16():
    """What `moesaic plan` counts for a 7B QLoRA branch's frozen tree (shapes only)."""
    from moesaic.branch_train.precision import Precision
    from moesaic.configs import olmo2_7b
    from moesaic.launch import plan

    config = olmo2_7b.get_config("source=code")
    config.branch.mode = "lora"
    layout = plan.branch_layout(config, base_experts=1)
    shapes = layout.frozen_shapes()

    def held(quantize):
        p = Precision.from_config(config.train, layout.cfg, True, quantize)
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(p.frozen_shapes(shapes)))

    bf16, nf4 = held("none"), held("nf4")
    assert 14.5e9 < bf16 < 14.7e9 and 5.2e9 < nf4 < 5.4e9  # embed and lm_head stay bf16
