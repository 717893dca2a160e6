"""What is damaged in a checkpoint that Orbax or tensorstore cannot read (docs/design.md,
contract 8): a refusal that names the checkpoint and the file, instead of the error Orbax gives
(`'NoneType' object has no attribute 'tree'` for a damaged params/_METADATA or
manifest.ocdbt, or a missing params/d/* file; a tensorstore status for a damaged data file).

    PATH/params/_METADATA       JSON: the tree of tensors and how they are stored
    PATH/params/manifest.ocdbt  the OCDBT database's root manifest
    PATH/params/d/*, PATH/params/ocdbt.process_*/d/*   the database's index and data files

`CheckpointDamaged` is a ValueError, so every command maps it to exit code 2 with the others.
"""

from __future__ import annotations

import json
import pathlib
import re

import tensorstore as ts

PARAMS = "params"  # as moesaic.model.checkpoint lays it out
ADVICE = "copy it again from its source"


_STATUS = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION)\b")
_READ_ERROR = re.compile(rf"{_STATUS.pattern}|Error reading|error while reading")


class CheckpointDamaged(ValueError):
    """A checkpoint whose files cannot be read as written: `what` is damaged in it."""

    def __init__(self, path: str | pathlib.Path, what: str, label: str = "checkpoint"):
        self.path, self.what, self.label = str(path), what, label
        super().__init__(f"{label} {self.path!r} is damaged: {what}; {ADVICE}")

    def relabel(self, label: str) -> CheckpointDamaged:
        """The same refusal naming the checkpoint by its role (e.g. `--model`, `base`)."""
        return CheckpointDamaged(self.path, self.what, label)


def _short(err: BaseException, params: pathlib.Path) -> str:
    """tensorstore's message (the status in `err`'s chain, else `err`'s own), paths relative
    to the checkpoint, first line only."""
    chain, seen = err, []
    while chain is not None and len(seen) < 10:
        seen.append(chain)
        chain = chain.__cause__ or chain.__context__
    status = [e for e in seen if _STATUS.search(str(e))]
    err = status[0] if status else err
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    text = text.replace(f"file://{params.as_posix()}", PARAMS).replace(params.as_posix(), PARAMS)
    return re.sub(r"\s+", " ", text)[:300]


def index_problem(path: str | pathlib.Path) -> str:
    """Which file keeps the tensor index of `path` from being read, as a phrase ("" when none
    is found): params/_METADATA missing or not JSON, manifest.ocdbt missing or undecodable, an
    index or data file under params/ missing or cut short."""
    params = pathlib.Path(path).absolute() / PARAMS
    metadata = params / "_METADATA"
    if not metadata.is_file():
        return f"{PARAMS}/_METADATA is missing"
    try:
        tree = json.loads(metadata.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"{PARAMS}/_METADATA is not valid JSON ({err})"
    if not isinstance(tree, dict) or "tree_metadata" not in tree:
        return f"{PARAMS}/_METADATA does not list the tensors (no 'tree_metadata')"
    if not (params / "manifest.ocdbt").is_file():
        return f"{PARAMS}/manifest.ocdbt is missing"
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{params.as_posix()}/"}
                                ).result()
        keys = store.list().result()
        for key in keys:  # the arrays' own metadata: small, and read through the index
            if key.endswith(b".zarray") or key.endswith(b"zarr.json"):
                store.read(key).result()
    except ValueError as err:
        return _short(err, params)
    if not keys:
        return f"{PARAMS}/manifest.ocdbt lists no tensors"
    return ""




def is_read_error(err: BaseException) -> bool:
    """Whether `err` (from Orbax or tensorstore) says a stored file could not be read, as
    against an error of the caller (a wrong shape, a sharding)."""
    while err is not None:
        if _READ_ERROR.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def damaged(path: str | pathlib.Path, label: str = "checkpoint", *, tensor: str | None = None,
            error: BaseException | None = None) -> CheckpointDamaged:
    """The refusal for `path`: what is damaged (`index_problem`, else the read error of
    `tensor`)."""
    params = pathlib.Path(path).absolute() / PARAMS
    what = index_problem(path)
    if not what and tensor is not None:
        what = f"tensor {tensor!r} cannot be read" + (
            f" ({_short(error, params)})" if error is not None else "")
    if not what:
        what = ("Orbax cannot read its tensors" + (f" ({_short(error, params)})"
                                                     if error is not None else ""))
    return CheckpointDamaged(path, what, label)
