"""`moesaic data prepare` is all or nothing over its sources, never replaces a prepared source
unless told to (--overwrite), cleans the temporary folders of runs that were killed, and
refuses a full disk (an injected ENOSPC) with DATA_DIR as it was; an unreadable JSONL line is
skipped with json's whole message; and `moesaic eval` refuses a prepared source whose TFDS
folder was deleted or cut short, naming it. Each refusal: exit code 2, the message, and
nothing written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moesaic.cli.main import main
from moesaic.data import prepare
from moesaic.model.config import ModelConfig
from tests.support.merging import make_base
from tests.support.training import tiny_config


def _folder(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        words = [str(w) for w in rng.integers(0, 10**6, size=int(rng.integers(30, 60)))]
        (path / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    return path


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep-src")
    empty = root / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    return {"a": _folder(root / "a"), "b": _folder(root / "b", seed=1), "empty": empty}


def _prepare(out, *specs, extra=()):
    argv = ["data", "prepare", "--out", str(out), "--heldout-fraction", "0.2", *extra]
    for spec in specs:
        argv += ["--source", spec]
    return main(argv)


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_every_source_is_checked_before_the_first_is_written(srcs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _prepare(out, f"a={srcs['a']}", f"e={srcs['empty']}") == 2
    assert "source 'e': no documents" in capsys.readouterr().err
    assert not out.exists()  # 'a', first and valid, was not written either


def test_a_prepared_source_is_replaced_only_with_overwrite(srcs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _prepare(out, f"a={srcs['a']}") == 0
    before = (out / "a" / "manifest.json").read_text()
    capsys.readouterr()
    assert _prepare(out, f"b={srcs['b']}", f"a={srcs['b']}") == 2
    err = capsys.readouterr().err
    assert "source(s) a already prepared" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # b was not written either
    assert (out / "a" / "manifest.json").read_text() == before
    assert _prepare(out, f"a={srcs['b']}", extra=["--overwrite"]) == 0
    assert (out / "a" / "manifest.json").read_text() != before


def test_the_leftovers_of_a_killed_run_are_removed(srcs, tmp_path, capsys):
    out = tmp_path / "out"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = out / f".x.tmp-{int(gone.stdout)}"  # a process that has ended
    alive = out / f".y.tmp-{os.getpid()}"  # a run still going: not touched
    for folder in (dead, alive):
        (folder / "scratch").mkdir(parents=True)
    assert _prepare(out, f"a={srcs['a']}") == 0
    assert f"removed {dead}" in capsys.readouterr().out
    assert not dead.exists() and alive.exists()


def test_a_full_disk_is_refused_and_leaves_data_dir_as_it_was(srcs, tmp_path, capsys,
                                                              monkeypatch):
    out = tmp_path / "out"
    assert _prepare(out, f"a={srcs['a']}") == 0
    before = {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()}

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(prepare.np, "save", full)  # the index, written after the records
    capsys.readouterr()
    assert _prepare(out, f"b={srcs['b']}", f"a={srcs['b']}", extra=["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk while writing --out" in err and "Errno" not in err
    assert {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()} == before


def test_an_unreadable_jsonl_line_is_named_with_the_whole_json_error(tmp_path, capsys):
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(30)]
    lines[3] = '{"text": "a raw\ttab"}'  # a control character inside a JSON string
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    assert _prepare(tmp_path / "out", f"c={tmp_path / 'c.jsonl'}") == 0
    printed = capsys.readouterr().out
    assert ("skipped c.jsonl:4: invalid JSON: Invalid control character at: column 16 "
            "(char 15)") in printed


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_eval_refuses_a_source_whose_tfds_folder_is_damaged(srcs, tmp_path, capsys, damage):
    data = tmp_path / "data"
    assert _prepare(data, f"a={srcs['a']}") == 0
    tfds_dir = data / "a" / "moesaic_tokens"
    if damage == "deleted":
        shutil.rmtree(tfds_dir)
    else:
        for record_file in tfds_dir.rglob("*heldout.array_record*"):
            record_file.write_bytes(record_file.read_bytes()[:1000])
    model = make_base(tmp_path / "model", ModelConfig.from_config(tiny_config().model))
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--data", str(data), "--no-progress",
                 "--json", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert f"prepared source 'a' in {str(data)!r} is damaged" in err
    assert not (tmp_path / "out.json").exists()
