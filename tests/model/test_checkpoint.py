"""Model checkpoints: round trip, single tensors, relative paths (orbax wants absolute ones;
the README's `make demo` passes a relative workdir), and overwrites killed at every step."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx

from moesaic.model import Decoder, ModelConfig, checkpoint, streaming


def test_round_trip_under_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Decoder(ModelConfig(d_model=32, d_ff=48, n_layers=2, n_experts=3, top_k=2),
                    rngs=nnx.Rngs(0))
    checkpoint.save_model("runs/model", model, {"kind": "public"})
    assert checkpoint.is_complete(tmp_path / "runs" / "model")
    assert not (tmp_path / "runs" / "model.partial").exists()
    restored, meta = checkpoint.load("runs/model")
    before, after = checkpoint.flatten(nnx.state(model)), checkpoint.flatten(nnx.state(restored))
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert meta["fingerprint"] == checkpoint.fingerprint(before)
    router = checkpoint.load_tensors("runs/model", ["blocks/ffn/router"])["blocks/ffn/router"]
    np.testing.assert_array_equal(router, before["blocks/ffn/router"])
    assert checkpoint.TensorReader("runs/model", "blocks/ffn/w_gate").rows_per_chunk == 1


def _flat(value):
    return {"blocks/w": np.full((3, 4), value, np.float32), "embed": np.arange(5.0) + value}


def _which(path):
    """The value the checkpoint at `path` was written with, after checking it is whole."""
    meta = checkpoint.read_meta(path)
    flat = checkpoint.load_tensors(path, checkpoint.tensor_metadata(path))
    assert checkpoint.fingerprint(flat) == meta["fingerprint"]
    for name, array in _flat(meta["value"]).items():
        np.testing.assert_array_equal(flat[name], array)
    return meta["value"]


def test_overwrite_killed_while_deleting_the_old_checkpoint(tmp_path, monkeypatch):
    """A kill while the replaced checkpoint is being deleted leaves PATH the new checkpoint,
    whole; the half-deleted old one is not accepted as a checkpoint."""
    path = tmp_path / "ckpt"
    checkpoint.save(path, _flat(1.0), {"kind": "x", "value": 1.0})
    real_rmtree = shutil.rmtree

    def killed_rmtree(target, ignore_errors=False):
        target = pathlib.Path(target)
        if target.name.endswith(".partial"):
            return real_rmtree(target, ignore_errors=ignore_errors)
        files = sorted((p for p in (target / checkpoint.PARAMS).rglob("*") if p.is_file()),
                       key=lambda p: p.stat().st_size)
        files[-1].unlink()  # half deleted, meta.json still there
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    for save in (checkpoint.save, lambda p, flat, meta, **kw: streaming.save_streaming(p, {
            n: streaming.TensorSource(a.shape, a.dtype, lambda a=a: [a]) for n, a in flat.items()},
            meta, **kw)):
        with pytest.raises(KeyboardInterrupt):
            save(path, _flat(2.0), {"kind": "x", "value": 2.0}, overwrite=True)
        assert _which(path) == 2.0
        aside = checkpoint.aside_path(path)
        assert (aside / checkpoint.META).is_file() and not checkpoint.is_complete(aside)
        with pytest.raises(ValueError, match="not a complete"):
            checkpoint.read_meta(aside)
        monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
        checkpoint.save(path, _flat(1.0), {"kind": "x", "value": 1.0}, overwrite=True)
        assert _which(path) == 1.0 and not aside.exists()
        monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)


def test_overwrite_killed_between_the_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    checkpoint.save(path, _flat(1.0), {"kind": "x", "value": 1.0})
    real_rename = pathlib.Path.rename

    def rename(self, target):
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt("killed")
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, _flat(2.0), {"kind": "x", "value": 2.0}, overwrite=True)
    monkeypatch.setattr(pathlib.Path, "rename", real_rename)
    assert not path.exists()  # never a mix: the old one is aside, whole
    assert not checkpoint.is_complete(path.with_name("ckpt.partial"))
    real_rename(checkpoint.aside_path(path), path)
    assert _which(path) == 1.0


def test_tensor_digest_fed_in_pieces_is_the_tensor_hash():
    """Code that hashes a tensor while reading it (merge's NaN scan, streaming saves) feeds
    `tensor_digest` piece by piece; the result must be `tensor_hash` of the whole."""
    array = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    digest = checkpoint.tensor_digest(array.dtype, array.shape)
    for start in range(0, 7, 3):
        digest.update(np.ascontiguousarray(array[start:start + 3]).tobytes())
    assert digest.hexdigest() == checkpoint.tensor_hash(array)
    assert checkpoint.tensor_hash(array) != checkpoint.tensor_hash(array.reshape(3, 7))


def test_blake3_is_recorded_and_a_sha256_checkpoint_still_verifies(tmp_path):
    """New checkpoints record "hash": "blake3"; one whose meta.json has no "hash" (written
    before blake3) is verified with sha256, and a damaged one is still refused."""
    import hashlib
    import json

    path = tmp_path / "ckpt"
    checkpoint.save(path, _flat(1.0), {"kind": "x", "value": 1.0})
    meta = checkpoint.read_meta(path)
    assert meta["hash"] == "blake3"
    checkpoint.verify(path)
    array = _flat(1.0)["blocks/w"]
    header = f"{array.dtype}|{array.shape}|".encode()
    assert checkpoint.tensor_hash(array, "sha256") == hashlib.sha256(
        header + array.tobytes()).hexdigest()
    assert checkpoint.tensor_hash(array) != checkpoint.tensor_hash(array, "sha256")
    legacy = {k: v for k, v in meta.items() if k != "hash"}
    legacy["fingerprint"] = checkpoint.fingerprint(_flat(1.0), "sha256")
    (path / checkpoint.META).write_text(json.dumps(legacy))
    checkpoint.verify(path)
    (path / checkpoint.META).write_text(json.dumps({**legacy, "hash": "blake3"}))
    with pytest.raises(ValueError, match="fingerprint"):
        checkpoint.verify(path)


def test_a_discarded_folder_stays_gone_while_late_writers_finish(tmp_path):
    """A Ctrl-C during a streaming write leaves tensorstore threads that still create files
    for a moment; the half-written folder must not survive them."""
    import threading
    import time

    folder = tmp_path / "out.partial"
    folder.mkdir()
    stop = time.monotonic() + 0.5

    def late_writer():
        while time.monotonic() < stop:
            try:
                (folder / "chunk").mkdir(parents=True, exist_ok=True)
                (folder / "chunk" / "data").write_bytes(b"x")
            except OSError:
                pass
            time.sleep(0.01)
    thread = threading.Thread(target=late_writer)
    thread.start()
    checkpoint.discard(folder, settle=0.2)
    thread.join()
    assert not folder.exists()



def _compressor(path, name):
    spec = checkpoint.TensorReader(path, name)._store.spec().to_json()
    return (spec.get("metadata") or {}).get("compressor")


def test_new_checkpoints_are_uncompressed_and_zstd_ones_still_load(tmp_path, monkeypatch):
    """Tensors are written without zstd (`checkpoint.COMPRESS`); a checkpoint written with it
    (every one before) still loads, reads by rows and verifies."""
    flat = {**_flat(2.0), "blocks/ffn/w_up": np.arange(4 * 3 * 5, dtype=np.float32).reshape(
        4, 3, 5)}
    monkeypatch.setattr(checkpoint, "COMPRESS", True)
    checkpoint.save(tmp_path / "old", flat, {"kind": "x"})
    monkeypatch.setattr(checkpoint, "COMPRESS", False)
    checkpoint.save(tmp_path / "new", flat, {"kind": "x"})
    assert _compressor(tmp_path / "old", "blocks/ffn/w_up")["id"] == "zstd"
    assert _compressor(tmp_path / "new", "blocks/ffn/w_up") is None
    for which in ("old", "new"):
        checkpoint.verify(tmp_path / which)
        loaded = checkpoint.load_tensors(tmp_path / which, flat)
        for name in flat:
            np.testing.assert_array_equal(loaded[name], flat[name], err_msg=f"{which} {name}")
        np.testing.assert_array_equal(
            checkpoint.TensorReader(tmp_path / which, "blocks/ffn/w_up")[1:3], flat[
                "blocks/ffn/w_up"][1:3])
    assert (checkpoint.read_meta(tmp_path / "old")["fingerprint"]
            == checkpoint.read_meta(tmp_path / "new")["fingerprint"])


def test_scan_finds_the_first_non_finite_value_and_not_an_overflowing_sum():
    """The NaN/Inf scan tests a piece's sum first; finite values whose sum overflows are not
    refused, and the index of the first NaN or Inf is exact across pieces."""
    big = np.full((4, 3), 3e38, np.float32)
    assert checkpoint.scan(big.dtype, big.shape, [big[:2], big[2:]])[1] is None
    bad = np.zeros((5, 3), np.float32)
    bad[3, 1], bad[4, 0] = np.inf, np.nan
    digest, where = checkpoint.scan(bad.dtype, bad.shape, [bad[:2], bad[2:4], bad[4:]])
    assert where == (3, 1)
    ints = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert checkpoint.scan(ints.dtype, ints.shape, [ints]) == (checkpoint.tensor_hash(ints), None)
