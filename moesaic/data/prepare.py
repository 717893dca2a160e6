"""Sources -> TFDS ArrayRecord datasets, one folder per source, written atomically.

Layout of DATA_DIR/<source>/ :
  manifest.json                 documents / bytes / tokens per split, content hash, tokenizer,
                                skipped files with reasons (see `write_source`)
  index-<split>.npy             int64 (documents, 2): tokens and UTF-8 bytes of each document
  moesaic_tokens/1.0.0/         the TFDS dataset: splits `train` and `heldout`, one record per
                                document {"tokens": int32[n]} in the order written (no shuffle)

Everything is written into DATA_DIR/.<source>.tmp-<pid> and renamed into place at the end;
a failure removes the temporary folder, so a half-written dataset never exists. A temporary
folder of a run that was killed (its process gone) is removed by the next run on DATA_DIR.

`prepare` is all or nothing over its sources: every source is checked (name, path, that it
has documents, that DATA_DIR/<source> does not exist unless `overwrite`) before the first is
written, all are written to their temporary folders, and only then are they renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from moesaic.data import sources as sources_lib
from moesaic.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "heldout")
TFDS_NAME = "moesaic_tokens"
TFDS_VERSION = "1.0.0"
MANIFEST_FORMAT = "moesaic-data/1"


class _Stats:
    def __init__(self) -> None:
        self.rows: list[tuple[int, int]] = []
        self.hash = hashlib.sha256()
        self.duplicates = 0
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        key = hashlib.sha256(text.encode("utf-8")).digest()
        if key in self._seen:
            self.duplicates += 1
            return True
        self._seen.add(key)
        return False

    def summary(self) -> dict:
        rows = np.asarray(self.rows, np.int64).reshape(-1, 2)
        return {"documents": len(rows), "tokens": int(rows[:, 0].sum()),
                "bytes": int(rows[:, 1].sum()), "duplicates_dropped": self.duplicates}


class TokenDocuments(tfds.core.GeneratorBasedBuilder):
    """One record per document: {"tokens": int32[n]}; splits given as text iterators."""

    name = TFDS_NAME
    VERSION = tfds.core.Version(TFDS_VERSION)
    url_infos = None  # nothing is downloaded; TFDS would otherwise look for a checksums file

    def __init__(self, *, source: str, splits: dict[str, Callable[[], Iterable[str]]],
                 tokenizer: Tokenizer, **kwargs):
        self._source, self._splits, self._tokenizer = source, splits, tokenizer
        self.stats = {split: _Stats() for split in splits}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)})
        # One feature only: tf.Example maps with several keys serialize in a random order,
        # which would make two builds of the same data differ in their bytes.
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared": here
    # nothing is downloaded, and the command says what it wrote itself.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        stats = self.stats[split]
        for text in self._splits[split]():
            if stats.is_duplicate(text):
                continue
            tokens = self._tokenizer.encode(text)
            if not len(tokens):
                continue
            stats.hash.update(len(tokens).to_bytes(8, "little") + tokens.tobytes())
            stats.rows.append((len(tokens), len(text.encode("utf-8"))))
            yield len(stats.rows) - 1, {"tokens": tokens}
        if not stats.rows:
            raise ValueError(f"source {self._source!r}: split {split!r} has no documents; "
                             "give more documents or change --heldout-fraction (a single "
                             "text file is one document unless it is larger than "
                             "--max-doc-bytes: give a folder of files, or JSONL with one "
                             "document per line)")


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _contained_tempdir(parent: Path):
    """TFDS makes an empty `tmp*tfds` folder with tempfile.mkdtemp whenever it initialises a
    builder that has no stored info yet (DatasetInfo.initialize_from_bucket, even with GCS
    disabled) and never removes it; keep that folder inside `parent/scratch`, removed on exit."""
    scratch = parent / "scratch"
    scratch.mkdir(parents=True)
    old = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        yield
    finally:
        tempfile.tempdir = old
        shutil.rmtree(scratch, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(out_dir: Path) -> list[str]:
    """Removes the temporary folders (`.NAME.tmp-PID`, `.NAME.old-PID`) of runs on `out_dir`
    whose process is gone (killed mid-write); returns their names."""
    removed = []
    for path in sorted(out_dir.glob(".*")) if out_dir.is_dir() else []:
        match = re.fullmatch(r"\.(.+)\.(tmp|old)-(\d+)", path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(3))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def write_source(out_dir: str | os.PathLike, name: str,
                 splits: dict[str, Callable[[], Iterable[str]]], *,
                 tokenizer: Tokenizer, origin: dict, log: sources_lib.ReadLog | None = None
                 ) -> dict:
    """Write DATA_DIR/<name>/ from text iterators per split (replacing one that exists);
    return the manifest.

    Each split is a zero-argument callable giving document texts in the order to store them.
    Exact duplicate documents within a split are dropped (counted). Raises ValueError (and
    leaves nothing behind) when a split ends up empty.
    """
    tmp, manifest = _write_tmp(out_dir, name, splits, tokenizer=tokenizer, origin=origin, log=log)
    _swap_into_place(tmp, Path(out_dir) / name)
    return manifest


def _write_tmp(out_dir: str | os.PathLike, name: str,
               splits: dict[str, Callable[[], Iterable[str]]], *,
               tokenizer: Tokenizer, origin: dict, log: sources_lib.ReadLog | None = None
               ) -> tuple[Path, dict]:
    """`write_source` up to the rename: (the temporary folder holding the source, its
    manifest). On any error the folder is removed."""
    if not sources_lib.SOURCE_NAME.match(name):
        raise ValueError(f"source name {name!r}: letters, digits, '_', '.', '-' only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _contained_tempdir(tmp):
            builder = TokenDocuments(source=name, splits=splits, tokenizer=tokenizer,
                                     data_dir=str(tmp), file_format="array_record")
        tfds.display_progress_bar(False)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
        content = hashlib.sha256(tokenizer.identity.encode())
        split_info = {}
        for split, stats in builder.stats.items():
            np.save(tmp / f"index-{split}.npy", np.asarray(stats.rows, np.int64).reshape(-1, 2))
            content.update(split.encode() + stats.hash.digest())
            split_info[split] = stats.summary()
        log = log or sources_lib.ReadLog()
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": name,
            "tokenizer": tokenizer.manifest(),
            "splits": split_info,
            "content_hash": content.hexdigest(),
            "tfds_dir": f"{TFDS_NAME}/{TFDS_VERSION}",
            "origin": origin,
            "num_skipped": len(log.skipped),
            "skipped": log.skipped,
            "documents_cut": log.documents_cut,
            "long_lines_cut": log.long_lines_cut,
        }
        shutil.rmtree(tmp / "downloads", ignore_errors=True)  # TFDS makes it; nothing is in it
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, manifest


def _source_splits(spec: sources_lib.SourceSpec, *, glob: str, text_field: str,
                   heldout_fraction: float, max_doc_bytes: int):
    """(splits, origin, log) of one source (folder, .jsonl or text file), split by document
    hash; refuses a source without documents before anything is written."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"--heldout-fraction {heldout_fraction}: must be in (0, 1)")
    sources_lib.check_max_doc_bytes(max_doc_bytes, "--max-doc-bytes")
    log = sources_lib.ReadLog()  # filled by the train pass; both passes read the same files

    def split_docs(heldout: bool) -> Callable[[], Iterator[str]]:
        def docs() -> Iterator[str]:
            pass_log = sources_lib.ReadLog() if heldout else log
            if not heldout:  # a repeated pass must not count its skips twice
                log.skipped.clear()
                log.documents_cut = log.long_lines_cut = 0
            for text in sources_lib.read_source(spec.path, pass_log, glob=glob,
                                                text_field=text_field,
                                                max_doc_bytes=max_doc_bytes):
                if (sources_lib.heldout_score(text) < heldout_fraction) == heldout:
                    yield text
        return docs

    # Count the documents first, so an empty source is named before anything is written.
    probe = sources_lib.ReadLog()
    if next(sources_lib.read_source(spec.path, probe, glob=glob, text_field=text_field,
                                    max_doc_bytes=max_doc_bytes), None) is None:
        detail = f"; skipped {len(probe.skipped)}: {probe.skipped[:5]}" if probe.skipped else ""
        raise ValueError(f"source {spec.name!r}: no documents in {str(spec.path)!r} "
                         f"(glob {glob!r}){detail}")
    origin = {"kind": "jsonl" if spec.path.suffix == ".jsonl" else "files",
              "path": spec.path.name, "glob": glob, "text_field": text_field,
              "heldout_fraction": heldout_fraction, "max_doc_bytes": max_doc_bytes}
    return {"train": split_docs(False), "heldout": split_docs(True)}, origin, log


def prepare_source(spec: sources_lib.SourceSpec, out_dir: str | os.PathLike, *,
                   tokenizer: Tokenizer, glob: str = "**/*", text_field: str = "text",
                   heldout_fraction: float = 0.05,
                   max_doc_bytes: int = sources_lib.MAX_DOC_BYTES) -> dict:
    """Read one source (folder, .jsonl or text file), split by document hash, write it
    (replacing DATA_DIR/<name> if it exists)."""
    splits, origin, log = _source_splits(spec, glob=glob, text_field=text_field,
                                         heldout_fraction=heldout_fraction,
                                         max_doc_bytes=max_doc_bytes)
    return write_source(out_dir, spec.name, splits, tokenizer=tokenizer, origin=origin, log=log)


def prepare(sources: list[str], out_dir: str | os.PathLike, *, tokenizer: str | None = "bytes",
            glob: str = "**/*", text_field: str = "text", heldout_fraction: float = 0.05,
            max_doc_bytes: int = sources_lib.MAX_DOC_BYTES, overwrite: bool = False,
            log: Callable[[str], None] = print) -> list[dict]:
    """`moesaic data prepare`: each "NAME=PATH" becomes DATA_DIR/NAME/, all or none (see the
    module docstring); an existing DATA_DIR/NAME is refused unless `overwrite`. Returns the
    manifests."""
    sources_lib.check_max_doc_bytes(max_doc_bytes, "--max-doc-bytes")  # before any reading
    specs = sources_lib.parse_sources(sources)
    out_dir = Path(out_dir)
    existing = [s.name for s in specs if (out_dir / s.name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir}: source(s) {', '.join(existing)} already prepared "
                              "there; pass --overwrite to replace them (nothing was written)")
    tok = load_tokenizer(tokenizer)
    plans = [_source_splits(spec, glob=glob, text_field=text_field,
                            heldout_fraction=heldout_fraction, max_doc_bytes=max_doc_bytes)
             for spec in specs]  # every source checked before the first is written
    for name in remove_leftovers(out_dir):
        log(f"removed {out_dir / name}: left by a run that was killed")
    written: list[tuple[Path, dict]] = []
    try:
        for spec, (splits, origin, read_log) in tqdm(list(zip(specs, plans)), desc="prepare",
                                                     unit="source", disable=len(specs) < 2):
            written.append(_write_tmp(out_dir, spec.name, splits, tokenizer=tok,
                                      origin=origin, log=read_log))
    except BaseException:
        for tmp, _ in written:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for spec, (tmp, _) in zip(specs, written):
        _swap_into_place(tmp, out_dir / spec.name)
    return [manifest for _, manifest in written]
