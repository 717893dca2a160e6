"""Where documents come from: a folder of text files or a JSONL file, read with counted skips.

A source is `name=PATH`. A folder is read recursively (files matching a glob, sorted); a
`.jsonl` file gives one document per line from a string field. Binary files (a NUL byte),
non-UTF-8 files, empty files and unreadable JSONL lines are skipped and recorded (file and
reason) for the manifest. Hidden paths (a component under the folder starting with '.': `.git/`,
`.env`) are skipped and recorded too, unless the glob names them with a part that starts with
'.': a folder of a repository must not put its secrets and commit authors into training data.
Documents longer than `max_doc_bytes` (at least 4, one UTF-8 character) are cut into pieces at
line ends; a single line longer than that is cut at the limit (on a character boundary) and
counted. Which split a document lands in is a stable hash of its text (`heldout_score`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import numbers
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

MAX_DOC_BYTES = 1 << 20  # 1 MiB: longer documents are cut into pieces
MIN_DOC_BYTES = 4  # one UTF-8 character: a smaller limit could never cut a piece
MAX_FILE_BYTES = 256 << 20  # larger files are skipped with a reason
MAX_RECORD_BYTES = 64 << 20  # a JSONL line longer than this is skipped with a reason
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass
class ReadLog:
    """What reading a source skipped or changed; goes into the manifest."""

    skipped: list[dict] = dataclasses.field(default_factory=list)
    long_lines_cut: int = 0
    documents_cut: int = 0

    def skip(self, file: str, reason: str) -> None:
        self.skipped.append({"file": file, "reason": reason})


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    path: Path


def parse_sources(specs: list[str]) -> list[SourceSpec]:
    """["code=PATH", ...] -> specs; refuses bad names, duplicate names and missing paths."""
    out: list[SourceSpec] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--source {spec!r}: expected NAME=PATH")
        if not SOURCE_NAME.match(name):
            raise ValueError(f"--source {spec!r}: name {name!r} must be letters, digits, '_', "
                             "'.', '-' and start with a letter or digit")
        if any(s.name == name for s in out):
            raise ValueError(f"duplicate source name {name!r}: each --source needs its own name")
        if not Path(path).exists():
            raise FileNotFoundError(f"source {name!r}: path {path!r} does not exist")
        out.append(SourceSpec(name, Path(path)))
    if not out:
        raise ValueError("no --source given; pass at least one NAME=PATH")
    return out


def heldout_score(text: str, salt: str = "moesaic-split") -> float:
    """A stable number in [0, 1) from the document's text; < fraction means held out."""
    digest = hashlib.sha256(salt.encode() + b"\0" + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_max_doc_bytes(max_bytes: int, name: str = "max_doc_bytes") -> None:
    """Refuses a limit below one UTF-8 character (the cutting would never end)."""
    if not isinstance(max_bytes, numbers.Integral) or max_bytes < MIN_DOC_BYTES:
        raise ValueError(f"{name} {max_bytes!r}: must be an integer of at least {MIN_DOC_BYTES} "
                         "bytes (a UTF-8 character takes up to 4)")


def _cut_line(line: str, max_bytes: int) -> list[str]:
    data, pieces = line.encode("utf-8"), []
    while len(data) > max_bytes:
        cut = max_bytes
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # do not split a UTF-8 character
            cut -= 1
        pieces.append(data[:cut].decode("utf-8"))
        data = data[cut:]
    return pieces + ([data.decode("utf-8")] if data else [])


def cut_document(text: str, max_bytes: int = MAX_DOC_BYTES, log: ReadLog | None = None
                 ) -> list[str]:
    """Pieces of at most `max_bytes` UTF-8 bytes, cut at line ends where possible."""
    check_max_doc_bytes(max_bytes, "max_bytes")
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    if log is not None:
        log.documents_cut += 1
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if n > max_bytes:
            if log is not None:
                log.long_lines_cut += 1
            parts = _cut_line(line, max_bytes)
        else:
            parts = [line]
        for part in parts:
            n = len(part.encode("utf-8"))
            if current and size + n > max_bytes:
                pieces.append("".join(current))
                current, size = [], 0
            current.append(part)
            size += n
    if current:
        pieces.append("".join(current))
    return pieces


def decode_text(data: bytes, file: str, log: ReadLog) -> str | None:
    """UTF-8 text, or None with a recorded skip (empty, binary, not UTF-8)."""
    if not data.strip():
        log.skip(file, "empty")
        return None
    if b"\0" in data:
        log.skip(file, "binary (contains a NUL byte)")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        log.skip(file, f"not UTF-8 (invalid byte at offset {e.start})")
        return None


def glob_names_hidden(parts: tuple[str, ...], glob: str) -> bool:
    """Whether `glob` matches the relative path `parts` with every hidden component (starting
    with '.') matched by a glob part that starts with '.' too: `.github/**/*` names
    `.github/x.md`, `**/.*` names `a/.env`; `**/*` names neither (`*` and `**` match hidden
    names in pathlib, which is how `.git/` got in)."""
    segments = PurePosixPath(glob).parts

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(parts):
            return all(s == "**" for s in segments[j:])
        if j == len(segments):
            return False
        hidden = parts[i].startswith(".")
        if segments[j] == "**":  # zero components, or one more that is not hidden
            return match(i, j + 1) or (not hidden and match(i + 1, j))
        if hidden and not segments[j].startswith("."):
            return False
        return fnmatch.fnmatchcase(parts[i], segments[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _drop_hidden(root: Path, files: list[Path], glob: str, log: ReadLog) -> list[Path]:
    """`files` without the hidden ones the glob does not name; those are recorded, one entry
    per hidden file or per hidden folder (with how many files it held)."""
    kept, hidden = [], {}
    for path in files:
        parts = path.relative_to(root).parts
        if not any(c.startswith(".") for c in parts) or glob_names_hidden(parts, glob):
            kept.append(path)
            continue
        last = max(k for k, c in enumerate(parts) if c.startswith("."))
        key = "/".join(parts[:last + 1]) + ("/" if last < len(parts) - 1 else "")
        hidden[key] = hidden.get(key, 0) + 1
    for key, n in hidden.items():
        what = f"hidden folder, {n} file(s) not read" if key.endswith("/") else "hidden file"
        log.skip(key, f"{what} (a glob part starting with '.' that matches it reads it)")
    return kept


def read_folder(root: Path, glob: str, log: ReadLog, *, max_doc_bytes: int = MAX_DOC_BYTES,
                max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[str]:
    """Documents of the files under `root` matching `glob`, in sorted path order; hidden paths
    only when the glob names them (`glob_names_hidden`)."""
    try:
        files = sorted(p for p in root.glob(glob) if p.is_file()) if root.is_dir() else [root]
    except (ValueError, NotImplementedError) as err:  # e.g. an empty or absolute pattern
        raise ValueError(f"--glob {glob!r} under {str(root)!r}: {err}; give a pattern "
                         "relative to the folder, e.g. '**/*.txt'") from None
    if root.is_dir():
        files = _drop_hidden(root, files, glob, log)
    for path in files:
        rel = path.name if path == root else path.relative_to(root).as_posix()
        size = path.stat().st_size
        if size > max_file_bytes:
            log.skip(rel, f"larger than {max_file_bytes} bytes ({size})")
            continue
        text = decode_text(path.read_bytes(), rel, log)
        if text is not None:
            yield from cut_document(text, max_doc_bytes, log)


def read_jsonl(path: Path, text_field: str, log: ReadLog, *, max_doc_bytes: int = MAX_DOC_BYTES,
               max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[str]:
    """One document per line: the string in `text_field`. Bad lines are skipped and recorded."""
    with open(path, "rb") as f:
        line_no = 0
        while True:
            line = f.readline(max_record_bytes + 1)
            if not line:
                break
            line_no += 1
            where = f"{path.name}:{line_no}"
            if len(line) > max_record_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # drain the rest of the line
                    line = f.readline(1 << 20)
                log.skip(where, f"line longer than {max_record_bytes} bytes")
                continue
            if not line.strip():
                continue
            raw = decode_text(line, where, log)
            if raw is None:
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                log.skip(where, f"invalid JSON: {e.msg}: column {e.colno} (char {e.pos})")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                log.skip(where, f"no non-empty string field {text_field!r}")
                continue
            yield from cut_document(text, max_doc_bytes, log)


def read_source(path: Path, log: ReadLog, *, glob: str = "**/*", text_field: str = "text",
                max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[str]:
    """Documents of a folder, a .jsonl file or a single text file."""
    check_max_doc_bytes(max_doc_bytes)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".jsonl":
        return read_jsonl(path, text_field, log, max_doc_bytes=max_doc_bytes)
    return read_folder(path, glob, log, max_doc_bytes=max_doc_bytes)
