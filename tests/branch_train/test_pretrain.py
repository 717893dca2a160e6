"""Public pretraining: outputs and records, exact resume after SIGKILL, SIGTERM saves and
exits 0."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from moesaic.branch_train.checkpointing import JobCheckpoints
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
def data(tmp_path_factory) -> pathlib.Path:
    return make_data(tmp_path_factory.mktemp("data"))


def _pretrain_argv(workdir, data, **overrides) -> list[str]:
    return ["pretrain", "--config", "moesaic/configs/tiny.py", "--workdir", str(workdir),
            "--data", str(data), "--no-progress", *overrides_argv(**overrides)]


def _steps_saved(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "ckpt"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def test_pretrain_writes_the_public_model_metrics_and_resumes_a_finished_run(data, tmp_path):
    config = tiny_config()
    result = train(config, Job("pretrain", tmp_path, data, show_progress=False))
    assert result.step == 6 and not result.stopped and result.frozen == {}
    assert result.losses[6] < result.losses[1]

    meta = checkpoint.read_meta(tmp_path / "public")
    assert meta["kind"] == "public" and meta["steps"] == 6
    assert meta["tokens_seen"] == 6 * 8 * 16 and meta["model"]["d_model"] == 32
    stored = checkpoint.load_tensors(tmp_path / "public", result.trainable)
    for name, value in result.trainable.items():
        np.testing.assert_array_equal(stored[name], np.asarray(value), err_msg=name)

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [result.losses[s] for s in range(1, 7)]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records)
    assert all(0 <= r["data_wait"] <= 1 for r in records)  # share of the time waiting for data
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert JobCheckpoints(tmp_path, every=2, keep=2).latest_step() == 6

    again = train(config, Job("pretrain", tmp_path, data, show_progress=False))
    assert again.step == 6 and again.losses == {}
    assert len(read_metrics(tmp_path)) == 6


def test_sigkill_then_restart_equals_an_uninterrupted_run(data, tmp_path):
    steps = dict(train__steps=40, train__ckpt_every=5)
    reference_argv, env = moesaic_command(_pretrain_argv(tmp_path / "ref", data, **steps))
    reference = subprocess.Popen(reference_argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    argv, env = moesaic_command(_pretrain_argv(killed, data, **steps))
    victim = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not any(s >= 10 for s in _steps_saved(killed)) and victim.poll() is None:
        assert time.time() < deadline, "the job saved no checkpoint in time"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    assert not (killed / "public").exists() and max(_steps_saved(killed)) < 40

    run_moesaic(_pretrain_argv(killed, data, **steps))
    assert reference.wait(timeout=240) == 0

    curve = [(r["step"], r["loss"]) for r in read_metrics(killed)]
    assert curve == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref")]
    assert [s for s, _ in curve] == list(range(1, 41))
    names = checkpoint.tensor_metadata(killed / "public")
    resumed, uninterrupted = (checkpoint.load_tensors(w / "public", names)
                              for w in (killed, tmp_path / "ref"))
    for name in names:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


def test_sigterm_saves_a_checkpoint_and_exits_zero(data, tmp_path):
    argv, env = moesaic_command(_pretrain_argv(tmp_path, data, train__steps=100_000,
                                               train__ckpt_every=100_000))
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = _steps_saved(tmp_path)
    assert len(saved) == 1 and 3 <= saved[0] < 100_000
    assert f"stopped at step {saved[0]}" in out
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] <= saved[0]
    assert not (tmp_path / "public").exists()


def test_train_command_prints_the_loss(data, tmp_path, capsys):
    from moesaic.cli.main import main

    code = main(["train", "--workdir", str(tmp_path), "--data", str(data), "--no-progress",
                 *overrides_argv(train__steps=4)])
    out = capsys.readouterr().out
    assert code == 0
    first, last = re.search(r"loss (\S+) at step 1 -> (\S+) at step 4", out).groups()
    assert float(last) < float(first)
    assert not (tmp_path / "public").exists()


def test_data_folder_is_found_beside_the_workdir_or_the_base(data, tmp_path):
    from argparse import Namespace

    from moesaic.cli.args import data_dir

    shutil.copytree(data, tmp_path / "data")
    config = tiny_config()
    args = Namespace(data="", workdir="", embedded_size="smoke")
    assert data_dir(Namespace(**{**vars(args), "workdir": str(tmp_path / "w")}),
                    config) == tmp_path / "data"
    base = tmp_path / "pre" / "public"
    assert data_dir(Namespace(**{**vars(args), "workdir": str(tmp_path / "b" / "c")}),
                    config, base) == tmp_path / "data"
    assert data_dir(Namespace(**{**vars(args), "data": "/x"}), config, base) == pathlib.Path("/x")


def test_a_cut_short_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    from moesaic.branch_train.progress import MetricsLog

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: the last line is cut short"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with pytest.warns(UserWarning, match="cut short"):
        log = MetricsLog(tmp_path, start_step=2, total_steps=5, tokens_per_step=1,
                         show_progress=False)
    log.close()
    assert metrics.read_text() == "".join(line + "\n" for line in lines[:2])
    # only the last line may be cut: a bad line before it is damage, named with its place
    metrics.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record .* not the last"):
        MetricsLog(tmp_path, start_step=2, total_steps=5, tokens_per_step=1,
                   show_progress=False)


def test_resuming_pretraining_on_another_mixture_or_schedule_is_refused(data, tmp_path):
    config = tiny_config(train__steps=2)
    train(config, Job("pretrain", tmp_path, data, show_progress=False, write_output=False))
    with pytest.raises(ValueError, match=r"train.steps: checkpoint 2, config 4 \(the learning "
                                         r"rate decays over train.steps.*\); data.mixture: "
                                         r"checkpoint 'public', config 'code'\. Resume"):
        train(tiny_config(train__steps=4, data__mixture="code"),
              Job("pretrain", tmp_path, data, show_progress=False))
    with pytest.raises(ValueError, match=r"train.warmup_steps: checkpoint 1, config 2"):
        train(tiny_config(train__steps=2, train__warmup_steps=2),
              Job("pretrain", tmp_path, data, show_progress=False))
