"""moesaic.model.host_memory: freed host memory is reused, not faulted in again, and a user's
own allocator choice is left alone."""

from __future__ import annotations

import platform

import pytest

from moesaic.model import host_memory
from tests.support.processes import last_json_line, run_python

ALLOCATE = """
import json, os, resource, threading
import numpy as np
from moesaic.model import host_memory
while (name := host_memory.user_chose_allocator()) is not None:  # the caller's own choice
    del os.environ[name]
if {system}:
    os.environ["MOESAIC_SYSTEM_MALLOC"] = "1"
applied = host_memory.keep_freed_memory()
faults = []

def step():  # what XLA's worker threads do each step: a large block, filled, freed
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.empty(64 << 20, np.uint8)
        block.fill(1)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=step)
thread.start()
thread.join()
print(json.dumps(dict(applied=applied, faults=faults)))
"""

@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_a_freed_block_is_reused_without_page_faults():
    kept, system = (last_json_line(run_python(ALLOCATE.format(system=s)).stdout)
                    for s in (False, True))
    assert kept["applied"] and not system["applied"]
    # the first block faults in either way; after it, glibc's default maps and faults in
    # every block again (64 MB: 16384 pages, or 32 huge pages), the kept heap none
    again_kept, again_system = sum(kept["faults"][1:]), sum(system["faults"][1:])
    assert min(system["faults"][1:]) >= 32, system
    assert again_kept * 4 < again_system, (kept, system)


@pytest.mark.parametrize("environ, chosen", [
    ({"PATH": "/bin"}, None),
    ({"MALLOC_ARENA_MAX": "4"}, "MALLOC_ARENA_MAX"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so"}, "LD_PRELOAD"),
    ({"MOESAIC_SYSTEM_MALLOC": "1"}, "MOESAIC_SYSTEM_MALLOC"),
    ({"MALLOC_ARENA_MAX": ""}, None),
])
def test_a_users_allocator_choice_is_left_alone(environ, chosen):
    assert host_memory.user_chose_allocator(environ) == chosen


def test_the_command_applies_it_before_any_stage(monkeypatch):
    from moesaic.cli import main as cli

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(cli, "_available", lambda: {"plan": cli.COMMANDS["plan"]})
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    assert calls == [1]
