"""Calibration at merge (moesaic.merge.calibrate): the party gate, kept in the checkpoint,
exactly that party's model when it is sure, rebuilt exactly by remove and add; bad calibration
data refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesaic.cli.main import main
from moesaic.interop.hf_export import export_hf
from moesaic.merge import calibrate, fuse
from moesaic.merge.sources import MergeRefused
from moesaic.model import checkpoint, gate
from moesaic.model.names import GATE_BIAS, GATE_BIGRAM, GATE_CONTEXT, ROUTER
from moesaic.model.params import build_model
from moesaic.routing import ngram
from tests.support.merging import all_tensors, assert_same, make_base, make_branch
from tests.support.planted import BYTE_CFG
from tests.support.training import make_data

QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def calib_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    base = make_base(root / "base", BYTE_CFG)
    branches = {s: make_branch(base, root / f"b_{s}", s, seed, noise=0.3)
                for seed, s in enumerate(["code", "math", "law"], start=1)}
    data = make_data(root / "data")
    request = calibrate.request_from_data(data, BYTE_CFG, seq_len=16, rows=16,
                                          options={"temperatures": [1.0, 4.0]})
    merged = root / "merged"
    fuse.merge_paths(base, [branches["code"], branches["math"]], router="learned-rows",
                     top_k=2, out=merged, calibration=request, **QUIET)
    return {"root": root, "base": base, "branches": branches, "data": data,
            "request": request, "merged": merged}


def test_the_party_gate_is_added_and_kept(calib_world, tmp_path):
    """Calibration adds the party gate (and keeps the proxy rows and each party's counts);
    every other tensor is the plain merge's."""
    w = calib_world
    meta = checkpoint.read_meta(w["merged"])
    record = meta["calibration"]
    assert record["proxy_rows"] == 16 and record["seq_len"] == 16
    assert record["data"]["source"] == "public" and record["gate"] == "bigram"
    assert record["options"]["temperatures"] == [1.0, 4.0]
    assert record["temperature"] in (1.0, 4.0)
    assert min(record["proxy_nll"].values()) == record["proxy_nll"][str(record["temperature"])]
    assert meta["model"]["gate_parties"] == 2 and meta["model"]["gate_buckets"] == 264 * 264
    t = all_tensors(w["merged"])
    np.testing.assert_array_equal(t[calibrate.TOKENS], w["request"].tokens)
    counts = [all_tensors(w["branches"][s]) for s in ("code", "math")]
    big, ctx = gate.tables([c["ngram/bigram"] for c in counts],
                           [c["ngram/context"] for c in counts],
                           temperature=record["temperature"])
    np.testing.assert_array_equal(t[GATE_BIGRAM], big)
    np.testing.assert_array_equal(t[GATE_CONTEXT], ctx)
    np.testing.assert_array_equal(t[GATE_BIAS], 0.0)
    uncalibrated = tmp_path / "plain"
    fuse.merge_paths(w["base"], [w["branches"]["code"], w["branches"]["math"]],
                     router="learned-rows", top_k=2, out=uncalibrated, **QUIET)
    plain = all_tensors(uncalibrated)
    assert "calibration" not in checkpoint.read_meta(uncalibrated)
    assert set(t) - set(plain) == {GATE_BIGRAM, GATE_CONTEXT, GATE_BIAS, calibrate.TOKENS}
    for name in plain:
        np.testing.assert_array_equal(plain[name], t[name], err_msg=name)
    model, _ = checkpoint.load(w["merged"])
    logits, _ = model(w["request"].tokens[:2, :-1])
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="party gate over 2 parties"):
        export_hf(w["merged"], tmp_path / "hf")  # FlexOlmo's router is linear only
    assert not (tmp_path / "hf").exists()


def test_a_gate_on_one_party_is_that_party_merged_alone(calib_world, tmp_path):
    """The gate mixes each party's model alone: with all its weight on code, the calibrated
    merge computes the merge of code alone with the public expert (and not without it)."""
    w = calib_world
    flat = all_tensors(w["merged"])
    cfg = checkpoint.model_config(checkpoint.read_meta(w["merged"]))
    alone = tmp_path / "alone"
    fuse.merge_paths(w["base"], [w["branches"]["code"]], router="learned-rows", top_k=2,
                     out=alone, **QUIET)
    want, _ = checkpoint.load(alone)[0](w["request"].tokens[:4, :-1])
    for bias, close in (([0.0, -1e4], True), ([0.0, 0.0], False)):
        params = {**flat, GATE_BIAS: np.asarray(bias, np.float32)}
        got, _ = build_model(cfg, params)(w["request"].tokens[:4, :-1])
        same = np.allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        assert same == close, bias


def test_remove_and_add_refit_exactly(calib_world, tmp_path):
    """A remove equals a fresh calibrated merge without the party; adding it back equals the
    merge made at once (the proxy rows kept in the checkpoint are fitted on again)."""
    w, b = calib_world, calib_world["branches"]
    fuse.remove(w["merged"], "math", out=tmp_path / "removed", **QUIET)
    fuse.merge_paths(w["base"], [b["code"]], router="learned-rows", top_k=2,
                     out=tmp_path / "fresh", calibration=w["request"], **QUIET)
    assert_same(tmp_path / "removed", tmp_path / "fresh")
    fuse.add(tmp_path / "removed", [b["math"]], out=tmp_path / "added", **QUIET)
    assert_same(tmp_path / "added", w["merged"])


def test_bad_calibration_data_is_refused(calib_world, tmp_path):
    w = calib_world
    no_public = tmp_path / "no_public"
    no_public.mkdir()
    (no_public / "code").symlink_to(w["data"] / "code", target_is_directory=True)
    with pytest.raises(MergeRefused, match="no 'public' source"):
        calibrate.request_from_data(no_public, BYTE_CFG, seq_len=16)
    other = BYTE_CFG.replace(vocab_size=300, eos_id=298, pad_id=299)
    with pytest.raises(MergeRefused, match="calibration data .*tokenized|eos"):
        calibrate.request_from_data(w["data"], other, seq_len=16)
    for options in ({"steps": 3}, {"temperatures": [0.0]}, {"temperatures": float("inf")},
                    {"alpha": -1}):
        with pytest.raises(MergeRefused, match="calibration option"):
            calibrate.fit(BYTE_CFG, {}, w["request"].tokens, [], options=options)
    # a party whose artifact has no bigram counts
    old = make_branch(w["base"], tmp_path / "old", "old", 7, tamper=lambda own, stats, m, h: [
        stats.pop(n) for n in ("ngram/bigram", "ngram/context")])
    with pytest.raises(MergeRefused, match=r"parties \['old'\] have no token-bigram counts"):
        fuse.merge_paths(w["base"], [w["branches"]["code"], old], router="learned-rows",
                         top_k=2, out=tmp_path / "never", calibration=w["request"], **QUIET)
    assert not (tmp_path / "never").exists()
    # the command line: exit 2, nothing written
    argv = ["merge", "--base", str(w["base"]), "--branch", str(w["branches"]["code"]),
            "--router", "learned-rows", "--top-k", "2"]
    for extra in (["--calibrate", str(no_public)], ["--calibrate-option", "alpha=2"],
                  ["--calibrate", str(w["data"]), "--calibrate-option", "steps=3"]):
        out = tmp_path / "refused"
        assert main([*argv, *extra, "--out", str(out)]) == 2
        assert not out.exists() and not out.with_name("refused.partial").exists()
    out = tmp_path / "cli"
    assert main([*argv, "--calibrate", str(w["data"]), "--calibrate-option", "temperatures=2",
                 "--out", str(out)]) == 0
    record = json.loads((out / "meta.json").read_text())["calibration"]
    assert record["options"]["temperatures"] == [2.0] and record["temperature"] == 2.0


def test_a_party_that_joins_later_gets_the_tokens_of_its_own_text(calib_world, tmp_path):
    """The failure the gate mends: a joining party whose row is weaker than the rows already
    there. Parties a and b (bytes 0-59 and 60-119, rows x20) are merged; c (bytes 120-179, row
    x0.05) joins with `merge add`. On c's kind of text the learned rows give c a third of the
    weight c's model alone gives it; joined to the calibrated merge, c takes all of it."""
    rng = np.random.default_rng(5)

    def party(source, lo, scale, seed):
        rows = rng.integers(lo, lo + 60, (400, 32))

        def tamper(own, stats, meta, hashes):
            own[ROUTER] = own[ROUTER] * scale
            stats.update(ngram.tensors(ngram.count(rows, vocab_size=264, eos_id=256)))
        return make_branch(calib_world["base"], tmp_path / source, source, seed, tamper=tamper)

    a, b, c = party("a", 0, 20.0, 11), party("b", 60, 20.0, 12), party("c", 120, 0.05, 13)
    text = rng.integers(120, 180, (4, 32)).astype(np.int32)
    kw = dict(router="learned-rows", top_k=2, **QUIET)

    def c_weight(path):  # c's share of the router weight on c's kind of text, mean over layers
        model, meta = checkpoint.load(path)
        _, aux = model(text)
        share = np.asarray(aux["expert_weight_share"])
        return float(share[:, [e["source"] for e in meta["experts"]].index("c")].mean())

    for calibration in (None, calib_world["request"]):
        name = "cal" if calibration else "plain"
        fuse.merge_paths(calib_world["base"], [a, b], out=tmp_path / name,
                         calibration=calibration, **kw)
        fuse.add(tmp_path / name, [c], out=tmp_path / f"{name}+c", **QUIET)
    fuse.merge_paths(calib_world["base"], [c], out=tmp_path / "c_alone", **kw)
    alone, plain, joined = (c_weight(tmp_path / n) for n in ("c_alone", "plain+c", "cal+c"))
    assert plain < 0.5 * alone  # the rows already there take c's text (measured: 0.35 of it)
    assert joined > 0.9 * alone  # the gate gives it back (measured: 0.99)
