"""Every load verified: a base or a model whose tensors no longer match the fingerprint in its
meta.json (one flipped bit), or that holds NaN, is refused by `moesaic branch` and `moesaic
eval` with exit code 2 and a message naming it, before anything is written; `--no-verify`
skips the check. Before, `branch --base` on a flipped bit exited 0 (the merge then blamed the
party), `eval` printed numbers, and a NaN base was reported as a diverged run."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from moesaic.branch_train.trainer import Job, train
from moesaic.model import checkpoint
from tests.support.training import make_data, overrides_argv, run_moesaic, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    data = make_data(root / "data")
    train(tiny_config(train__steps=2), Job("pretrain", root / "pre", data, show_progress=False))
    return root, data, root / "pre" / "public"


def _altered(base: pathlib.Path, out: pathlib.Path, change, *, refingerprint: bool) -> None:
    """A copy of `base` with `change(flat)` applied; its meta keeps the old fingerprint (a
    damaged copy) unless `refingerprint`."""
    flat = checkpoint.load_tensors(base, checkpoint.tensor_metadata(base))
    change(flat)
    meta = checkpoint.read_meta(base)
    if refingerprint:
        meta = meta | {"fingerprint": checkpoint.fingerprint(flat)}
    checkpoint.save(out, flat, meta)


def _flip_sign(flat) -> None:
    flat["embed"] = flat["embed"].copy()
    flat["embed"][3, 5] = -flat["embed"][3, 5]  # one bit: the sign of one value


def _nan(flat) -> None:
    flat["blocks/attn/q"] = flat["blocks/attn/q"].copy()
    flat["blocks/attn/q"][1, 2] = np.nan


def test_verify_passes_an_intact_checkpoint_and_names_what_is_wrong(setup, tmp_path):
    _, _, base = setup
    checkpoint.verify(base)
    _altered(base, tmp_path / "flipped", _flip_sign, refingerprint=False)
    with pytest.raises(ValueError, match="is damaged: its tensors do not match the fingerprint"):
        checkpoint.verify(tmp_path / "flipped", "base")
    _altered(base, tmp_path / "nan", _nan, refingerprint=True)
    with pytest.raises(ValueError, match=r"tensor 'blocks/attn/q' holds NaN or Inf \(first at "
                                         r"index \(1, 2, 0, 0\)\)"):
        checkpoint.verify(tmp_path / "nan", "base")


BRANCH = ["--config", "moesaic/configs/tiny.py:source=code"]


@pytest.mark.parametrize("change, message", [
    (_flip_sign, "is damaged: its tensors do not match the fingerprint"),
    (_nan, "holds NaN or Inf"),
])
def test_branch_refuses_a_damaged_or_non_finite_base_and_writes_nothing(setup, tmp_path,
                                                                        change, message):
    _, data, base = setup
    _altered(base, tmp_path / "base", change, refingerprint=change is _nan)
    argv = ["branch", *BRANCH, "--base", str(tmp_path / "base"), "--workdir",
            str(tmp_path / "w"), "--data", str(data), "--no-progress",
            *overrides_argv(train__steps=2)]
    proc = run_moesaic(argv, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "diverged" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_branch_no_verify_trains_on_a_base_it_is_told_to_trust(setup, tmp_path):
    _, data, base = setup
    _altered(base, tmp_path / "base", _flip_sign, refingerprint=False)
    proc = run_moesaic(["branch", *BRANCH, "--base", str(tmp_path / "base"), "--workdir",
                        str(tmp_path / "w"), "--data", str(data), "--no-progress", "--no-verify",
                        *overrides_argv(train__steps=2)])
    assert proc.returncode == 0


def test_eval_refuses_a_damaged_model_unless_told_not_to_verify(setup, tmp_path):
    _, data, base = setup
    _altered(base, tmp_path / "model", _flip_sign, refingerprint=False)
    argv = ["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--no-progress",
            "--max-sequences", "2"]
    proc = run_moesaic(argv, check=False)
    assert proc.returncode == 2
    assert "--model" in proc.stderr and "is damaged" in proc.stderr
    assert run_moesaic([*argv, "--no-verify"]).returncode == 0
