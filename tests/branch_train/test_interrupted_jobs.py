"""A training job stopped outside its loop, resumed, or out of disk: SIGTERM before the loop or
while the output is written exits 143 with a message and leaves no output (the loop's own
SIGTERM saves and exits 0: test_pretrain.py); a resume says "resumed from step N" without a
progress bar; a saved step that cannot be restored, or whose state holds NaN, is refused by
name; a full disk while the branch artifact is written is exit 2 with a message and no
artifact. Run in process (`main`), with the signal or the write error injected; one branch
job trains (from an untrained base), the others restore its saved step."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pathlib
import shutil
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from moesaic.branch_train import setup
from moesaic.branch_train.checkpointing import JobCheckpoints, abstract_like
from moesaic.cli.main import main
from moesaic.model import checkpoint
from moesaic.model.config import ModelConfig
from tests.support.merging import make_base
from tests.support.training import TINY, make_data, overrides_argv, tiny_config

STEPS = TINY["train.steps"]  # the branch tests' program: compiled once per session
CONFIG = "moesaic/configs/tiny.py:source=code"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(data folder, an untrained base of the tiny config's shape)."""
    root = tmp_path_factory.mktemp("inputs")
    base = make_base(root / "base", ModelConfig.from_config(tiny_config("source=code").model))
    return make_data(root / "data"), base


def _branch(workdir, inputs) -> int:
    data, base = inputs
    return main(["branch", "--config", CONFIG, "--base", str(base), "--workdir", str(workdir),
                 "--data", str(data), "--no-progress", *overrides_argv()])


def _sigterm_first(fn):
    """`fn` that sends this process SIGTERM the first time it is called."""
    sent = []

    def wrapped(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)
    return wrapped


def _outputs(workdir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in workdir.glob("artifact*")) if workdir.exists() else []


def test_sigterm_before_the_training_loop_exits_143_with_a_message(inputs, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(setup, "set_up", _sigterm_first(setup.set_up))
    assert _branch(tmp_path / "w", inputs) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM before training or while writing its output" in err
    assert not (tmp_path / "w").exists() or list((tmp_path / "w").iterdir()) == []


@pytest.fixture(scope="module")
def stopped_in_write(inputs, tmp_path_factory):
    """A branch job SIGTERMed while it writes WORKDIR/artifact (its loop had finished and
    saved step STEPS): (workdir, exit code, stderr)."""
    workdir = tmp_path_factory.mktemp("stopped") / "w"
    errors = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(errors):
        patch.setattr(checkpoint, "_layer_chunks", _sigterm_first(checkpoint._layer_chunks))
        code = _branch(workdir, inputs)
    return workdir, code, errors.getvalue()


def test_sigterm_while_the_output_is_written_exits_143_and_leaves_no_output(stopped_in_write):
    workdir, code, err = stopped_in_write
    assert code == 143 and "stopped by SIGTERM" in err
    assert _outputs(workdir) == []  # no artifact, no artifact.partial
    assert (workdir / "ckpt" / str(STEPS)).is_dir()  # what the loop saved is kept


def _copy(stopped_in_write, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "w"
    shutil.copytree(stopped_in_write[0], workdir)
    return workdir


def test_a_damaged_saved_step_is_refused_by_name(stopped_in_write, inputs, tmp_path, capsys):
    workdir = _copy(stopped_in_write, tmp_path)
    next((workdir / "ckpt" / str(STEPS) / "state" / "d").iterdir()).unlink()
    assert _branch(workdir, inputs) == 2
    err = capsys.readouterr().err
    assert f"{workdir / 'ckpt' / str(STEPS)}" in err and "cannot be restored" in err
    assert _outputs(workdir) == []


def test_a_resume_says_where_it_resumed_from_and_writes_the_output(stopped_in_write, inputs,
                                                                   tmp_path, capsys):
    workdir = _copy(stopped_in_write, tmp_path)
    assert _branch(workdir, inputs) == 0
    assert f"resumed from step {STEPS}" in capsys.readouterr().out
    assert _outputs(workdir) == ["artifact"]
    checkpoint.verify(workdir / "artifact")


def test_a_restored_state_with_nan_is_refused(tmp_path):
    saved = JobCheckpoints(tmp_path, every=1, keep=1)
    state = {"params": {"w": jnp.asarray([1.0, np.nan])}, "opt": {"count": jnp.asarray(3)}}
    saved.save(1, state, {"step": 1}, force=True)
    saved.close()
    again = JobCheckpoints(tmp_path, every=1, keep=1)
    target = abstract_like(state, {"params": {"w": None}, "opt": {"count": None}})
    with pytest.raises(ValueError, match=r"ckpt/1: restored tensor 'params/w' holds NaN"):
        again.restore(1, target, check_finite=True)
    restored, _ = again.restore(1, target)  # unchecked (--no-verify) it restores
    assert np.isnan(np.asarray(restored["params"]["w"])[1])
    again.close()


def test_a_full_disk_while_the_branch_artifact_is_written_is_refused(
        stopped_in_write, inputs, tmp_path, capsys, monkeypatch):
    workdir = _copy(stopped_in_write, tmp_path)  # resumes at its last step: writes at once
    write_text = pathlib.Path.write_text

    def full(self, *args, **kwargs):
        if self.name == checkpoint.META and self.parent.name == "artifact.partial":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "write_text", full)
    assert _branch(workdir, inputs) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk while writing branch artifact" in err
    assert "Errno" not in err
    assert _outputs(workdir) == []
