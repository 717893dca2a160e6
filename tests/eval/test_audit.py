"""The extraction audit: a model trained to memorise a party's documents reproduces them, the
model before that training does not; the counting on hand-made cases; the command's output
holds rates only."""

from __future__ import annotations

import json
import random

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from moesaic.cli import main as cli
from moesaic.data.prepare import write_source
from moesaic.data.tokenizer import BYTES
from moesaic.eval import audit
from moesaic.model import ModelConfig, checkpoint
from moesaic.model.transformer import Decoder, lm_loss

# documents of exactly prefix + continuation tokens: every prefix starts a document
PREFIX, MATCH = 8, 8
rng = random.Random(0)
DOCS = ["".join(rng.choice("abcdefghijklmnop") for _ in range(PREFIX + MATCH)) for _ in range(4)]


def _memorised(model: Decoder, steps: int = 80) -> Decoder:
    rows = np.array([[*d.encode(), BYTES.eos_id] for d in DOCS], np.int32)
    graphdef, params = nnx.split(model)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p), rows)[0])(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def party(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    write_source(out, "party", {"train": lambda: DOCS, "heldout": lambda: DOCS},
                 tokenizer=BYTES, origin={"kind": "test"})
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
    before = Decoder(cfg, rngs=nnx.Rngs(0))
    return out, before, _memorised(Decoder(cfg, rngs=nnx.Rngs(0)))


def test_a_memorising_model_is_extracted_and_the_model_before_it_is_not(party):
    data, before, after = party
    kw = dict(n=4, prefix_len=PREFIX, match_len=MATCH)
    memorised = audit.extraction(after, data, "party", **kw)
    assert memorised.samples == 4 and memorised.exact_rate >= 0.75
    assert memorised.loose_rate >= memorised.exact_rate
    assert audit.extraction(before, data, "party", **kw).loose_rate == 0.0


def test_rates_count_exact_and_loose_matches():
    truth = [np.arange(10)] * 3
    off_by_one = np.arange(10).copy()
    off_by_one[4] = 99
    got = audit.rates([np.arange(10), off_by_one, np.zeros(10, int)], truth, prefix_len=5)
    assert (got.exact, got.loose, got.samples) == (1, 2, 3)
    assert audit.edit_distance(np.array([1, 2, 3]), np.array([2, 3])) == 1


def test_the_command_reports_rates_only_and_refuses_bad_input(party, tmp_path, capsys):
    data, _, after = party
    path = tmp_path / "model"
    checkpoint.save_model(path, after, {"config": {"data": {"seq_len": 32}}})
    out = tmp_path / "audit.json"
    base = ["audit", "extraction", "--model", str(path), "--data", str(data), "--prefix-len",
            str(PREFIX), "--match-len", str(MATCH), "--no-progress"]
    assert cli.main([*base, "--source", "party", "--samples", "4", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["exact_rate"] >= 0.75 and record["samples"] == 4
    assert not any(d in out.read_text() + capsys.readouterr().out for d in DOCS)  # no text
    assert cli.main([*base, "--source", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err
    assert cli.main([*base[:-5], "--source", "party", "--prefix-len", "30",
                     "--match-len", "8"]) == 2
    assert "context of 32" in capsys.readouterr().err
