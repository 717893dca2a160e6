"""Shared test helpers. Multi-device code runs in a subprocess with fake CPU devices.

The session keeps one XLA persistent compilation cache, which the subprocesses share: the smoke
demo's four branches (and four dense experts) compile the same programs, and with the cache
its run takes 93 s instead of 162 s. Unlike the `moesaic` command, the session leaves glibc's
allocator as it is (moesaic.launch.host_memory): its models are small, and keeping freed
memory measured slower for them (the smoke demo 123 s against 113 s).

The session and its subprocesses compile with XLA:CPU's LLVM backend at -O0 (`TEST_XLA_FLAGS`,
unless XLA_FLAGS already names a level). The suite's programs are small and most run once, so
compiling is most of their time: tests/test_model.py took 1 min 59 s at -O0 against 2 min 54 s
at the default. XLA's own graph passes (fusion and the rest) still run; only the machine code
is less optimised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402  (after XLA_FLAGS, which the backend reads when it starts)
import pytest  # noqa: E402

from moesaic.launch.plan import fake_device_flags  # noqa: E402  (imports no jax)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
    """The session's XLA_FLAGS with `devices` fake CPU devices, for a subprocess."""
    return fake_device_flags(os.environ.get("XLA_FLAGS", ""), devices)


def run_python(code: str, *, devices: int = 1, timeout: int = 300, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with `devices` fake CPU devices."""
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = xla_flags(devices)
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
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


@pytest.fixture
def devices_subprocess():
    return run_python


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("xla-cache"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # the subprocesses'
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield path
