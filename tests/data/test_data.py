"""moesaic.data: deterministic batches, process slices, split disjointness, bad input, corpora."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from moesaic.cli import main as cli
from moesaic.data import (
    TokenBatches,
    check_tokenizer,
    corpora,
    documents,
    heldout_sequences,
    parse_mixture,
    prepare,
    sources,
)
from moesaic.data.loader import packed_rows
from moesaic.data.tokenizer import load_tokenizer

EOS = 256


@pytest.fixture(scope="session")
def embedded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded")
    corpora.build_embedded(out, size="smoke")
    return out


def _doc_keys(data_dir, source, split) -> set[bytes]:
    return {hashlib.sha256(d.tobytes()).digest() for d in documents(data_dir, source, split)}


def _write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def _text_folder(root: Path, n: int = 40) -> Path:
    return _write_tree(root, {f"doc{i:02d}.txt": f"document number {i}\n" + "some words\n" * (i + 2)
                              for i in range(n)})


# ---- loader ---------------------------------------------------------------------------------

def test_batch_is_a_function_of_seed_mixture_step(embedded):
    def batches(mixture, seed):
        return TokenBatches(embedded, mixture, seq_len=64, global_batch=8, seed=seed)

    a, b = batches("code:1,law:2", 0), batches("code:1,law:2", 0)
    assert a.get(3).shape == (8, 65) and a.get(3).dtype == np.int32
    np.testing.assert_array_equal(a.get(3), b.get(3))
    assert not np.array_equal(a.get(3), a.get(4))
    assert not np.array_equal(a.get(3), batches("code:1,law:2", 1).get(3))
    assert not np.array_equal(a.get(3), batches("math", 0).get(3))
    assert a.tokenizer_id == "bytes" and a.bytes_per_token == pytest.approx(1.0)


def test_resumed_stream_equals_uninterrupted(embedded):
    # Steps beyond one epoch of "math" at this size, so epoch boundaries are crossed.
    first = TokenBatches(embedded, "math", seq_len=128, global_batch=16, seed=7)
    epoch = first.dataset.per_epoch // 16 + 2
    uninterrupted = [b for _, b in zip(range(epoch + 3), first)]
    resumed = TokenBatches(embedded, "math", seq_len=128, global_batch=16, seed=7)
    for step in range(epoch, epoch + 3):
        np.testing.assert_array_equal(resumed.get(step), uninterrupted[step])


def test_process_slices_are_disjoint_and_form_the_global_batch(embedded):
    kw = dict(seq_len=32, global_batch=8, seed=3)
    full = TokenBatches(embedded, "public", **kw).get(5)
    parts = [TokenBatches(embedded, "public", process_index=p, process_count=4, **kw).get(5)
             for p in range(4)]
    assert all(p.shape == (2, 33) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full)
    rows = [row.tobytes() for part in parts for row in part]
    assert len(set(rows)) == len(rows)
    with pytest.raises(ValueError, match="not divisible"):
        TokenBatches(embedded, "public", process_count=3, **kw)


def test_rows_are_documents_joined_by_eos(embedded):
    docs = {d.tobytes() for d in documents(embedded, "prose", "train")}
    batch = TokenBatches(embedded, "prose", seq_len=16384, global_batch=2, seed=0).get(0)
    inner = 0
    for row in batch:
        cuts = np.flatnonzero(row == EOS)
        for start, stop in zip(cuts[:-1], cuts[1:]):  # whole documents between two eos
            assert row[start + 1:stop].tobytes() in docs
            inner += 1
        assert np.all(row[row != EOS] < 256)
    assert inner > 0


def test_mixture_proportions_and_parsing(embedded):
    assert parse_mixture("code:1,law:3") == {"code": 0.25, "law": 0.75}
    assert parse_mixture({"math": 2}) == {"math": 1.0}
    for bad in ("", "code:0", "code:x", "code,code", "code:nan", "code:1,law:inf"):
        with pytest.raises(ValueError):
            parse_mixture(bad)
    with pytest.raises(FileNotFoundError, match="no prepared source 'nope'"):
        TokenBatches(embedded, "nope", seq_len=8, global_batch=2, seed=0)
    loader = TokenBatches(embedded, "code:1,math:3", seq_len=256, global_batch=40, seed=0)
    texts = [bytes(r[r < 256].astype(np.uint8)) for r in loader.get(0)]
    from_math = sum(b"Answer: " in t or b"Problem " in t for t in texts)
    assert from_math == 30  # grain's mix keeps exact proportions within a batch


def test_heldout_sequences(embedded):
    held = heldout_sequences(embedded, "law", seq_len=64)
    stream = np.concatenate([np.append(d, EOS) for d in documents(embedded, "law", "heldout")])
    n = len(stream) // 65
    np.testing.assert_array_equal(held.tokens, stream[: n * 65].reshape(n, 65))
    # a sample is rows of the full evaluation, spread over the split, not its first rows
    sample = heldout_sequences(embedded, "law", seq_len=64, max_sequences=5)
    picks = np.linspace(0, n - 1, 5).round().astype(int)
    assert picks[-1] == n - 1 and len(set(picks)) == 5
    np.testing.assert_array_equal(sample.tokens, held.tokens[picks])
    assert sample.num_bytes == int((sample.tokens[:, 1:] != EOS).sum())
    assert heldout_sequences(embedded, "law", seq_len=64, max_sequences=10**6).tokens.shape[0] == n
    tokens, rates, n_docs = packed_rows(embedded, "law", "heldout", width=65, max_rows=5)
    np.testing.assert_array_equal(tokens, sample.tokens)
    np.testing.assert_array_equal(rates, (tokens != EOS).astype(float))  # one byte per token
    assert 1 <= n_docs <= len(list(documents(embedded, "law", "heldout")))
    targets = held.tokens[:, 1:]
    assert held.exact and held.num_targets == targets.size
    assert held.num_bytes == int((targets != EOS).sum()) == targets.size - held.num_eos_targets


# ---- splits and corpora ----------------------------------------------------------------------

def test_embedded_splits_are_disjoint_and_public_is_a_share(embedded):
    domain_train, domain_held = set(), set()
    for name in corpora.DOMAINS:
        manifest = json.loads((embedded / name / "manifest.json").read_text())
        train, held = _doc_keys(embedded, name, "train"), _doc_keys(embedded, name, "heldout")
        assert train and held and not train & held
        assert manifest["splits"]["train"]["documents"] == len(train)
        domain_train |= train
        domain_held |= held
    public_train = _doc_keys(embedded, "public", "train")
    public_held = _doc_keys(embedded, "public", "heldout")
    assert public_train <= domain_train and not public_train & public_held
    # public held-out text is held out from every model: no party trains on it either
    assert public_held and not public_held & (domain_train | domain_held)
    share = len(public_train) / len(domain_train)
    assert 0.07 < share < 0.18


def test_near_copies_are_dropped_before_the_split():
    mit = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
           "software and associated documentation files, to deal in the Software without "
           "restriction, including without limitation the rights to use, copy, modify, merge, "
           "publish, distribute, sublicense, and or sell copies of the Software. ") * 2
    other = " ".join(f"word{i}" for i in range(80))
    texts = [f"Copyright (c) 2020 Ada\n\n{mit}", other, f"Copyright 1999 Bob and friends\n{mit}",
             mit + "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND." * 4]
    kept = list(corpora._pieces(texts))
    # the second licence is a near copy of the first, the fourth holds the first almost whole
    assert [k.split()[:2] for k in kept] == [["Copyright", "(c)"], ["word0", "word1"]]


def test_no_embedded_heldout_document_is_a_near_copy_of_a_training_one():
    for name in ("code", "law"):  # the domains where templates and licence copies abound
        docs = corpora.domain_documents(name, "smoke")
        train = [corpora.shingles(d) for d in docs["train"]]
        for held in map(corpora.shingles, docs["heldout"]):
            worst = max(len(held & t) / min(len(held), len(t)) for t in train)
            assert worst < corpora.NEAR_COPY, name


def test_embedded_build_is_byte_identical(embedded, tmp_path):
    corpora.build_embedded(tmp_path, size="smoke")
    files = sorted(p.relative_to(embedded) for p in embedded.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 5 * 7
    for rel in files:
        assert (embedded / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_prepared_splits_are_disjoint_and_stable(tmp_path):
    src = _text_folder(tmp_path / "src", 60)
    scratch = lambda: {p.name for p in Path(tempfile.gettempdir()).glob("tmp*tfds")}  # noqa: E731
    before = scratch()
    (m,) = prepare.prepare([f"a={src}"], tmp_path / "out", heldout_fraction=0.2)
    assert scratch() <= before  # TFDS's scratch folder is not left in the system's /tmp
    (again,) = prepare.prepare([f"a={src}"], tmp_path / "out2", heldout_fraction=0.2)
    assert m["content_hash"] == again["content_hash"]
    train, held = _doc_keys(tmp_path / "out", "a", "train"), _doc_keys(tmp_path / "out", "a",
                                                                        "heldout")
    assert len(train) + len(held) == 60 and not train & held
    assert m["splits"]["train"]["bytes"] + m["splits"]["heldout"]["bytes"] == sum(
        p.stat().st_size for p in src.iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a"]


# ---- bad input -------------------------------------------------------------------------------

def test_missing_path_and_duplicate_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="source 'x': path .*nowhere.* does not exist"):
        prepare.prepare([f"x={tmp_path / 'nowhere'}"], tmp_path / "out")
    src = _text_folder(tmp_path / "src")
    with pytest.raises(ValueError, match="duplicate source name 'a'"):
        prepare.prepare([f"a={src}", f"a={src}"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_source_is_refused_naming_it(tmp_path):
    empty = _write_tree(tmp_path / "empty", {"blob.bin": b"\x00\x01\x02", "e.txt": ""})
    with pytest.raises(ValueError, match=r"source 'e': no documents.*blob.bin.*binary"):
        prepare.prepare([f"e={empty}"], tmp_path / "out")
    assert not (tmp_path / "out" / "e").exists()


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path):
    src = _text_folder(tmp_path / "src")
    _write_tree(src, {"sub/image.png": b"\x89PNG\r\n\x1a\n\x00\x00", "latin1.txt": "caf\xe9"
                      .encode("latin-1")})
    (m,) = prepare.prepare([f"a={src}"], tmp_path / "out", heldout_fraction=0.2)
    assert m["num_skipped"] == 2
    assert {s["file"]: s["reason"].split(" ")[0] for s in m["skipped"]} == {
        "latin1.txt": "not", "sub/image.png": "binary"}
    assert m["splits"]["train"]["documents"] + m["splits"]["heldout"]["documents"] == 40


def test_gigantic_line_is_cut_or_skipped(tmp_path):
    line = "é" + "x" * 2500 + "\n"
    src = _write_tree(tmp_path / "src", {"big.txt": "head\n" + line + "tail\n"})
    log = sources.ReadLog()
    docs = list(sources.read_source(src, log, max_doc_bytes=1000))
    assert "".join(docs) == "head\n" + line + "tail\n"
    assert all(len(d.encode()) <= 1000 for d in docs) and len(docs) == 4
    assert log.long_lines_cut == 1 and log.documents_cut == 1
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"text": "y" * 5000}) + "\n" + json.dumps({"text": "ok"}) + "\n"
                     + "{not json\n" + json.dumps({"body": "z"}) + "\n")
    log = sources.ReadLog()
    assert list(sources.read_jsonl(jsonl, "text", log, max_record_bytes=1000)) == ["ok"]
    assert [s["file"] for s in log.skipped] == ["x.jsonl:1", "x.jsonl:3", "x.jsonl:4"]
    assert "longer than 1000 bytes" in log.skipped[0]["reason"]


def test_failed_prepare_leaves_nothing_and_keeps_the_old_dataset(tmp_path):
    src = _text_folder(tmp_path / "src", 60)
    (good,) = prepare.prepare([f"a={src}"], tmp_path / "out", heldout_fraction=0.2)
    one = _write_tree(tmp_path / "one", {"only.txt": "a single document\n"})
    score = sources.heldout_score("a single document\n")
    with pytest.raises(ValueError, match="split '(heldout|train)' has no documents"):
        prepare.prepare([f"a={one}"], tmp_path / "out", heldout_fraction=min(0.99, score + 0.01)
                        if score < 0.98 else 0.01, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a"]
    kept = json.loads((tmp_path / "out" / "a" / "manifest.json").read_text())
    assert kept["content_hash"] == good["content_hash"]


def _hf_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "</s>", "<pad>"])
    tok.train_from_iterator(["some words about documents number one two three"] * 5, trainer)
    tok.save(str(path))
    return path


def test_tokenizer_identity_is_checked_against_the_model(tmp_path):
    src = _text_folder(tmp_path / "src")
    hf = _hf_tokenizer(tmp_path / "tokenizer.json")
    prepare.prepare([f"b={src}"], tmp_path / "out", heldout_fraction=0.2)
    prepare.prepare([f"h={src}"], tmp_path / "out", tokenizer=str(hf), heldout_fraction=0.2)
    tok = load_tokenizer(str(hf))
    manifest = json.loads((tmp_path / "out" / "h" / "manifest.json").read_text())
    assert manifest["tokenizer"]["identity"] == tok.identity and tok.identity.startswith("hf:")
    assert manifest["tokenizer"]["eos_id"] == 1
    byte_model = {"tokenizer": "bytes", "vocab_size": 264, "eos_id": 256}
    hf_model = {"tokenizer": str(hf), "vocab_size": tok.vocab_size, "eos_id": 1}
    check_tokenizer(byte_model, tmp_path / "out" / "b")
    check_tokenizer(hf_model, tmp_path / "out" / "h" / "manifest.json")
    with pytest.raises(ValueError, match=r"'h' was tokenized with 'hf:.*' but the model uses "
                                         r"'bytes'"):
        check_tokenizer(byte_model, tmp_path / "out")
    with pytest.raises(ValueError, match="'b' was tokenized with 'bytes'"):
        check_tokenizer(hf_model, tmp_path / "out" / "b")
    with pytest.raises(ValueError, match="model.eos_id=0"):
        check_tokenizer({**byte_model, "eos_id": 0}, tmp_path / "out" / "b")
    with pytest.raises(ValueError, match="mixes tokenizers"):
        TokenBatches(tmp_path / "out", "b,h", seq_len=8, global_batch=2, seed=0)
    held = heldout_sequences(tmp_path / "out", "h", seq_len=4)
    assert not held.exact and held.num_bytes > held.num_targets - held.num_eos_targets


def test_cli_prepare(tmp_path, capsys):
    src = _text_folder(tmp_path / "src")
    argv = ["data", "prepare", "--source", f"c={src}", "--out", str(tmp_path / "out"),
            "--glob", "doc1*.txt", "--heldout-fraction", "0.3"]
    assert cli.main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "c" / "manifest.json").read_text())
    assert sum(s["documents"] for s in manifest["splits"].values()) == 10
    assert cli.main(["data", "prepare", "--source", "c=/nonexistent/x", "--out",
                     str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- hidden files, document limits, special tokens, error context -------------------------------

def _returns_within(fn, seconds: float = 20.0):
    """fn()'s result or exception, failing (not hanging) when it does not return in time."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} did not return in {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_hidden_files_and_folders_are_skipped_unless_the_glob_names_them(tmp_path):
    src = _text_folder(tmp_path / "src", 20)
    _write_tree(src, {".env": "API_KEY=hunter2\n",
                      ".git/config": "[user]\n  name = Ada Author\n",
                      ".git/logs/HEAD": "0000 1111 Ada Author <ada@example.com> commit\n",
                      "sub/.secret.txt": "token 1234\n",
                      ".github/workflows/ci.yml": "name: ci workflow\n"})
    (m,) = prepare.prepare([f"a={src}"], tmp_path / "out", heldout_fraction=0.2)
    skipped = {s["file"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {".env", ".git/", ".github/", "sub/.secret.txt"}
    assert skipped[".git/"].startswith("hidden folder, 2 file(s) not read")
    assert skipped[".env"].startswith("hidden file") and m["num_skipped"] == 4
    texts = [bytes(d.astype(np.uint8)).decode() for split in ("train", "heldout")
             for d in documents(tmp_path / "out", "a", split)]
    assert len(texts) == 20 and not any("Ada" in t or "hunter2" in t or "1234" in t
                                        for t in texts)
    # a glob part that starts with '.' names hidden paths; `*` and `**` do not
    log = sources.ReadLog()
    docs = list(sources.read_source(src, log, glob=".github/**/*"))
    assert docs == ["name: ci workflow\n"] and log.skipped == []
    log = sources.ReadLog()
    assert sorted(sources.read_source(src, log, glob="**/.*")) == [
        "API_KEY=hunter2\n", "token 1234\n"]
    assert not sources.glob_names_hidden((".git", "config"), "**/.*")


def test_max_doc_bytes_below_one_character_is_refused(tmp_path, capsys):
    for text, limit in (("abc\n", 0), ("ééé\n", 1), ("😀😀\n", 3)):
        with pytest.raises(ValueError, match=f"max_bytes {limit}: must be an integer of at "
                                             "least 4"):
            _returns_within(lambda t=text, n=limit: sources.cut_document(t, n))
    assert _returns_within(lambda: sources.cut_document("😀😀\n", 4)) == ["😀", "😀", "\n"]
    src = _text_folder(tmp_path / "src")
    with pytest.raises(ValueError, match="--max-doc-bytes 3: must be an integer of at least 4"):
        _returns_within(lambda: prepare.prepare([f"a={src}"], tmp_path / "out",
                                                max_doc_bytes=3))
    argv = ["data", "prepare", "--source", f"a={src}", "--out", str(tmp_path / "out"),
            "--max-doc-bytes", "0"]
    assert _returns_within(lambda: cli.main(argv)) == 2
    assert "--max-doc-bytes 0: must be an integer of at least 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_file_s_own_truncation_padding_and_id_gaps_do_not_leak_in(tmp_path):
    """A saved tokenizer.json may carry truncation or padding, and ids with gaps: documents
    are encoded whole, unpadded, and the vocabulary holds the largest id."""
    from tokenizers import Tokenizer

    (tmp_path / "tok").mkdir()
    path = _hf_tokenizer(tmp_path / "tok" / "tokenizer.json")

    hf = Tokenizer.from_file(str(path))
    plain = load_tokenizer(str(path)).encode("some words about documents number one two")
    hf.enable_truncation(max_length=2)
    hf.enable_padding(length=32, pad_id=2, pad_token="<pad>")
    data = json.loads(hf.to_str())
    data["added_tokens"][0]["id"] = 500  # <unk> moved far out: the ids have a gap
    data["model"]["vocab"]["<unk>"] = 500
    path.write_text(json.dumps(data))
    tok = load_tokenizer(str(path))
    assert list(tok.encode("some words about documents number one two")) == list(plain)
    assert tok.vocab_size == 501
    # a folder holding tokenizer.json names it, for the data and for the model alike
    src = _text_folder(tmp_path / "src")
    prepare.prepare([f"h={src}"], tmp_path / "out", tokenizer=str(tmp_path / "tok"),
                    heldout_fraction=0.2)
    check_tokenizer({"tokenizer": str(tmp_path / "tok"), "vocab_size": 501, "eos_id": 1},
                    tmp_path / "out" / "h")


def _byte_level_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["see the words here and there"] * 5, trainer)
    tok.save(str(path))
    return path


def test_special_token_text_in_a_document_stays_text(tmp_path):
    tok = load_tokenizer(str(_byte_level_tokenizer(tmp_path / "tokenizer.json")))
    text = "see <|endoftext|> here <pad>"
    ids = tok.encode(text)
    assert tok.eos_id == 0 and tok.pad_id == 1
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == text
    src = _write_tree(tmp_path / "src", {f"d{i}.txt": f"doc {i} ends <|endoftext|> not\n"
                                         for i in range(20)})
    prepare.prepare([f"h={src}"], tmp_path / "out", tokenizer=str(tmp_path / "tokenizer.json"),
                    heldout_fraction=0.2)
    for split in ("train", "heldout"):
        for doc in documents(tmp_path / "out", "h", split):
            assert tok.eos_id not in doc and "<|endoftext|>" in tok.decode(doc)


def test_errors_name_the_source_and_the_recorded_tokenizer_path(tmp_path):
    src = _text_folder(tmp_path / "src", 20)
    prepare.prepare([f"tiny={src}"], tmp_path / "out", heldout_fraction=0.2)
    with pytest.raises(ValueError, match=r"source 'tiny' \(train split in '.*out'\) has \d+ "
                                         "tokens .* fewer than one sequence"):
        TokenBatches(tmp_path / "out", "tiny", seq_len=100_000, global_batch=2, seed=0)
    with pytest.raises(ValueError, match=r"source 'tiny' \(heldout split in '.*out'\) has \d+ "
                                         r"tokens .* fewer than one row of 100001 tokens; give "
                                         "it more text or lower data.seq_len"):
        heldout_sequences(tmp_path / "out", "tiny", seq_len=100_000)
    moved = tmp_path / "gone" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=r"model.tokenizer='.*gone/tokenizer.json': no "
                                                "such file.*recorded.*may have moved"):
        check_tokenizer({"tokenizer": str(moved), "vocab_size": 300, "eos_id": 0},
                        tmp_path / "out")
