"""The merge on a real branch from the branch job (tiny shapes, two steps): learned rows
as trained, and a ridge router whose public statistics come from --public-data. (Opt-out
and join equalities are tested on synthetic branches in test_merge.py.)"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from moesaic.branch_train import artifact
from moesaic.branch_train.trainer import Job, train
from moesaic.cli.main import main
from moesaic.model import checkpoint
from tests.support.training import make_data, tiny_config


def _job(kind, workdir, data, base=None) -> Job:
    return Job(kind, pathlib.Path(workdir), pathlib.Path(data), base=base, show_progress=False)


@pytest.mark.slow
def test_real_branch_merges_with_learned_rows_and_ridge(tmp_path):
    data = make_data(tmp_path / "data")
    train(tiny_config(train__steps=2), _job("pretrain", tmp_path / "pre", data))
    base = tmp_path / "pre" / "public"
    train(tiny_config("source=code", train__steps=2), _job("branch", tmp_path / "code", data,
                                                         base))
    branch = tmp_path / "code" / "artifact"
    argv = ["merge", "--base", str(base), "--branch", str(branch), "--top-k", "2"]
    assert main([*argv, "--router", "learned-rows", "--out", str(tmp_path / "rows")]) == 0
    merged = checkpoint.load_tensors(tmp_path / "rows", ["blocks/ffn/router", "blocks/ffn/w_up"])
    own = checkpoint.load_tensors(branch, artifact.OWN_TENSORS)
    np.testing.assert_array_equal(merged["blocks/ffn/router"][:, 1:], own["blocks/ffn/router"])
    np.testing.assert_array_equal(merged["blocks/ffn/router"][:, :1], 0)
    np.testing.assert_array_equal(merged["blocks/ffn/w_up"][:, 1:], own["blocks/ffn/w_up"])
    assert main([*argv, "--router", "ridge", "--public-data", str(data), "--out",
                 str(tmp_path / "ridge")]) == 0
    meta = checkpoint.read_meta(tmp_path / "ridge")
    assert meta["merge"]["public_stats"] and meta["merge"]["public_stats_tokens"] > 0
    model, _ = checkpoint.load(tmp_path / "ridge")
    logits, _ = model(np.arange(16, dtype=np.int32).reshape(1, 16))
    assert np.isfinite(np.asarray(logits)).all()
