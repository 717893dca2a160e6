"""A training job's own checkpoints: WORKDIR/ckpt, Orbax CheckpointManager.

Each step directory holds `state` ({"params": trainable tree, "opt": optimizer state}) and
`meta` (JSON: step, tokens_seen, kind, base_fingerprint, the resolved config). Saves are
asynchronous, every `every` steps and at the end, keeping the last `keep`; a step
directory that was not finalised (a job killed while writing) is not seen. Restoring takes
an abstract target that carries the current mesh's shardings (contract 8). Only the
trainable tree is saved: frozen tensors come back from the base, never from here.

`StopSignal` turns SIGTERM (preemption, `scancel`) into a flag the loop checks between steps,
so the job saves and exits 0 instead of dying mid-write. Outside the loop (start-up, writing
the output) SIGTERM raises `Terminated` instead: what was being written is removed as on any
error, and the command says so (exit code 143).

A step that cannot be restored (a file of it missing or damaged) or, unless told not to check,
whose restored state holds NaN or Inf, is refused naming the step's folder.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moesaic.model import checkpoint, damage


class JobCheckpoints:
    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int):
        self.directory = pathlib.Path(workdir).absolute() / "ckpt"
        self.every = max(1, int(every))
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state, *, check_finite: bool = False
                ) -> tuple[dict, dict]:
        """(state, meta) of `step`, restored onto the shardings carried by `abstract_state`;
        with `check_finite`, a state holding NaN or Inf is refused (ValueError)."""
        with self._refusing_damage(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        if check_finite:
            for name, leaf in checkpoint.flatten(_plain(restored["state"])).items():
                if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(
                        jnp.isfinite(leaf).all()):
                    raise ValueError(f"{self.directory / str(step)}: restored tensor {name!r} "
                                     "holds NaN or Inf; move this step's folder away to "
                                     "resume from the one before, or use a fresh --workdir "
                                     "(--no-verify skips this check)")
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        with self._refusing_damage(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
        return restored["meta"]

    @contextlib.contextmanager
    def _refusing_damage(self, step: int):
        """Orbax's error for a step it cannot read, as a refusal naming the step."""
        try:
            yield
        except Exception as err:
            if not (damage.is_read_error(err) or isinstance(err, (ValueError, OSError))):
                raise
            first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise ValueError(f"{self.directory / str(step)}: this workdir's checkpoint of step "
                             f"{step} cannot be restored ({first}); move its folder away to "
                             "resume from the one before, or use a fresh --workdir") from err

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save when `step` is due (or `force`); returns whether it did."""
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _plain(tree) -> dict:
    """Orbax's restored tree as nested dicts of arrays (optimizer states are named tuples)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in leaves}


def abstract_like(tree, shardings) -> object:
    """ShapeDtypeStructs of `tree` with the given shardings (same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def nested(flat: dict) -> dict:
    """Orbax keys must not contain '/': store the flat trees nested."""
    return checkpoint.unflatten(flat)


class StopSignal:
    """SIGTERM (and SIGINT) -> a flag; every process agrees on it before acting."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True when any process was asked to stop (a collective when multi-process)."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Terminated(Exception):
    """SIGTERM outside the training loop: the job stops where it is; what it was writing is
    removed like on any error (checkpoint.save, save_streaming), its saved steps are kept."""

    EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended

    @staticmethod
    @contextlib.contextmanager
    def on_sigterm():
        """SIGTERM raises `Terminated` inside the block (the loop's `StopSignal` takes it over
        while it runs); the previous handler is back afterwards."""
        def handle(signum, frame):
            raise Terminated("stopped by SIGTERM")
        try:
            previous = signal.signal(signal.SIGTERM, handle)
        except ValueError:  # not the main thread: signals cannot be handled here
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
