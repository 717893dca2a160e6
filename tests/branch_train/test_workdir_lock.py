"""One job per workdir: a second job refuses while the first runs, a lock whose job is gone is
reclaimed, and the lock is given back however a job ends."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess

import pytest

from moesaic.branch_train.trainer import Job, train
from moesaic.branch_train.workdir_lock import LOCK
from tests.support.training import make_data, run_moesaic, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    return make_data(tmp_path_factory.mktemp("lock") / "data")


def _hold(workdir: pathlib.Path, pid: int, host: str | None = None) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / LOCK).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                            "since": "2026-12-06 10:00:00"}))


def _job(workdir, data) -> Job:
    return Job("pretrain", workdir, data, show_progress=False)


def test_a_second_job_on_a_workdir_in_use_is_refused_and_writes_nothing(data, tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _hold(tmp_path / "w", holder.pid)
        proc = run_moesaic(["pretrain", "--config", "moesaic/configs/tiny.py", "--workdir",
                            str(tmp_path / "w"), "--data", str(data), "--no-progress",
                            *(f"--config.{k}" for k in ("train.steps=2", "model.d_model=32",
                                                         "model.d_ff=64", "data.seq_len=16",
                                                         "data.global_batch=4"))],
                           check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert f"is in use by another job (pid {holder.pid} on this host" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [LOCK]  # nothing else


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(data, tmp_path):
    _hold(tmp_path / "w", 1234, host="some-other-host")
    with pytest.raises(ValueError, match=r"pid 1234 on host some-other-host.*if that job is "
                                         r"gone, delete .*\.moesaic-lock"):
        train(tiny_config(train__steps=2), _job(tmp_path / "w", data))


def test_a_stale_lock_is_reclaimed_and_every_job_gives_its_lock_back(data, tmp_path, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid names no process now
    _hold(tmp_path / "w", gone.pid)
    result = train(tiny_config(train__steps=2), _job(tmp_path / "w", data))
    assert result.step == 2
    assert f"reclaiming the lock of job pid {gone.pid}" in capsys.readouterr().out
    assert not (tmp_path / "w" / LOCK).exists()
    with pytest.raises(ValueError, match="lr=-1.0"):  # refused before the lock: none left
        train(tiny_config(train__lr=-1.0), _job(tmp_path / "v", data))
    assert not (tmp_path / "v").exists()
