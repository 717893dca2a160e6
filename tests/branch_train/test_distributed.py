"""The branch job across devices and processes: 8 fake devices give the loss of one, and
two processes over loopback train a branch whose checkpoint restores in one process."""

from __future__ import annotations

import pathlib
import socket
import subprocess

import numpy as np
import pytest

from moesaic.branch_train import artifact
from moesaic.branch_train.progress import read_metrics
from moesaic.branch_train.trainer import Job, train
from moesaic.model import checkpoint
from tests.support.training import (
    ROOT,
    make_data,
    moesaic_command,
    overrides_argv,
    run_moesaic,
    tiny_config,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, a dense base, and the one-device reference branch run (losses per step)."""
    root = tmp_path_factory.mktemp("dist")
    data = make_data(root / "data")
    train(tiny_config(train__steps=3), Job("pretrain", root / "pre", data, show_progress=False))
    base = root / "pre" / "public"
    reference = train(tiny_config("source=code"),
                      Job("branch", root / "ref", data, base=base, show_progress=False))
    return data, base, reference.losses


def _branch_argv(workdir, data, base, **overrides) -> list[str]:
    return ["branch", "--config", "moesaic/configs/tiny.py:source=code", "--base", str(base),
            "--workdir", str(workdir), "--data", str(data), "--no-progress",
            *overrides_argv(**overrides)]


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def test_eight_devices_give_the_loss_of_one(setup, tmp_path):
    data, base, reference = setup
    proc = run_moesaic(_branch_argv(tmp_path, data, base, mesh__data=2, mesh__fsdp=2,
                                    mesh__tensor=2), devices=8)
    assert "('fsdp', 'tensor')" in proc.stdout  # lm_head (D, V), as the overview prints it
    losses = _losses(tmp_path)
    assert sorted(losses) == sorted(reference)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [reference[s] for s in sorted(reference)], rtol=2e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_a_branch_that_restores_in_one(setup, tmp_path):
    data, base, reference = setup
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(2):
        argv, env = moesaic_command(_branch_argv(tmp_path, data, base) + [
            "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(rank)])
        procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"

    losses = _losses(tmp_path)
    np.testing.assert_allclose([losses[s] for s in sorted(reference)],
                               [reference[s] for s in sorted(reference)], rtol=2e-5)
    restored = train(tiny_config("source=code"), Job(
        "branch", tmp_path, data, base=base, show_progress=False, write_output=False))
    assert restored.step == 6 and restored.losses == {}
    stored = checkpoint.load_tensors(tmp_path / "artifact", artifact.OWN_TENSORS)
    for name in artifact.OWN_TENSORS:
        np.testing.assert_array_equal(np.asarray(restored.trainable[name]), stored[name])


def test_an_ffn_job_on_eight_devices_hands_over_what_one_device_does(setup, tmp_path):
    """An uncoordinated (ffn) job sharded over data, fsdp and tensor axes: the losses, the
    trained FFN and the handed-over row, bias and hashes are those of the one-device run."""
    data, base, _ = setup
    one = train(tiny_config("source=code", branch__mode="ffn"),
                Job("ffn", tmp_path / "one", data, base=base, show_progress=False))
    run_moesaic(_branch_argv(tmp_path / "eight", data, base, branch__mode="ffn", mesh__data=2,
                             mesh__fsdp=2, mesh__tensor=2), devices=8)
    losses = _losses(tmp_path / "eight")
    np.testing.assert_allclose([losses[s] for s in sorted(one.losses)],
                               [one.losses[s] for s in sorted(one.losses)], rtol=2e-5)
    metas = [artifact.read_meta(tmp_path / run / "artifact") for run in ("one", "eight")]
    assert metas[0]["frozen_hashes"] == metas[1]["frozen_hashes"]
    tensors = [checkpoint.load_tensors(tmp_path / run / "artifact", artifact.OWN_TENSORS)
               for run in ("one", "eight")]
    for name in artifact.OWN_TENSORS:
        np.testing.assert_allclose(tensors[1][name], tensors[0][name], rtol=1e-4, atol=1e-6)
