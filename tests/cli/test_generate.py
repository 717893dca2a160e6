"""`moesaic generate`: text from a saved model, and the bad inputs it refuses (exit 2)."""

from __future__ import annotations

import json

import pytest
from flax import nnx

from moesaic.cli import main as cli
from moesaic.model import ModelConfig, checkpoint
from moesaic.model.transformer import Decoder


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, n_experts=2,
                      top_k=1, router_input="prefix_mean")
    path = tmp_path_factory.mktemp("generate") / "model"
    checkpoint.save_model(path, Decoder(cfg, rngs=nnx.Rngs(0)),
                          {"config": {"data": {"seq_len": 24}}})
    return str(path)


def test_generates_from_prompts_and_writes_json(model_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc\n\nline\\ntwo\n")
    out = tmp_path / "out.json"
    code = cli.main(["generate", "--model", model_path, "--prompts", str(prompts), "--prompt",
                     "xyz", "--max-new-tokens", "5", "--temperature", "0.7", "--seed", "1",
                     "--json", str(out), "--no-progress"])
    assert code == 0
    record = json.loads(out.read_text())
    assert [c["prompt"] for c in record["completions"]] == ["xyz", "abc", "line\ntwo"]
    assert "decode" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--prompts", "EMPTY"], "holds no prompt"),
    (["--prompts", "MISSING"], "no such file"),
    (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", "a" * 20, "--max-new-tokens", "5"], "more than the context of 24"),
    (["--prompt", "a", "--top-p", "0"], "--top-p"),
])
def test_bad_input_is_refused_with_exit_2(model_path, tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").write_text("\n  \n")
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    if "--max-new-tokens" not in args:
        args += ["--max-new-tokens", "3"]
    assert cli.main(["generate", "--model", model_path, *args]) == 2
    assert message in capsys.readouterr().err
