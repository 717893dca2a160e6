"""The config fields with a meaning are refused out of their range, naming the field, before a
job writes anything; every shipped config and every demo job is within range."""

from __future__ import annotations

import pathlib

import pytest

from moesaic.configs import demo, loading, tiny, validate
from tests.support.training import make_data, run_moesaic

ROOT = pathlib.Path(__file__).resolve().parents[2]
# every shipped config file (a module of configs/ that defines get_config)
CONFIGS = sorted(p for p in (ROOT / "moesaic/configs").glob("*.py")
                 if "\ndef get_config(" in p.read_text() and p.name != "manifest_example.py")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_in_range(path):
    validate.check(loading.load_config_file(str(path)))


@pytest.mark.parametrize("job", ["pretrain", "branch", "dense", "ffn", "moe-all"])
def test_every_demo_job_is_in_range(job):
    source = "" if job in ("pretrain", "moe-all") else ",source=code"
    validate.check(demo.get_config(f"preset=smoke,job={job}{source}"))


BAD = [("train.lr", -0.001), ("train.lr", 0.0), ("train.lr", float("nan")),
       ("train.ckpt_every", 0), ("train.log_every", 0), ("train.keep", 0),
       ("train.steps", 0), ("train.warmup_steps", -3), ("train.min_lr_ratio", 1.5),
       ("train.b2", 1.0), ("train.weight_decay", -0.1), ("train.clip", -1.0),
       ("data.seq_len", 0), ("data.global_batch", 0), ("branch.public_mix", 1.0),
       ("branch.router_noise", -0.5), ("branch.stats_batches", -1), ("train.microbatches", 0)]
# (a value of the wrong type never gets this far: ConfigDict and the command line refuse it)


@pytest.mark.parametrize("key, value", BAD)
def test_a_value_out_of_range_is_refused_by_name(key, value):
    config = tiny.get_config("source=code")
    section, field = key.split(".")
    with config.unlocked():
        config[section][field] = value
    with pytest.raises(ValueError, match=rf"^config\.{key}={value!r}: must be ".replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[")):
        validate.check(config)


def test_the_command_refuses_a_negative_learning_rate_and_writes_nothing(tmp_path):
    """Before, --config.train.lr=-0.001 trained 40 steps (loss 2.94 -> 9.54) and the merge
    took the artifact."""
    data = make_data(tmp_path / "data")
    proc = run_moesaic(["pretrain", "--config", "moesaic/configs/tiny.py", "--workdir",
                        str(tmp_path / "run"), "--data", str(data), "--no-progress",
                        "--config.train.lr=-0.001"], check=False)
    assert proc.returncode == 2
    assert "config.train.lr=-0.001: must be a number > 0" in proc.stderr
    assert not (tmp_path / "run").exists()
