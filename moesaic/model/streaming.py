"""Streaming writes: a checkpoint written a piece of one tensor at a time.

A merge, a router tuning and a Hugging Face import produce tensors far larger together than
memory should hold. Each is a `TensorSource` (shape, dtype, and a generator of consecutive
pieces along axis 0); `save_streaming` writes them through Orbax's PyTree handler with a
tensorstore spec like the one `checkpoint.save` gives a numpy leaf, so the result reads like
any checkpoint, and hashes each piece while tensorstore writes it, so the fingerprint costs
no second read. Same atomic rename as `checkpoint.save` (docs/design.md, contract 8).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import pathlib
import shutil
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from moesaic.model import checkpoint, host_memory
from moesaic.model.fingerprint import (
    HASH,
    byte_view,
    fingerprint_of_hashes,
    hash_algorithm,
    tensor_digest,
)

# Bytes a streaming write lets commit (tensorstore, OCDBT) while it reads the next pieces
# (at least one piece); the commits of small pieces in flight together share an OCDBT update.
IN_FLIGHT_BYTES = 32 << 20


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
    path = checkpoint.output_path(path, overwrite)
    partial = path.with_name(path.name + checkpoint.PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    meta = {"hash": HASH, **meta}
    writer = _StreamingNumpyHandler(hash_algorithm(meta))
    registry = ocp.type_handlers.create_type_handler_registry(
        (TensorSource, writer), (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                          use_compression=checkpoint.COMPRESS)
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            tree = checkpoint.unflatten(sources)
            checkpointer.save(partial / checkpoint.PARAMS, args=ocp.args.PyTreeSave(tree))
        hashes = {name: writer.hashes[name.replace("/", ".")] for name in sources}
        meta["fingerprint"] = meta.get("fingerprint") or fingerprint_of_hashes(hashes)
        for name, source in (files or {}).items():
            shutil.copyfile(source, partial / name)
        (partial / checkpoint.META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if before_commit is not None:
            before_commit()
    except BaseException:
        checkpoint.discard(partial)
        raise
    checkpoint.commit(partial, path)
    return hashes
