"""The low-rank branch: frozen by construction (the optimizer state holds only the expert's
A and B, the row and the bias), its artifact, and bad settings named."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from moesaic.branch_train import artifact
from moesaic.branch_train.trainer import Job, train
from moesaic.model import checkpoint, lora, names
from tests.support.training import make_data, tiny_config


def _job(kind, workdir, data, base=None) -> Job:
    return Job(kind, pathlib.Path(workdir), pathlib.Path(data), base=base, show_progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = make_data(tmp_path_factory.mktemp("data"))
    pre = tmp_path_factory.mktemp("pretrain")
    train(tiny_config(train__steps=2), _job("pretrain", pre, data))
    workdir = tmp_path_factory.mktemp("lora")
    config = tiny_config("source=code", train__steps=3)
    config.branch.mode = "lora"
    config.branch.lora.rank = 4
    config.branch.lora.targets = ("q", "v", "gate", "down")
    return data, pre / "public", workdir, train(config, _job("lora", workdir, data, pre / "public"))


def test_only_the_adapters_and_the_row_train(trained):
    _, base_path, workdir, result = trained
    base = checkpoint.load_tensors(base_path, checkpoint.tensor_metadata(base_path))
    layout = result.layout
    want = set(lora.tensor_names(("q", "v", "gate", "down")))
    assert set(layout.trainable) == want and set(layout.split) == {names.ROUTER, names.BIAS}
    assert set(base) <= set(layout.frozen)
    for name in base:  # frozen bit for bit
        np.testing.assert_array_equal(np.asarray(result.frozen[name]), base[name], err_msg=name)
    shapes = {n: tuple(a.shape) for n, a in result.trainable.items()}
    assert shapes[lora.tensor_name("gate", "a")] == (2, 1, 32, 4)
    assert shapes[names.ROUTER] == (2, 1, 32)
    opt_dicts = [node for node in jax.tree.leaves(
        result.opt_state, is_leaf=lambda x: isinstance(x, dict)) if isinstance(node, dict)]
    assert len(opt_dicts) == 2  # Adam's mu and nu, over exactly the trainable leaves
    for tree in opt_dicts:
        assert {n: tuple(a.shape) for n, a in tree.items()} == shapes
    opt_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.opt_state))
    assert opt_size - 2 * layout.counts()["trainable"] < 8
    assert not np.any(np.asarray(result.trainable[lora.tensor_name("q", "b")]) == 0), \
        "B did not train"

    meta = artifact.read_meta(workdir / "artifact")
    stored = checkpoint.tensor_metadata(workdir / "artifact")
    assert set(stored) == want | {names.ROUTER, names.BIAS, *artifact.STATS}
    assert meta["model"]["lora_experts"] == 1 and meta["model"]["lora_rank"] == 4
    assert set(meta["frozen_hashes"]) >= set(base)


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
