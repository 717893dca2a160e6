"""Tokenizers and their identity: the byte tokenizer (default) and Hugging Face tokenizer.json.

Byte tokenizer ids: byte b -> id b (0..255), end of document `eos_id=256`, `pad_id=257`,
vocabulary 264 (the model's `vocab_size` in moesaic/configs/common.py). A tokenizer's
`identity` ("bytes", or "hf:" + the first 16 hex digits of the sha256 of tokenizer.json) is
written into every manifest, and `check_tokenizer` compares it with a model config before
training starts.

Corpus text is encoded with the Hugging Face tokenizer's `encode_special_tokens` on: a
special token's text inside a document ("see <|endoftext|> here") is encoded as ordinary
text, so a document cannot forge an end-of-document (or any control) token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

BYTE_VOCAB_SIZE = 264
BYTE_EOS_ID = 256
BYTE_PAD_ID = 257
HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Text -> int32 ids. `identity` names the tokenizer in manifests."""

    identity: str
    vocab_size: int
    eos_id: int
    pad_id: int
    _hf: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def is_bytes(self) -> bool:
        return self.identity == "bytes"

    def encode(self, text: str) -> np.ndarray:
        if self._hf is None:
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: np.ndarray) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self._hf is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self._hf.decode(ids, skip_special_tokens=True)

    def manifest(self) -> dict:
        return {"identity": self.identity, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id}


BYTES = Tokenizer("bytes", BYTE_VOCAB_SIZE, BYTE_EOS_ID, BYTE_PAD_ID)


def tokenizer_file(spec: str | os.PathLike) -> Path:
    """The tokenizer.json a path names: the file itself, or DIR/tokenizer.json."""
    path = Path(spec)
    return path / "tokenizer.json" if path.is_dir() else path


def hf_identity(path: str | os.PathLike) -> str:
    """"hf:<sha256 of the tokenizer.json bytes>[:16]"."""
    return "hf:" + hashlib.sha256(tokenizer_file(path).read_bytes()).hexdigest()[:16]


def load_tokenizer(spec: str | os.PathLike | None = "bytes") -> Tokenizer:
    """"bytes" (or None/"") -> the byte tokenizer; a path to tokenizer.json -> an HF tokenizer."""
    if spec in (None, "", "bytes"):
        return BYTES
    path = tokenizer_file(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(spec)!r}: no such file (want 'bytes' or a "
                                "path to a Hugging Face tokenizer.json)")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception subclasses
        raise ValueError(f"tokenizer {str(path)!r}: not a Hugging Face tokenizer.json ({e})") from e
    hf.encode_special_tokens = True  # special-token text in a document stays text
    hf.no_truncation()  # a saved truncation would cut every document (and inflate bytes/token)
    hf.no_padding()  # a saved padding would make pad ids training data
    vocab = hf.get_vocab(with_added_tokens=True)
    eos = next((vocab[t] for t in HF_EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise ValueError(f"tokenizer {str(path)!r}: no end-of-document token among "
                         f"{HF_EOS_CANDIDATES}; add one to the tokenizer")
    pad = next((vocab[t] for t in ("<pad>", "<|pad|>", "[PAD]") if t in vocab), eos)
    # ids may have gaps: the embedding table must hold the largest, not count them
    size = max(hf.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    return Tokenizer(hf_identity(path), size, eos, pad, hf)


def _model_field(model_config: Any, name: str, default: Any = None) -> Any:
    if isinstance(model_config, Mapping):
        return model_config.get(name, default)
    return getattr(model_config, name, default)


def _read_manifests(data: str | os.PathLike | Mapping) -> list[dict]:
    if isinstance(data, Mapping):
        return [dict(data)]
    path = Path(data)
    if path.is_file():
        return [json.loads(path.read_text())]
    if (path / "manifest.json").is_file():
        return [json.loads((path / "manifest.json").read_text())]
    found = sorted(path.glob("*/manifest.json")) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{str(path)!r}: no manifest.json there nor in its sub-folders; "
                                "prepare the data with `moesaic data prepare` first")
    return [json.loads(p.read_text()) for p in found]


def model_tokenizer_identity(model_config: Any) -> str:
    """The identity of the tokenizer a model reads (its `tokenizer`: "bytes" or a path)."""
    spec = _model_field(model_config, "tokenizer", "bytes") or "bytes"
    return "bytes" if spec == "bytes" else hf_identity(spec)


def check_tokenizer(model_config: Any, data_dir_or_manifest: str | os.PathLike | Mapping) -> None:
    """Raise ValueError when the data was not tokenized with the model's tokenizer.

    `model_config` is a ModelConfig, ConfigDict or dict with `tokenizer` ("bytes" or a path to
    tokenizer.json), `vocab_size` and `eos_id`. `data_dir_or_manifest` is a source folder, a
    DATA_DIR of source folders (all are checked), a manifest.json path or a manifest dict.
    """
    spec = _model_field(model_config, "tokenizer", "bytes") or "bytes"
    if spec != "bytes" and not tokenizer_file(spec).is_file():
        where = "" if Path(spec).is_absolute() else f" (relative: read from {os.getcwd()})"
        raise FileNotFoundError(
            f"model.tokenizer={str(spec)!r}: no such file{where}. This is the tokenizer path "
            "recorded in the model's config (a checkpoint's meta.json keeps the path it was "
            "trained with); the tokenizer or the checkpoint may have moved: put tokenizer.json "
            "back at that path")
    want = model_tokenizer_identity(model_config)
    vocab = _model_field(model_config, "vocab_size")
    eos = _model_field(model_config, "eos_id")
    for m in _read_manifests(data_dir_or_manifest):
        tok, name = m["tokenizer"], m.get("source", "?")
        if tok["identity"] != want:
            raise ValueError(
                f"data source {name!r} was tokenized with {tok['identity']!r} but the model uses "
                f"{want!r} (model.tokenizer={spec!r}); re-run `moesaic data prepare` with "
                "--tokenizer matching the model, or change model.tokenizer")
        if eos is not None and tok["eos_id"] != eos:
            raise ValueError(f"data source {name!r} marks document ends with id {tok['eos_id']} "
                             f"but model.eos_id={eos}")
        if vocab is not None and tok["vocab_size"] > vocab:
            raise ValueError(f"data source {name!r} has vocabulary {tok['vocab_size']} larger "
                             f"than model.vocab_size={vocab}")
