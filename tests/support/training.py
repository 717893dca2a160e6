"""Helpers of the training tests (tests/branch_train/ and the tests that train a model): a tiny
config, a tiny prepared data folder, and the `moesaic` command run as a subprocess (with the
session's compilation cache, which tests/conftest.py puts in the environment)."""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import sys

from moesaic.configs import tiny
from moesaic.data.prepare import write_source
from moesaic.data.tokenizer import BYTES
from tests.support.processes import ROOT, xla_flags

# The shapes every training test uses: small enough to compile and run in seconds.
TINY = {
    "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 2,
    "model.d_ff": 64, "data.seq_len": 16, "data.global_batch": 8, "train.steps": 6,
    "train.warmup_steps": 1, "train.log_every": 1, "train.ckpt_every": 2, "train.keep": 2,
    "branch.stats_batches": 2,
}


def tiny_config(arg: str | None = None, **overrides):
    """tiny.py with TINY shapes; `overrides` use '__' for '.' (train__steps=4)."""
    config = tiny.get_config(arg)
    for key, value in {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def overrides_argv(**overrides) -> list[str]:
    """TINY plus `overrides` as --config.a.b=v arguments."""
    merged = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"--config.{k}={v}" for k, v in merged.items()]


def _documents(seed: int, alphabet: str, n: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7)))
                     for _ in range(rng.randint(20, 60))) for _ in range(n)]


def make_data(out_dir: pathlib.Path) -> pathlib.Path:
    """Sources public, code and math (byte tokenizer), a few KB each."""
    sources = {"public": (0, "abcdefghij"), "code": (1, "(){}=+-_:;abc"),
               "math": (2, "0123456789+=")}
    for name, (seed, alphabet) in sources.items():
        docs = _documents(seed, alphabet)
        splits = {"train": lambda d=docs: d[4:], "heldout": lambda d=docs: d[:4]}
        write_source(out_dir, name, splits, tokenizer=BYTES, origin={"kind": "test"})
    return out_dir


def moesaic_command(args: list[str], *, devices: int = 1, env: dict | None = None
                    ) -> tuple[list[str], dict]:
    """(argv, env) to run `moesaic ARGS` in a subprocess with `devices` fake CPU devices."""
    full_env = dict(os.environ)
    full_env.update(XLA_FLAGS=xla_flags(devices),
                    JAX_PLATFORMS="cpu",
                    PYTHONPATH=str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return [sys.executable, "-m", "moesaic.cli.main", *args], full_env


def run_moesaic(args: list[str], *, devices: int = 1, timeout: int = 240,
                check: bool = True) -> subprocess.CompletedProcess:
    argv, env = moesaic_command(args, devices=devices)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"moesaic {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc
