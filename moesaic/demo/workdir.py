"""A demo workdir: its claim on the settings it was made with, and its compilation cache.

Stages are skipped when their output exists, so a workdir serves one set of settings: the
first run records them in W/preset.json (every setting of moesaic/configs/demo.py but the
preset's name, as the demo before that config file recorded its presets) and a run with
other settings is refused."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections

# Settings added after workdirs recorded theirs, with the value every earlier run had.
BEFORE_RECORDED = {"uncoordinated": False, "negative_bias": True, "btx_top_k": 4,
                   # the low-rank systems only add stages and change no other stage's output,
                   # so an earlier workdir is taken at today's values and gains them
                   "low_rank": 16, "lora_branches": False, "lora_rank": 16}
# Settings added since that only add stages and whose value differs between presets: a workdir
# made before them is taken at the value asked for now.
ADDS_STAGES = ("screen_rows",)  # moesaic.demo.screening


def recorded_settings(config: ml_collections.ConfigDict) -> dict:
    """What W/preset.json holds for the demo settings `config`."""
    return {k: v for k, v in config.to_dict().items() if k != "preset"}


def claim_workdir(w: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Records `config` in the empty workdir `w`, or checks that `w` was made with it; a
    ValueError names what differs."""
    path, wanted = w / "preset.json", recorded_settings(config)
    if path.exists():  # a setting added since the workdir was made ran at its old value there
        had = {**BEFORE_RECORDED, **{k: wanted[k] for k in ADDS_STAGES if k in wanted},
               **json.loads(path.read_text())}
        diff = sorted(k for k in set(had) | set(wanted) if had.get(k) != wanted.get(k))
        if diff:
            changes = ", ".join(f"{k}: {had.get(k)!r} there, {wanted.get(k)!r} now" for k in diff)
            raise ValueError(f"{w} was made with other demo settings ({changes}); use another "
                             "--workdir")
    elif any(w.iterdir()):
        raise ValueError(f"{w} holds files but no preset.json (made by an older demo, or not a "
                         "demo workdir): its settings are unknown; use another --workdir")
    else:
        path.write_text(json.dumps(wanted, indent=1) + "\n")


def use_compilation_cache(path: pathlib.Path) -> None:
    """XLA's persistent compilation cache in `path`, unless the user named one
    (JAX_COMPILATION_CACHE_DIR). Every stage compiles its own train and eval steps, and the four
    branches (and the four dense experts) compile the same programs: with the cache each is
    compiled once. A cache holds executables the process will run, so it must be trusted
    like the code: it lives in the workdir."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
