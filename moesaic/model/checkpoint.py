"""Model checkpoints: one Orbax tree of parameters plus a JSON metadata file, written whole or
not at all (docs/design.md, contract 8).

    PATH/params/      Orbax (OCDBT) tree, flat: {"blocks/ffn/w_gate": array, ...}
    PATH/meta.json    {"kind": ..., "model": ModelConfig fields, "fingerprint": ...,
                       "hash": "blake3", ...}

The fingerprint is a sha256 over every tensor's name and hash (moesaic.model.fingerprint, whose
names this module re-exports); `verify` checks a stored checkpoint against it.

Everything is written under `PATH.partial` and renamed to PATH when complete: a reader either
sees a finished checkpoint or none; overwriting renames the old PATH aside first (`commit`),
so PATH is never a mix of the two. Restoring takes an abstract target with the shardings of
the current mesh, so a checkpoint written on one mesh loads onto another; single tensors can
be read alone (merges and exports stream tensor by tensor).
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from moesaic.model import damage, host_memory
from moesaic.model.config import ModelConfig
from moesaic.model.fingerprint import (  # noqa: F401 (re-exported: checkpoint.HASH, ...)
    HASH,
    HASHES,
    LEGACY_HASH,
    byte_view,
    fingerprint,
    fingerprint_of_hashes,
    hash_algorithm,
    scan,
    tensor_digest,
    tensor_hash,
)
from moesaic.model.names import LAYER_STACKED
from moesaic.model.sharding import Rules, make_mesh, state_shardings
from moesaic.model.transformer import Decoder

META = "meta.json"
PARAMS = "params"
# zstd on the tensors new checkpoints write. Off: float weights gain about 8% from zstd (level
# 1), and decoding it made reading a checkpoint several times slower than the disk (a merge,
# a verification); checkpoints written with it read as before (each array's zarr metadata
# names its compressor).
COMPRESS = False


def flatten(state: nnx.State | Mapping) -> dict[str, jax.Array]:
    """nnx.State or nested dict -> {"blocks/ffn/w_gate": array}."""
    if isinstance(state, nnx.State):
        state = nnx.to_pure_dict(state)
    out = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for key in sorted(node, key=str):
                walk(f"{prefix}/{key}" if prefix else str(key), node[key])
        else:
            out[prefix] = node
    walk("", state)
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


PARTIAL, ASIDE = ".partial", ".replaced"


def aside_path(path: str | pathlib.Path) -> pathlib.Path:
    """Where `commit` moves the checkpoint it replaces: a hidden sibling, removed last."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}{ASIDE}")


def commit(partial: pathlib.Path, path: pathlib.Path) -> None:
    """Moves the finished `partial` to `path`. An existing `path` is renamed aside, the new
    one renamed into place, and only then the old one deleted: killed at any step, `path`
    is the old checkpoint or the new one, never a mix (between the two renames it is
    missing, with the old one aside and the new one still at `partial`)."""
    aside = aside_path(path)
    if aside.exists():
        shutil.rmtree(aside)
    if path.exists():
        path.rename(aside)
    partial.rename(path)
    shutil.rmtree(aside, ignore_errors=True)


def is_complete(path: str | pathlib.Path) -> bool:
    """A committed checkpoint: meta and params, and not a folder being written (`.partial`)
    or being deleted after an overwrite (`commit`'s aside)."""
    path = pathlib.Path(path).absolute()
    if path.name.endswith((PARTIAL, ASIDE)):
        return False
    return (path / META).is_file() and (path / PARAMS).is_dir()


def inner_checkpoint_hint(path: str | pathlib.Path) -> str:
    """For a folder that is not a checkpoint but holds one (a job's workdir, whose output is
    WORKDIR/artifact or WORKDIR/public): "; did you mean …?", else ""."""
    path = pathlib.Path(path)
    if not path.is_dir():
        return ""
    inner = sorted(str(p) for p in path.iterdir() if p.is_dir() and is_complete(p))
    return f"; did you mean {' or '.join(inner)}?" if inner else ""


def trained_seq_len(metas: Iterable[dict]) -> int | None:
    """The data.seq_len the checkpoints with these metas trained on, when they agree."""
    lengths = {((m.get("config") or {}).get("data") or {}).get("seq_len") for m in metas}
    lengths.discard(None)
    return int(lengths.pop()) if len(lengths) == 1 else None


def read_meta(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise ValueError(f"{path} is not a complete moesaic checkpoint (no {META} or {PARAMS}/)"
                         f"{inner_checkpoint_hint(path)}")
    return json.loads((path / META).read_text())


class _SmallChunksAccepted(logging.Filter):
    """Orbax warns (through absl) for every chunk under 1 MiB that it "could reduce
    performance"; one-layer chunks of a small model are that small by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "target_byte_size too small" not in str(record.msg)


logging.getLogger("absl").addFilter(_SmallChunksAccepted())


def _layer_chunks(name: str, array) -> ocp.SaveArgs:
    """Chunks of one layer for layer-stacked tensors, so readers that go layer by layer
    (merges, exports) decode each layer once instead of the whole tensor."""
    shape = np.shape(array)
    if not name.startswith(LAYER_STACKED) or len(shape) < 2 or shape[0] < 2:
        return ocp.SaveArgs()
    row_bytes = int(np.prod(shape[1:])) * np.dtype(array.dtype).itemsize
    return ocp.SaveArgs(chunk_byte_size=max(row_bytes, 1), shard_axes=(0,))


def output_path(path: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """The absolute path (orbax needs one) of a checkpoint about to be written, refused
    before anything is written if it exists (unless `overwrite`) or if its name is one the
    atomic write reserves (a reader would never take it for a checkpoint)."""
    path = pathlib.Path(path).absolute()
    if path.name.endswith((PARTIAL, ASIDE)):
        raise ValueError(f"{path}: a checkpoint name may not end in {PARTIAL!r} or {ASIDE!r} "
                         "(reserved for checkpoints being written or replaced)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output or remove it")
    return path


def save(path: str | pathlib.Path, flat: Mapping[str, jax.Array], meta: dict, *,
         overwrite: bool = False) -> None:
    """Writes a checkpoint atomically. `meta` gets the parameter fingerprint added unless it
    has one. All processes call this; process 0 renames. A sharded jax.Array is written shard
    by shard, each by the process that holds it (Orbax), and hashed a slab at a time
    (`tensor_hash`): no tensor is gathered whole onto a host, and the checkpoint and its
    fingerprint are the same whatever the mesh."""
    path = output_path(path, overwrite)
    partial = path.with_name(path.name + PARTIAL)
    if jax.process_index() == 0 and partial.exists():
        shutil.rmtree(partial)
    multihost_utils.sync_global_devices(f"moesaic-save-start:{path}")
    meta = dict(meta)
    meta.setdefault("hash", HASH)
    meta.setdefault("fingerprint", fingerprint(flat, meta["hash"]))
    try:  # an error (a full disk) or a signal: PATH.partial removed, PATH as it was
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
                use_compression=COMPRESS)) as checkpointer:
            checkpointer.save(partial / PARAMS, args=ocp.args.PyTreeSave(
                unflatten(flat), save_args=unflatten(
                    {n: _layer_chunks(n, a) for n, a in flat.items()})))
        if jax.process_index() == 0:
            (partial / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    except BaseException:
        if jax.process_index() == 0:
            discard(partial)
        raise
    if jax.process_index() == 0:
        commit(partial, path)
    multihost_utils.sync_global_devices(f"moesaic-save-done:{path}")


def discard(folder: pathlib.Path, *, settle: float = 0.2, limit: float = 10.0) -> None:
    """Removes a half-written folder for good: a write interrupted mid-way (Ctrl-C) can leave
    tensorstore threads that still create files in it for a moment after `rmtree`, so it is
    removed again until it stays gone for `settle` seconds (at most `limit` seconds)."""
    deadline = time.monotonic() + limit
    while True:
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(settle)
        if not folder.exists() or time.monotonic() > deadline:
            return


@functools.cache
def _reading_context() -> ts.Context:
    """One tensorstore context for every `TensorReader`: its I/O and copy thread pools are
    shared, where a context each made a merge's memory grow with its number of inputs (each
    reader had its own pools). It caches nothing (no cache pool), so a reader sees the
    files as they are when it reads."""
    return ts.Context({"file_io_concurrency": {"limit": 128},
                       "cache_pool#ocdbt": {"total_bytes_limit": 0}})


class TensorReader:
    """Reads blocks of one stored tensor (`reader[l]`, `reader[a:b]`) without reading the rest:
    what lets a merge go layer by layer through tensors larger than memory."""

    def __init__(self, path: str | pathlib.Path, name: str):
        params = pathlib.Path(path).absolute() / PARAMS
        try:
            tree_meta = json.loads((params / "_METADATA").read_text())
        except (OSError, ValueError):
            raise damage.damaged(path) from None
        spec = ts_utils.ArrayReadSpec(
            directory=params.as_posix(), relative_array_filename=name.replace("/", "."),
            use_zarr3=bool(tree_meta.get("use_zarr3", False)),
            use_ocdbt=bool(tree_meta.get("use_ocdbt", True)))
        try:
            self._store = ts.open(ts.Spec(spec.json), open=True,
                                  context=_reading_context()).result()
        except ValueError as err:
            if damage.index_problem(path):
                raise damage.damaged(path) from err
            raise KeyError(f"{path} has no tensor {name!r}") from err
        self.path = path
        self.name, self.shape = name, tuple(self._store.shape)
        self.dtype = np.dtype(self._store.dtype.numpy_dtype)
        chunk = tuple(self._store.chunk_layout.read_chunk.shape or self.shape)
        self.rows_per_chunk = int(chunk[0]) if self.shape else 0

    def __getitem__(self, index) -> np.ndarray:
        try:
            return np.asarray(self._store[index].read().result())
        except ValueError as err:  # a tensorstore status: a data file missing or cut short
            raise damage.damaged(self.path, tensor=self.name, error=err) from err

    def read(self) -> np.ndarray:
        return self[...]

    def pieces(self):
        """The tensor in row blocks of one stored chunk each, in order (each chunk decoded
        once); a scalar as one piece."""
        if not self.shape:
            yield self.read()
            return
        step = max(self.rows_per_chunk, 1)
        for row in range(0, self.shape[0], step):
            yield self[row:row + step]

    def hash(self, rows_per_piece: int = 1, algorithm: str = HASH) -> str:
        """`tensor_hash` of the stored tensor, read `rows_per_piece` rows at a time."""
        digest = tensor_digest(self.dtype, self.shape, algorithm)
        if not self.shape:
            digest.update(byte_view(self.read()))
        for row in range(0, self.shape[0] if self.shape else 0, rows_per_piece):
            digest.update(byte_view(self[row:row + rows_per_piece]))
        return digest.hexdigest()


def verify(path: str | pathlib.Path, label: str = "checkpoint") -> None:
    """Reads every stored tensor once, a chunk at a time, and refuses (ValueError) a
    checkpoint that holds NaN or Inf (naming the tensor and the first index) or whose tensors
    are not the ones the fingerprint in its meta.json records: a flipped bit, a damaged or
    swapped file. What a command that loads a checkpoint calls first (its `--no-verify`
    skips it)."""
    path = pathlib.Path(path)
    meta = read_meta(path)
    recorded, algorithm = meta.get("fingerprint"), hash_algorithm(meta)
    hashes = {}
    try:
        for name in sorted(tensor_metadata(path)):
            reader = TensorReader(path, name)
            hashes[name], bad = scan(reader.dtype, reader.shape, reader.pieces(), algorithm)
            host_memory.release_freed()
            if bad is not None:
                raise non_finite(label, path, name, bad)
    except damage.CheckpointDamaged as err:  # a file missing or cut short: named, by role
        raise err.relabel(label) from None
    if recorded is not None and fingerprint_of_hashes(hashes) != recorded:
        raise fingerprint_mismatch(label, path)


def non_finite(label: str, path: pathlib.Path, name: str, index) -> ValueError:
    """The refusal of a checkpoint whose tensor `name` holds NaN or Inf, first at `index`."""
    return ValueError(f"{label} {str(path)!r}: tensor {name!r} holds NaN or Inf (first at "
                      f"index {index}); a model with non-finite weights cannot be trained from "
                      "or evaluated")


def fingerprint_mismatch(label: str, path: pathlib.Path) -> ValueError:
    """The refusal of a checkpoint whose tensors are not those its fingerprint records."""
    return ValueError(f"{label} {str(path)!r} is damaged: its tensors do not match the "
                      f"fingerprint its {META} records (a changed byte, or a file of another "
                      "checkpoint); copy it again from its source (--no-verify skips this "
                      "check)")


def tensor_metadata(path: str | pathlib.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every stored tensor, without reading any."""
    read_meta(path)
    with ocp.StandardCheckpointer() as checkpointer:
        item = checkpointer.metadata(pathlib.Path(path).absolute() / PARAMS).item_metadata
    if item is None:  # Orbax logs a warning and returns None for a damaged index
        raise damage.damaged(path)
    tree = item.tree
    return {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in flatten(tree).items()}


def load_tensors(path: str | pathlib.Path, names: Iterable[str],
                 shardings: Mapping[str, jax.sharding.Sharding] | None = None, *,
                 stored: Mapping[str, tuple] | None = None) -> dict:
    """Reads only the named tensors (numpy unless a sharding is given). `stored`: the
    checkpoint's `tensor_metadata`, when the caller has already read it."""
    names = list(names)
    shapes = stored if stored is not None else tensor_metadata(path)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise KeyError(f"{path} has no tensor(s) {missing}")
    item = unflatten({n: jax.ShapeDtypeStruct(*shapes[n]) for n in names})
    restore_args = unflatten({
        n: (ocp.ArrayRestoreArgs(sharding=shardings[n]) if shardings and n in shardings
            else ocp.RestoreArgs(restore_type=np.ndarray)) for n in names})
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            tree = checkpointer.restore(
                pathlib.Path(path).absolute() / PARAMS,  # orbax needs absolute paths
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                            partial_restore=True))
    except Exception as err:  # a tensorstore status names a file missing or cut short
        if not damage.is_read_error(err):
            raise
        raise damage.damaged(path, error=err) from err
    return flatten(tree)


def model_config(meta: dict) -> ModelConfig:
    return ModelConfig.from_config(meta["model"])


def abstract_model(cfg: ModelConfig) -> Decoder:
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def load(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
         rules: Rules | None = None, cfg: ModelConfig | None = None,
         meta: dict | None = None) -> tuple[Decoder, dict]:
    """Restores a model onto `mesh` (default: all local devices, replicated unless `rules`
    shard it). Nothing the size of the model is allocated twice. `meta`: the checkpoint's
    meta when the caller has read it already."""
    meta = read_meta(path) if meta is None else meta
    cfg = cfg or model_config(meta)
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    mesh = mesh or make_mesh({"data": -1})
    shardings = flatten(state_shardings(state, mesh, rules or ()))
    abstract = flatten(state)
    stored = tensor_metadata(path)
    for name, value in abstract.items():
        if name not in stored:
            raise ValueError(f"{path}: tensor {name!r} missing; the checkpoint does not match "
                             f"its model config")
        if stored[name][0] != tuple(value.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {stored[name][0]}, the model "
                             f"config needs {tuple(value.shape)}")
    flat = load_tensors(path, abstract, shardings, stored=stored)
    nnx.replace_by_pure_dict(state, unflatten(flat))
    return nnx.merge(graphdef, state), meta


def save_model(path: str | pathlib.Path, model: Decoder, meta: dict | None = None, **kw) -> None:
    meta = {"kind": "model", **(meta or {}), "model": model.cfg.to_dict()}
    save(path, flatten(nnx.state(model)), meta, **kw)

