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

import collections
import dataclasses
import functools
import itertools
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import ocdbt_utils
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
# Bytes a streaming write lets commit (tensorstore, OCDBT) while it reads the next pieces
# (at least one piece); the commits of small pieces in flight together share an OCDBT update.
IN_FLIGHT_BYTES = 32 << 20
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


class TensorSource:
    """A tensor that `save_streaming` materialises only piece by piece: shape and dtype up
    front; `pieces()` yields consecutive blocks along axis 0 (C order), each written and
    dropped before the next is produced. With `rows_per_chunk`, the stored chunks are that
    many rows (pieces should be whole chunks: a piece that cuts a chunk makes tensorstore
    read-modify-write it); without, one chunk holds the whole tensor, as `save` writes it.
    With `cols_per_chunk` (stacked experts: one expert of one layer), the stored chunks are
    one row by that many entries of axis 1, and the pieces are blocks of one row and some
    entries of axis 1, still in C order (layer 0's experts, then layer 1's, ...), so no piece
    grows with the size of axis 1."""

    def __init__(self, shape: tuple[int, ...], dtype, pieces: Callable[[], Iterable],
                 rows_per_chunk: int | None = None, cols_per_chunk: int | None = None):
        self.shape, self.dtype, self.pieces = tuple(shape), np.dtype(dtype), pieces
        self.rows_per_chunk, self.cols_per_chunk = rows_per_chunk, cols_per_chunk
        if cols_per_chunk and len(self.shape) < 2:
            raise ValueError(f"cols_per_chunk needs a tensor of 2 or more axes, not {shape}")
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Where the next piece of a `TensorSource` goes: rows of axis 0, or (with
    `cols_per_chunk`) entries of axis 1 within one row; refuses a piece that does not fit."""

    def __init__(self, source: TensorSource, name: str):
        self.source, self.name, self.row, self.col = source, name, 0, 0

    def place(self, piece: np.ndarray) -> tuple:
        source = self.source
        fits = (piece.dtype == source.dtype and piece.ndim == source.ndim
                and piece.shape[1:] == source.shape[1:])
        if source.cols_per_chunk:
            fits = (piece.dtype == source.dtype and piece.ndim == source.ndim
                    and piece.shape[0] == 1 and piece.shape[2:] == source.shape[2:])
        if not fits or (source.ndim and self.row >= source.shape[0]):
            raise ValueError(f"tensor {self.name}: piece {piece.dtype}{piece.shape} does not "
                             f"fit {source.dtype}{source.shape} at row {self.row}")
        if source.ndim == 0:
            self.row = None
            return ()
        if not source.cols_per_chunk:
            index = (slice(self.row, self.row + piece.shape[0]),)
            self.row += piece.shape[0]
            return index
        index = (slice(self.row, self.row + 1), slice(self.col, self.col + piece.shape[1]))
        self.col += piece.shape[1]
        if self.col > source.shape[1]:
            raise ValueError(f"tensor {self.name}: pieces of row {self.row} cover {self.col} "
                             f"of {source.shape[1]} entries of axis 1")
        if self.col == source.shape[1]:
            self.row, self.col = self.row + 1, 0
        return index

    def check_complete(self) -> None:
        if self.row is not None and (self.row, self.col) != (
                self.source.shape[0] if self.source.ndim else 0, 0):
            raise ValueError(f"tensor {self.name}: pieces cover {self.row} of "
                             f"{self.source.shape[0]} rows")


class _StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Writes `TensorSource`s one after another, piece by piece, with the tensorstore spec a
    numpy leaf gets (same typestr; same chunks, or chunks of the pieces' rows when a piece is
    not the whole tensor), so the checkpoint reads like any other.
    Records each tensor's `tensor_hash` on the way: each piece is hashed while tensorstore
    writes it."""

    def __init__(self, algorithm: str = HASH):
        super().__init__(deepcopy_host_arrays=False)
        self.hashes: dict[str, str] = {}
        self.algorithm = algorithm

    async def _background_serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        for source, info, arg in zip(values, infos, args):
            pieces = iter(source.pieces())
            first = next(pieces, None)
            if source.ndim and np.ndim(first) and 0 < np.shape(first)[0] < source.shape[0]:
                # chunks of the pieces' rows: each write fills whole chunks (no read-modify-
                # write of one tensor-sized chunk per piece, which OCDBT would keep every copy of)
                row_bytes = int(np.prod(source.shape[1:], dtype=np.int64)) * source.dtype.itemsize
                arg = dataclasses.replace(arg, chunk_byte_size=max(
                    np.shape(first)[0] * row_bytes, 1), shard_axes=(0,))
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=source.shape, local_shape=source.shape,
                dtype=source.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(
                    use_ocdbt=info.is_ocdbt_checkpoint))
            spec = spec.json
            if source.rows_per_chunk and source.ndim and "chunks" in spec.get("metadata", {}):
                spec["metadata"]["chunks"] = [min(source.rows_per_chunk, source.shape[0]),
                                              *source.shape[1:]]
            if source.cols_per_chunk and "chunks" in spec.get("metadata", {}):
                spec["metadata"]["chunks"] = [1, min(source.cols_per_chunk, source.shape[1]),
                                              *source.shape[2:]]
            store = await ts.open(ts.Spec(spec), create=True, open=True,
                                  context=info.ts_context)
            digest = tensor_digest(source.dtype, source.shape, self.algorithm)
            cursor, pending = _Cursor(source, info.name), collections.deque()
            for piece in itertools.chain([] if first is None else [first], pieces):
                piece = np.asarray(piece, order="C")
                write = store[cursor.place(piece)].write(piece)
                digest.update(byte_view(piece))  # while tensorstore's threads write
                await write.copy
                pending.append((write.commit, piece.nbytes))
                del piece
                while len(pending) > 1 and sum(n for _, n in pending) > IN_FLIGHT_BYTES:
                    await pending.popleft()[0]  # the next pieces are read while these commit
                    host_memory.release_freed()
            for commit_, _ in pending:
                await commit_
            cursor.check_complete()
            self.hashes[info.name] = digest.hexdigest()
            host_memory.release_freed()


def save_streaming(path: str | pathlib.Path, sources: Mapping[str, TensorSource], meta: dict,
                   *, overwrite: bool = False,
                   files: Mapping[str, pathlib.Path] | None = None,
                   before_commit: Callable[[], None] | None = None) -> dict[str, str]:
    """Like `save`, but holds only a piece of one tensor in memory at a time. Same layout on
    disk as `save` of numpy arrays, same atomic rename (nothing but PATH.partial exists until
    it is complete; on error PATH.partial is removed). The fingerprint is computed while
    writing (unless `meta` has one). `files` {name: source path} are copied in before the
    rename (e.g. a tokenizer.json the meta points at). `before_commit()` runs when
    everything is written, before the rename: if it raises, PATH.partial is removed and PATH
    is as it was (a merge checks what it read while writing). Returns {name: tensor_hash}.
    Single process."""
    path = output_path(path, overwrite)
    partial = path.with_name(path.name + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    meta = {"hash": HASH, **meta}
    writer = _StreamingNumpyHandler(hash_algorithm(meta))
    registry = ocp.type_handlers.create_type_handler_registry(
        (TensorSource, writer), (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                          use_compression=COMPRESS)
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(partial / PARAMS, args=ocp.args.PyTreeSave(unflatten(sources)))
        hashes = {name: writer.hashes[name.replace("/", ".")] for name in sources}
        meta["fingerprint"] = meta.get("fingerprint") or fingerprint_of_hashes(hashes)
        for name, source in (files or {}).items():
            shutil.copyfile(source, partial / name)
        (partial / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if before_commit is not None:
            before_commit()
    except BaseException:
        discard(partial)
        raise
    commit(partial, path)
    return hashes


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
                raise ValueError(f"{label} {str(path)!r}: tensor {name!r} holds NaN or Inf "
                                 f"(first at index {bad}); a model with non-finite weights "
                                 "cannot be trained from or evaluated")
    except damage.CheckpointDamaged as err:  # a file missing or cut short: named, by role
        raise err.relabel(label) from None
    if recorded is not None and fingerprint_of_hashes(hashes) != recorded:
        raise ValueError(f"{label} {str(path)!r} is damaged: its tensors do not match the "
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

