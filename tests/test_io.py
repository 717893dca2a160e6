"""Model checkpoints: round trip, single tensors, and relative paths (orbax wants absolute ones;
the README's `make demo` passes a relative workdir)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from moesaic.model import Decoder, ModelConfig, io


def test_round_trip_under_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Decoder(ModelConfig(d_model=32, d_ff=48, n_layers=2, n_experts=3, top_k=2),
                    rngs=nnx.Rngs(0))
    io.save_model("runs/model", model, {"kind": "public"})
    assert io.is_complete(tmp_path / "runs" / "model")
    assert not (tmp_path / "runs" / "model.partial").exists()
    restored, meta = io.load("runs/model")
    before, after = io.flatten(nnx.state(model)), io.flatten(nnx.state(restored))
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert meta["fingerprint"] == io.fingerprint(before)
    router = io.load_tensors("runs/model", ["blocks/ffn/router"])["blocks/ffn/router"]
    np.testing.assert_array_equal(router, before["blocks/ffn/router"])
    assert io.TensorReader("runs/model", "blocks/ffn/w_gate").rows_per_chunk == 1
