"""The branch job: frozen by construction, the artifact contract, MoE bases, dense mode,
router-row init, and clear errors for bad inputs."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from moesaic.branch_train import artifact, base_model, kinds, trainer
from moesaic.branch_train.trainer import Job, train
from moesaic.model import checkpoint, names
from moesaic.model.config import ModelConfig
from moesaic.model.transformer import Decoder
from moesaic.routing.stats import RouterStats
from tests.support.training import make_data, tiny_config


def _job(kind, workdir, data, base=None, **kw) -> Job:
    return Job(kind, pathlib.Path(workdir), pathlib.Path(data), base=base, show_progress=False,
               **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def dense_base(data, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("pretrain")
    train(tiny_config(train__steps=3), _job("pretrain", workdir, data))
    return workdir / "public"


@pytest.fixture(scope="module")
def code_branch(data, dense_base, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("branch_code")
    return train(tiny_config("source=code"), _job("branch", workdir, data, dense_base)), workdir


def _base_tensors(base: pathlib.Path) -> dict[str, np.ndarray]:
    return checkpoint.load_tensors(base, checkpoint.tensor_metadata(base))


def test_frozen_tensors_stay_bit_identical_and_have_no_optimizer_state(dense_base, code_branch):
    result, _ = code_branch
    base = _base_tensors(dense_base)
    layout = result.layout
    assert layout.cfg.n_experts == 2 and layout.cfg.top_k == 2 and layout.base_experts == 1
    assert set(layout.split) == set(names.EXPERT_TENSORS)
    assert set(layout.trainable) == set()  # everything else matches config.branch.frozen
    for name in base:
        np.testing.assert_array_equal(np.asarray(result.frozen[name]), base[name], err_msg=name)
    full = layout.assemble(result.trainable, result.frozen)
    np.testing.assert_array_equal(np.asarray(full["blocks/ffn/w_up"][:, :1]),
                                  base["blocks/ffn/w_up"])
    own_up = np.asarray(result.trainable["blocks/ffn/w_up"])
    assert not np.array_equal(own_up, base["blocks/ffn/w_up"]), "the own expert did not train"

    trainable_shapes = {n: tuple(a.shape) for n, a in result.trainable.items()}
    opt_dicts = [node for node in jax.tree.leaves(
        result.opt_state, is_leaf=lambda x: isinstance(x, dict)) if isinstance(node, dict)]
    assert len(opt_dicts) == 2  # Adam's mu and nu, each over the trainable leaves only
    for tree in opt_dicts:
        assert {n: tuple(a.shape) for n, a in tree.items()} == trainable_shapes
    opt_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.opt_state))
    assert opt_size - 2 * layout.counts()["trainable"] < 8  # plus step counters only


def test_artifact_holds_exactly_the_owner_tensors_stats_and_metadata(dense_base, code_branch):
    result, workdir = code_branch
    path = workdir / "artifact"
    shapes = {n: s for n, (s, _) in checkpoint.tensor_metadata(path).items()}
    assert set(shapes) == set(artifact.OWN_TENSORS) | set(artifact.STATS) | set(artifact.NGRAM)
    assert shapes["ngram/bigram"] == (264 * 264,) and shapes["ngram/context"] == (264,)
    assert shapes["blocks/ffn/w_gate"] == (2, 1, 32, 64)
    assert shapes["blocks/ffn/router"] == (2, 1, 32) and shapes["blocks/ffn/bias"] == (2, 1)
    assert shapes["stats/xtx"] == (2, 32, 32)

    meta = artifact.read_meta(path)
    assert set(artifact.REQUIRED_META) <= set(meta)
    base_meta = checkpoint.read_meta(dense_base)
    base = _base_tensors(dense_base)
    assert meta["base_fingerprint"] == base_meta["fingerprint"]
    assert meta["frozen_hashes"] == {n: checkpoint.tensor_hash(a) for n, a in base.items()}
    assert meta["source"] == "code" and meta["base_experts"] == 1 and meta["steps"] == 6
    assert meta["tokens_seen"] == 6 * 8 * 16 and meta["model"]["n_experts"] == 2
    assert meta["stats_tokens"] == 2 * 8 * 16 and meta["stats_documents"] >= 1

    stored = checkpoint.load_tensors(path, shapes)
    for name in artifact.OWN_TENSORS:
        np.testing.assert_array_equal(stored[name], np.asarray(result.trainable[name]))
    np.testing.assert_allclose(stored["stats/mean_hidden"],
                               stored["stats/x_sum"] / meta["stats_tokens"], rtol=1e-5)
    xtx = stored["stats/xtx"]
    np.testing.assert_allclose(xtx, np.swapaxes(xtx, 1, 2), rtol=1e-5)
    pairs = stored["ngram/bigram"].reshape(264, 264)  # every pair counted once, by its first
    assert pairs.sum() > 1000 and np.array_equal(pairs.sum(axis=1), stored["ngram/context"])
    assert np.all(np.linalg.eigvalsh(xtx.astype(np.float64)) > -1e-3 * np.abs(xtx).max())


def test_branch_on_an_moe_base_keeps_every_base_expert_frozen(data, tmp_path):
    pre = tmp_path / "pre"
    train(tiny_config("experts=2", train__steps=2), _job("pretrain", pre, data))
    base = _base_tensors(pre / "public")
    config = tiny_config("source=math,experts=2", branch__router_init="public_noise",
                         train__steps=2)
    result = train(config, _job("branch", tmp_path / "br", data, pre / "public"))
    assert result.layout.cfg.n_experts == 3 and result.layout.base_experts == 2
    for name in names.EXPERT_TENSORS:
        np.testing.assert_array_equal(np.asarray(result.frozen[name]), base[name])
        assert result.trainable[name].shape[1] == 1
    meta = artifact.read_meta(tmp_path / "br" / "artifact")
    assert meta["base_experts"] == 2 and meta["model"]["n_experts"] == 3
    # the base's rows score tokens; a branch routing on prefix means cannot extend them
    prefix = tiny_config("source=math,experts=2", model__router_input="prefix_mean")
    with pytest.raises(ValueError, match="router_input: base 'token'"):
        base_model.read_base(pre / "public", prefix)


def test_upcycled_checkpoint_records_its_router_input(dense_base, tmp_path):
    from moesaic.branch_train.sparse_upcycle import upcycle_checkpoint
    meta = upcycle_checkpoint(dense_base, tmp_path / "moe", n_experts=3, top_k=2,
                              router_input="prefix_mean")
    assert meta["model"]["router_input"] == "prefix_mean" and meta["model"]["n_experts"] == 3
    base = _base_tensors(dense_base)
    moe = _base_tensors(tmp_path / "moe")
    for name in ("blocks/ffn/w_gate", "blocks/ffn/w_up", "blocks/ffn/w_down"):
        for e in range(3):  # every expert a copy of the dense FFN
            np.testing.assert_array_equal(moe[name][:, e], base[name][:, 0])
    # a job over it must route the same way
    config = tiny_config("experts=3", model__top_k=2, model__router_input="prefix_mean")
    base_model.read_base(tmp_path / "moe", config)
    config.model.router_input = "token"
    with pytest.raises(ValueError, match="router_input: base 'prefix_mean'"):
        base_model.read_base(tmp_path / "moe", config)


def test_prefix_mean_branch_over_a_dense_base(data, dense_base, code_branch, tmp_path):
    config = tiny_config("source=code", model__router_input="prefix_mean", train__steps=2)
    train(config, _job("branch", tmp_path / "br", data, dense_base))
    path = tmp_path / "br" / "artifact"
    meta = artifact.read_meta(path)
    assert meta["model"]["router_input"] == "prefix_mean"
    # same base, source and sequences as the token-routed code branch: the statistics are
    # sums of prefix means now, not of tokens
    token_path = code_branch[1] / "artifact"
    prefix_stats = checkpoint.load_tensors(path, ["stats/x_sum"])["stats/x_sum"]
    token_stats = checkpoint.load_tensors(token_path, ["stats/x_sum"])["stats/x_sum"]
    assert meta["stats_tokens"] == artifact.read_meta(token_path)["stats_tokens"]
    assert not np.allclose(prefix_stats, token_stats, rtol=1e-3)


def test_router_row_inits(tmp_path):
    stats = RouterStats(np.array([[3.0, 4.0], [0.0, 2.0]]), np.zeros((2, 2, 2)), 10, 2)
    cfg = checkpoint.model_config({"model": dict(n_layers=2, d_model=2, n_heads=1, n_kv_heads=1,
                                         n_experts=2, top_k=2)})
    router = np.array([[[1.0, 1.0], [5.0, 5.0]], [[2.0, 0.0], [5.0, 5.0]]], np.float32)
    base = base_model.Base(cfg, None, {"blocks/ffn/router": router}, {})
    config = tiny_config()

    def row_of(config, base):
        row, bias = base_model.own_router_row(config, base, stats)
        assert bias is None
        return np.asarray(row)

    config.branch.router_init = "mean_hidden"
    np.testing.assert_allclose(row_of(config, base), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    config.branch.router_init, config.branch.router_noise = "public_noise", 0.01
    row = row_of(config, base)
    assert np.abs(row - router[:, 0]).max() < 0.06 and not np.array_equal(row, router[:, 0])
    np.save(tmp_path / "v.npy", np.array([0.5, -1.0]))
    config.branch.router_init, config.branch.router_vector = "vector", str(tmp_path / "v.npy")
    np.testing.assert_array_equal(row_of(config, base), [[0.5, -1.0], [0.5, -1.0]])
    np.save(tmp_path / "v.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(3,\); need \(2,\) or \(2, 2\)"):
        base_model.own_router_row(config, base, stats)
    dense = base_model.Base(cfg.replace(n_experts=1, top_k=1), None, {}, {})
    config.branch.router_init = "public_noise"
    with pytest.raises(ValueError, match="needs an MoE base"):
        base_model.own_router_row(config, dense, stats)


def test_contrast_router_init_scores_margin_on_the_two_means():
    own = RouterStats(np.array([[30.0, 40.0], [0.0, 20.0]]), np.zeros((2, 2, 2)), 10, 2)
    public = RouterStats(np.array([[10.0, 0.0], [20.0, 20.0]]), np.zeros((2, 2, 2)), 10, 2)
    cfg = checkpoint.model_config({"model": dict(n_layers=2, d_model=2, n_heads=1, n_kv_heads=1)})
    config = tiny_config()
    config.branch.router_init, config.branch.router_margin = "contrast", 3.0
    base = base_model.Base(cfg, None, {}, {})
    with pytest.raises(ValueError, match="needs public statistics"):
        base_model.own_router_row(config, base, own)
    row, bias = (np.asarray(a) for a in base_model.own_router_row(config, base, own, public))
    own_score = np.sum(row * own.mean_hidden, -1) + bias
    public_score = np.sum(row * public.mean_hidden, -1) + bias
    np.testing.assert_allclose(own_score - public_score, 6.0, rtol=1e-5)  # 2 * margin
    assert np.all(bias <= 0)
    # Layer 0: the midpoint's score is <= 0, so the bias centres the boundary exactly.
    np.testing.assert_allclose([own_score[0], public_score[0]], [3.0, -3.0], rtol=1e-5)


def test_dense_mode_trains_everything_and_writes_a_whole_model(data, dense_base, tmp_path):
    config = tiny_config("source=code", branch__mode="dense", train__steps=2)
    config.branch.public_mix = 0.3  # read by coordinated branches only
    result = train(config, _job("dense", tmp_path, data, dense_base))
    assert result.frozen == {} and result.layout.cfg.n_experts == 1
    meta = checkpoint.read_meta(tmp_path / "artifact")
    assert meta["kind"] == artifact.DENSE_KIND and meta["source"] == "code"
    assert meta["mixture"] == "code"  # what it read, not the share it was handed
    model, _ = checkpoint.load(tmp_path / "artifact")
    base = _base_tensors(dense_base)
    embed = np.asarray(model.embed[...])
    assert embed.shape == base["embed"].shape and not np.array_equal(embed, base["embed"])
    # its data's router statistics under the base ride along, so BTX can route by them
    code_stats = checkpoint.load_tensors(tmp_path / "artifact", [
        n for n in checkpoint.tensor_metadata(tmp_path / "artifact") if n.startswith("stats/")])
    assert sorted(code_stats) == ["stats/mean_hidden", "stats/x_sum", "stats/xtx"]
    assert meta["stats_tokens"] > 0 and meta["stats_documents"] > 0
    math = tmp_path / "math"
    train(tiny_config("source=math", branch__mode="dense", train__steps=2),
          _job("dense", math, data, dense_base))
    from moesaic.merge import baselines

    btx = baselines.btx([tmp_path / "artifact", math / "artifact"], tmp_path / "btx",
                        router="centroid", top_k=1, log=lambda s: None)
    assert btx["router"]["kind"] == "centroid"
    rows = checkpoint.load_tensors(tmp_path / "btx", ["blocks/ffn/router"])["blocks/ffn/router"]
    mean = code_stats["stats/mean_hidden"]
    np.testing.assert_allclose(rows[:, 0], mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)  # centroid: the unit mean router input
    # stats_batches=0: a dense job without them (the demo's); a branch job cannot do without
    train(tiny_config("source=math", branch__mode="dense", train__steps=1,
                      branch__stats_batches=0), _job("dense", tmp_path / "bare", data, dense_base))
    bare = checkpoint.tensor_metadata(tmp_path / "bare" / "artifact")
    assert not any(n.startswith("stats/") for n in bare)
    assert "stats_tokens" not in checkpoint.read_meta(tmp_path / "bare" / "artifact")
    with pytest.raises(ValueError, match=r"stats_batches=0: a branch job needs its data's "
                                         r"router statistics"):
        train(tiny_config("source=math", branch__stats_batches=0),
              _job("branch", tmp_path / "nostats", data, dense_base))


def test_ffn_job_trains_the_ffn_in_place_and_hands_it_over_as_an_expert(data, dense_base,
                                                                        tmp_path):
    from moesaic.merge import fuse

    config = tiny_config("source=code", branch__mode="ffn", train__steps=2)
    result = train(config, _job(kinds.BRANCH_MODES["ffn"], tmp_path / "ffn", data, dense_base))
    ffn = set(names.FFN_EXPERT)
    assert set(result.layout.trainable) == ffn and not result.layout.split
    base = _base_tensors(dense_base)
    model = checkpoint.load_tensors(tmp_path / "ffn" / "model",
                                    checkpoint.tensor_metadata(tmp_path / "ffn" / "model"))
    assert checkpoint.read_meta(tmp_path / "ffn" / "model")["kind"] == artifact.DENSE_KIND
    for name, value in base.items():  # frozen bit for bit; every FFN tensor moved
        assert np.array_equal(model[name], value) == (name not in ffn), name
    # the artifact: that FFN as the expert, the untrained initial row; it merges over the base
    own = checkpoint.load_tensors(tmp_path / "ffn" / "artifact",
                          checkpoint.tensor_metadata(tmp_path / "ffn" / "artifact"))
    for name in ffn:
        np.testing.assert_array_equal(own[name], model[name])
    meta = artifact.read_meta(tmp_path / "ffn" / "artifact")
    assert meta["base_experts"] == 1 and meta["model"]["n_experts"] == 2
    merged = tmp_path / "merged"
    fuse.merge_paths(dense_base, [tmp_path / "ffn" / "artifact"], router="learned-rows",
                     top_k=2, out=merged, log=lambda *a: None)
    fused = checkpoint.load_tensors(merged, checkpoint.tensor_metadata(merged))
    for name in ffn:  # expert 0 the public FFN, expert 1 the trained one
        np.testing.assert_array_equal(fused[name][:, :1], base[name])
        np.testing.assert_array_equal(fused[name][:, 1:], model[name])
    np.testing.assert_allclose(fused["blocks/ffn/router"][:, 1], own["blocks/ffn/router"][:, 0])
    # a resume with another frozen set is refused; anything but exactly the FFN is refused
    from moesaic.configs.common import DEFAULT_FROZEN

    with pytest.raises(ValueError, match=r"branch.frozen: checkpoint"):
        train(tiny_config("source=code", branch__mode="ffn", train__steps=2,
                          branch__frozen=(*DEFAULT_FROZEN, r"^unused$")),
              _job("ffn", tmp_path / "ffn", data, dense_base))
    with pytest.raises(ValueError, match=r"leaves \['blocks/attn/k', .*\] trainable; an ffn "
                                         "job trains exactly the FFN"):
        train(tiny_config("source=code", branch__frozen=(r"^embed$",)),
              _job("ffn", tmp_path / "a", data, dense_base))
    with pytest.raises(ValueError, match=r"leaves \[\] trainable"):
        train(tiny_config("source=code", branch__frozen=(".",)),
              _job("ffn", tmp_path / "b", data, dense_base))


def test_a_wrong_base_is_named_before_any_corpus_is_built(dense_base, tmp_path, capsys):
    from moesaic.cli.main import main

    for base, message in ((tmp_path / "nowhere" / "public", "does not exist; run `moesaic "
                                                            "pretrain` first"),
                          (dense_base.parent, f"did you mean {dense_base}?")):
        argv = ["branch", "--config", "moesaic/configs/tiny.py:source=code", "--base",
                str(base), "--workdir", str(tmp_path / "w"), "--no-progress"]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "w").exists()  # no embedded corpora built for a doomed job


def test_bad_inputs_give_clear_errors(data, dense_base, code_branch, tmp_path):
    config = tiny_config("source=code")
    with pytest.raises(ValueError, match="holds a 'branch' job of another model"):
        train(tiny_config("source=code", branch__mode="dense"),
              _job("dense", code_branch[1], data, dense_base))
    with pytest.raises(FileNotFoundError, match="does not exist; run `moesaic pretrain`"):
        train(config, _job("branch", tmp_path / "a", data, tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="does not match the base .*d_model: base 32, config 48"):
        train(tiny_config("source=code", model__d_model=48, model__n_heads=2),
              _job("branch", tmp_path / "b", data, dense_base))
    with pytest.raises(ValueError, match="config.branch.source"):
        train(tiny_config(), _job("branch", tmp_path / "c", data, dense_base))

    damaged = tmp_path / "damaged"
    shutil.copytree(dense_base, damaged)
    meta = json.loads((damaged / "meta.json").read_text())
    meta["model"]["d_ff"] = 96
    (damaged / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tensor 'blocks/ffn/w_down' is .*needs"):
        train(tiny_config("source=code", model__d_ff=96),
              _job("branch", tmp_path / "d", data, damaged))

    other = tmp_path / "other_data"
    shutil.copytree(data / "code", other / "code")
    shutil.copytree(data / "public", other / "public")  # the router row's init reads it
    manifest = json.loads((other / "code" / "manifest.json").read_text())
    manifest["tokenizer"]["identity"] = "hf:0123abcd"
    (other / "code" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tokenized with 'hf:0123abcd'"):
        train(config, _job("branch", tmp_path / "e", other, dense_base))
    # the public text the router row is set from (router_init contrast) is checked the same,
    # though no batch reads it
    shutil.copytree(data / "code", other / "good" / "code")
    shutil.copytree(data / "public", other / "good" / "public")
    manifest = json.loads((other / "good" / "public" / "manifest.json").read_text())
    manifest["tokenizer"]["identity"] = "hf:0123abcd"
    (other / "good" / "public" / "manifest.json").write_text(json.dumps(manifest))
    assert float(config.branch.public_mix) == 0 and config.branch.router_init == "contrast"
    with pytest.raises(ValueError, match="'public' was tokenized with 'hf:0123abcd'"):
        train(config, _job("branch", tmp_path / "f", other / "good", dense_base))

    for key, value in (("data__seq_len", 0), ("data__global_batch", 0), ("train__steps", 0),
                       ("train__warmup_steps", -3)):
        name = key.replace("__", ".")
        with pytest.raises(ValueError, match=f"config.{name}={value}: must be a whole number"):
            train(tiny_config("source=code", **{key: value}),
                  _job("branch", tmp_path / "g", data, dense_base))
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


def test_a_diverged_run_stops_before_saving_or_handing_on(data, dense_base, tmp_path):
    with pytest.raises(ValueError, match=r"step 2: loss (nan|inf), gradient norm (nan|inf): "
                                         "training diverged"):
        train(tiny_config("source=code", train__steps=4, train__lr=1e30, train__warmup_steps=0,
                          train__log_every=10, train__ckpt_every=2),
              _job("branch", tmp_path / "nan", data, dense_base))
    assert not (tmp_path / "nan" / "artifact").exists()
    assert not (tmp_path / "nan" / "ckpt" / "2").exists()  # the diverged state is not kept


def test_router_rows_that_are_not_params_stay_frozen(data, tmp_path):
    """model.router_trainable=False: the rows are RouterState and never train."""
    config = tiny_config("experts=2", train__steps=2)
    config.model.router_trainable = False
    result = train(config, _job("pretrain", tmp_path / "p", data))
    assert "blocks/ffn/router" in result.layout.frozen
    assert "blocks/ffn/w_up" in result.layout.trainable
    saved = _base_tensors(tmp_path / "p" / "public")
    initial = checkpoint.flatten(nnx.state(Decoder(ModelConfig.from_config(config.model),
                                           rngs=nnx.Rngs(int(config.seed)))))
    # the initial rows (jitted init: equal to eager init to the last bit or so), not trained
    np.testing.assert_allclose(saved["blocks/ffn/router"], initial["blocks/ffn/router"],
                               rtol=1e-6, atol=1e-8)
    assert not np.allclose(saved["blocks/ffn/w_up"], initial["blocks/ffn/w_up"], rtol=1e-3)


def test_branch_mixture_replays_public_data_when_asked():
    config = tiny_config("source=code")
    assert kinds.job_mixture(config, "branch") == "code"
    config.branch.public_mix = 0.25
    assert kinds.job_mixture(config, "branch") == "code:0.75,public:0.25"
    assert kinds.job_mixture(config, "dense") == "code"
    assert kinds.job_mixture(config, "pretrain") == str(config.data.mixture)
    config.branch.public_mix = 1.5
    with pytest.raises(ValueError, match="public_mix=1.5"):
        kinds.job_mixture(config, "branch")


def test_resume_with_other_data_or_optimizer_settings_is_refused(data, dense_base, code_branch,
                                                                 tmp_path):
    workdir = code_branch[1]  # a finished 6-step code branch
    before = (workdir / "artifact" / "meta.json").read_text()
    lr = tiny_config().train.lr
    config = tiny_config("source=math", train__lr=lr / 2)
    config.seed = 5
    with pytest.raises(ValueError) as err:
        train(config, _job("branch", workdir, data, dense_base))
    message = str(err.value)
    for diff in ("branch.source: checkpoint 'code', config 'math'", "seed: checkpoint 0, "
                 "config 5", f"train.lr: checkpoint {lr!r}, config {lr / 2!r}"):
        assert diff in message
    assert "train.steps" not in message
    with pytest.raises(ValueError, match=r"train.steps: checkpoint 6, config 8 \(the learning "
                                         "rate decays over train.steps"):
        train(tiny_config("source=code", train__steps=8), _job("branch", workdir, data,
                                                                 dense_base))
    with pytest.raises(ValueError, match=r"branch.public_mix: checkpoint 0.0, config 0.25"):
        train(tiny_config("source=code", branch__public_mix=0.25),
              _job("branch", workdir, data, dense_base))
    other = tmp_path / "other"  # the same source name over other text
    shutil.copytree(data, other)
    shutil.rmtree(other / "code")
    from moesaic.data.prepare import write_source
    from moesaic.data.tokenizer import BYTES
    write_source(other, "code", {"train": lambda: ["x = 1\n" * 40, "y = 2\n" * 50],
                                 "heldout": lambda: ["z = 3\n" * 30]},
                 tokenizer=BYTES, origin={"kind": "test"})
    with pytest.raises(ValueError, match=r"data source 'code': content hash \w+ at the "
                                         r"checkpoint, \w+ in this job's data folder"):
        train(tiny_config("source=code"), _job("branch", workdir, other, dense_base))
    # the public text the row was set from (contrast init) is part of the job's data too
    shutil.rmtree(other / "code")
    shutil.copytree(data / "code", other / "code")
    shutil.rmtree(other / "public")
    write_source(other, "public", {"train": lambda: ["the public text, changed\n" * 60],
                                   "heldout": lambda: ["held out\n" * 30]},
                 tokenizer=BYTES, origin={"kind": "test"})
    with pytest.raises(ValueError, match=r"data source 'public': content hash"):
        train(tiny_config("source=code"), _job("branch", workdir, other, dense_base))
    assert (workdir / "artifact" / "meta.json").read_text() == before
    # what does not change the batches or the optimizer's path may change
    again = train(tiny_config("source=code", train__log_every=3, train__keep=1),
                  _job("branch", workdir, data, dense_base, write_output=False))
    assert again.step == 6 and again.losses == {}


def test_trained_router_bias_stays_on_the_clamp_side_and_can_move(data, dense_base, tmp_path):
    # On math at this lr the data first pushes the own bias up: min(b, 0) then has gradient 0,
    # and a bias left positive (0.04 and 0.02 before the projection) never came back.
    config = tiny_config("source=math", branch__router_init="mean_hidden", train__lr=1e-2,
                         train__steps=24, train__ckpt_every=24, train__log_every=24)
    result = train(config, _job("branch", tmp_path, data, dense_base, write_output=False))
    bias = np.asarray(result.trainable["blocks/ffn/bias"])
    assert bias.shape == (2, 1) and np.all(bias <= 0), bias
    assert bias.min() < -1e-3, bias  # it still learns: the data later pushes it down
    assert np.all(np.asarray(result.frozen["blocks/ffn/bias"]) == 0)  # the public expert's


def test_a_branch_without_the_negative_bias_holds_its_bias_at_zero(data, dense_base, tmp_path):
    """config.branch.negative_bias=False: no initial bias from the contrast rows and none
    learned, in the trained tree and in the artifact the merge reads; the same run with the
    bias (the default) ends with one."""
    kw = dict(train__lr=1e-2, train__steps=12, train__ckpt_every=12, train__log_every=12)
    biases = {}
    for flag in (True, False):
        config = tiny_config("source=math", branch__negative_bias=flag, **kw)
        result = train(config, _job("branch", tmp_path / str(flag), data, dense_base))
        biases[flag] = np.asarray(result.trainable["blocks/ffn/bias"])
        path = tmp_path / str(flag) / "artifact"
        handed = checkpoint.load_tensors(
            path, {n: s for n, (s, _) in checkpoint.tensor_metadata(path).items()})
        np.testing.assert_array_equal(handed["blocks/ffn/bias"], biases[flag])
    assert biases[True].min() < -1e-3, biases[True]
    assert biases[False].shape == (2, 1) and np.all(biases[False] == 0), biases[False]


def test_a_checkpoint_from_before_negative_bias_was_recorded_resumes_with_the_bias():
    config = tiny_config("source=code")
    old = config.to_dict()
    del old["branch"]["negative_bias"]  # what a checkpoint written before the key holds
    assert trainer.resume_mismatches({"config": old}, config, "branch", {}) == []
    config.branch.negative_bias = False
    assert trainer.resume_mismatches({"config": old}, config, "branch", {}) == [
        "branch.negative_bias: checkpoint True, config False"]


def test_frozen_patterns_that_a_branch_would_overrule_or_drop_are_refused(data, dense_base,
                                                                          tmp_path):
    from moesaic.configs.common import DEFAULT_FROZEN

    with pytest.raises(ValueError, match=r"leaves \['blocks/attn/k', .*\] trainable.*"
                                         "trained and then dropped"):
        train(tiny_config("source=code", branch__frozen=(r"^embed$", r"^lm_head$")),
              _job("branch", tmp_path / "a", data, dense_base))
    with pytest.raises(ValueError, match=r"'\^blocks/ffn/router\$' matches "
                                         r"'blocks/ffn/router'"):
        train(tiny_config("source=code", branch__frozen=(*DEFAULT_FROZEN,
                                                         r"^blocks/ffn/router$")),
              _job("branch", tmp_path / "b", data, dense_base))
    assert not (tmp_path / "a" / "ckpt").exists() and not (tmp_path / "b" / "ckpt").exists()
