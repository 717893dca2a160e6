"""The suite's fixtures. Helpers live in tests/support/ (imported as `tests.support.NAME`).

One XLA persistent compilation cache serves the whole session and its subprocesses: the smoke
demo's four branches (and four dense experts) compile the same programs, and the training
tests compile the same small programs many times. Unlike the `moesaic` command, the session
leaves glibc's allocator as it is (moesaic.model.host_memory): its models are small, and
keeping freed memory measured slower for them (the smoke demo 123 s against 113 s).

`make test` runs the suite on every core with pytest-xdist (`-n auto --dist loadfile`: a test
file's tests stay in one worker, so module fixtures are built once). Compiling is most of the
suite's time, and XLA compiles a program on one thread. Each worker keeps its own cache: the
cache writes its files unlocked, so a worker could read an entry another is still writing."""

from __future__ import annotations

import os

import pytest

from tests.support.processes import with_test_xla_flags


def pytest_configure(config):
    # before any test module imports jax: the backend reads XLA_FLAGS when it starts
    os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """The session's one compilation cache, for this process and every subprocess."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    path = str(tmp_path_factory.mktemp("xla-cache"))  # under pytest-xdist, one per worker
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # the subprocesses'
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax_cache.reset_cache()  # looked up once per process: a compile before now fixed it
    yield path
