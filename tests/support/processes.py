"""Subprocesses for the tests: multi-device code runs in a fresh interpreter with fake CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`), and reports back as a JSON line.

The session and its subprocesses compile with XLA:CPU's LLVM backend at -O0 (`TEST_XLA_FLAGS`,
unless XLA_FLAGS already names a level; tests/conftest.py sets it before jax starts). The
suite's programs are small and most run once, so compiling is most of their time: the model
tests took 1 min 59 s at -O0 against 2 min 54 s at the default. XLA's own graph passes (fusion
and the rest) still run; only the machine code is less optimised."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

from moesaic.launch.plan import fake_device_flags  # imports no jax

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def with_test_xla_flags(flags: str) -> str:
    """`flags` with the tests' optimisation level, unless they already name one."""
    if "xla_backend_optimization_level" in flags:
        return flags
    return f"{flags} {TEST_XLA_FLAGS}".strip()


def xla_flags(devices: int) -> str:
    """The session's XLA_FLAGS with `devices` fake CPU devices, for a subprocess."""
    return fake_device_flags(os.environ.get("XLA_FLAGS", ""), devices)


def run_python(code: str, *, devices: int = 1, timeout: int = 300, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with `devices` fake CPU devices (and the session's
    compilation cache, which tests/conftest.py puts in the environment)."""
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = xla_flags(devices)
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def last_json_line(stdout: str):
    """The last line of a subprocess's output that parses as JSON (how tests pass results)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise AssertionError(f"no JSON line in output:\n{stdout}")
