"""Every command that reads a checkpoint refuses a damaged one before it writes anything: a
flipped bit (its tensors no longer match the fingerprint in its meta.json), a NaN (named as
such, not as a diverged run), and Orbax files that cannot be read (params/_METADATA or
manifest.ocdbt damaged, a params/d/* file missing). Each refusal is exit code 2, names the
checkpoint and what is damaged, and leaves the output folder as it was; --no-verify lets a
user who knows past the fingerprint check. Run in process (`main`): nothing compiles before
the refusal."""

from __future__ import annotations

import errno
import json
import pathlib
import shutil

import numpy as np
import pytest

from moesaic.cli.main import main
from moesaic.merge import fuse
from moesaic.model import checkpoint
from moesaic.model.config import ModelConfig
from tests.support.merging import make_base, make_branch, rewrite
from tests.support.training import TINY, make_data, overrides_argv, tiny_config

BRANCH_CONFIG = ["--config", "moesaic/configs/tiny.py:source=code"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny training config's shapes (byte tokenizer, so data and branch jobs fit): a
    base, two branches, their merged model, a data folder; and damaged copies of the base
    and the merged model."""
    root = tmp_path_factory.mktemp("integrity")
    cfg = ModelConfig.from_config(tiny_config().model)
    base = make_base(root / "base", cfg)
    branches = {s: make_branch(base, root / f"b_{s}", s, seed)
                for seed, s in enumerate(["code", "math", "law"], start=1)}
    merged = root / "merged"
    fuse.merge_paths(base, [branches["code"], branches["math"]], router="learned-rows",
                     top_k=1, out=merged, log=lambda s: None)
    damaged = {}
    for name, path in (("base", base), ("merged", merged)):
        for how, damage in DAMAGES.items():
            copy = root / f"{name}_{how}"
            damage(path, copy)
            damaged[name, how] = copy
    return {"root": root, "data": make_data(root / "data"), "branches": branches,
            "base": base, "merged": merged, "damaged": damaged}


def _flip(path, out):  # one bit: the sign of one value of a shared tensor
    def change(flat):
        flat["embed"] = flat["embed"].copy()
        flat["embed"][3, 5] = -flat["embed"][3, 5]
    rewrite(path, out, change)


def _nan(path, out):
    def change(flat):
        flat["blocks/attn/q"] = flat["blocks/attn/q"].copy()
        flat["blocks/attn/q"][1, 2] = np.nan
    rewrite(path, out, change)


def _file_damage(edit):
    def damage(path, out):
        shutil.copytree(path, out)
        edit(out / checkpoint.PARAMS)
    return damage


DAMAGES = {
    "flip": _flip,
    "nan": _nan,
    "metadata": _file_damage(lambda p: (p / "_METADATA").write_text('{"tree_metadata": ')),
    "manifest": _file_damage(lambda p: (p / "manifest.ocdbt").write_bytes(b"\0" * 40)),
    "d_file": _file_damage(lambda p: next((p / "d").iterdir()).unlink()),
}
SAYS = {  # what the refusal says, besides the checkpoint's path
    "flip": "do not match",
    "nan": "holds NaN or Inf",
    "metadata": "params/_METADATA is not valid JSON",
    "manifest": "params/manifest.ocdbt",
    "d_file": "params/d/",
}


def _argv(command: str, path: pathlib.Path, inputs: dict, out: pathlib.Path) -> list[str]:
    """`command` reading the checkpoint `path` in the role it reads a checkpoint in."""
    data, b = str(inputs["data"]), inputs["branches"]
    return {
        "eval": ["eval", "--model", str(path), "--data", data, "--no-progress",
                 "--max-sequences", "1", "--json", str(out)],
        "export-hf": ["export-hf", str(path), "--out", str(out), "--drop-router-bias"],
        "tune-router": ["tune-router", str(path), "--data", data, "--source", "public",
                        "--steps", "1", "--out", str(out)],
        "merge remove": ["merge", "remove", str(path), "--source", "math", "--out", str(out)],
        "merge add": ["merge", "add", str(path), "--branch", str(b["law"]), "--out", str(out)],
        "merge": ["merge", "--base", str(path), "--branch", str(b["code"]), "--router",
                  "learned-rows", "--out", str(out)],
        "branch": ["branch", *BRANCH_CONFIG, "--base", str(path), "--workdir", str(out),
                   "--data", data, "--no-progress", *overrides_argv()],
    }[command]


READS_BASE = ("merge", "branch")  # the others read the merged model
CASES = [(c, d) for c in ("eval", "export-hf", "tune-router", "merge remove", "merge add",
                          "merge", "branch") for d in ("flip", "nan")]
CASES += [(c, d) for c in ("eval", "merge", "merge remove", "branch")
          for d in ("metadata", "manifest", "d_file")]


@pytest.mark.parametrize("command, damage", CASES, ids=[f"{c}-{d}" for c, d in CASES])
def test_a_damaged_checkpoint_is_refused_by_every_command_that_reads_one(
        inputs, tmp_path, capsys, command, damage):
    path = inputs["damaged"]["base" if command in READS_BASE else "merged", damage]
    out = tmp_path / "out"
    assert main(_argv(command, path, inputs, out)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and SAYS[damage] in err, err
    assert "diverged" not in err and "AttributeError" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written: no output, no .partial


def test_no_verify_goes_past_the_fingerprint_for_a_user_who_knows(inputs, tmp_path, capsys):
    flipped = inputs["damaged"]["merged", "flip"]
    assert main(["export-hf", str(flipped), "--out", str(tmp_path / "hf"),
                 "--drop-router-bias", "--no-verify"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_experts"] == 3
    # a damaged file is refused even then: the tensors cannot be read at all
    assert main(["export-hf", str(inputs["damaged"]["merged", "d_file"]), "--out",
                 str(tmp_path / "hf2"), "--no-verify"]) == 2
    assert "params/d/" in capsys.readouterr().err and not (tmp_path / "hf2").exists()


def test_the_intact_inputs_pass_the_same_checks(inputs, tmp_path):
    """The refusals above come from the damage, not from the inputs or the flags."""
    checkpoint.verify(inputs["base"])
    checkpoint.verify(inputs["merged"])
    assert main(["export-hf", str(inputs["merged"]), "--out", str(tmp_path / "hf"),
                 "--drop-router-bias"]) == 0
    assert main(["merge", "remove", str(inputs["merged"]), "--source", "math", "--out",
                 str(tmp_path / "r")]) == 0
    assert TINY["model.d_ff"] == checkpoint.read_meta(inputs["base"])["model"]["d_ff"]


def test_a_full_disk_in_export_hf_is_refused_and_keeps_the_previous_output(inputs, tmp_path,
                                                                           capsys, monkeypatch):
    from moesaic.interop import hf_export

    out = tmp_path / "hf"
    argv = ["export-hf", str(inputs["merged"]), "--out", str(out), "--drop-router-bias"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr(hf_export, "save_file", full)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"no space left on the disk while writing --out {out}" in err and "Errno" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no hf.partial
