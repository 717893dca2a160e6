"""Calibration at merge (moesaic.merge.calibrate): folded into the router, kept in the
checkpoint, refitted exactly by remove and add; bad calibration data refused before anything
is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesaic.cli.main import main
from moesaic.merge import calibrate, fuse
from moesaic.merge.sources import MergeRefused
from moesaic.model import checkpoint
from moesaic.model.names import BIAS, ROUTER
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
                                          options={"steps": 60})
    merged = root / "merged"
    fuse.merge_paths(base, [branches["code"], branches["math"]], router="learned-rows",
                     top_k=2, out=merged, calibration=request, **QUIET)
    return {"root": root, "base": base, "branches": branches, "data": data,
            "request": request, "merged": merged}


def test_calibration_is_folded_into_the_router_and_kept(calib_world, tmp_path):
    w = calib_world
    meta = checkpoint.read_meta(w["merged"])
    record = meta["calibration"]
    assert record["proxy_rows"] == 16 and record["seq_len"] == 16
    assert record["options"]["steps"] == 60 and record["data"]["source"] == "public"
    for before, after in record["fit_loss"]:
        assert after <= before  # the fit never ends worse than the merged router
    t = all_tensors(w["merged"])
    np.testing.assert_array_equal(t[calibrate.TOKENS], w["request"].tokens)
    rows = np.concatenate([np.zeros_like(t["rows/code/router"]), t["rows/code/router"],
                           t["rows/math/router"]], axis=1)
    np.testing.assert_allclose(t[ROUTER], rows * t[calibrate.SCALE][:, :, None], rtol=1e-6)
    np.testing.assert_array_equal(t[BIAS], t[calibrate.SHIFT])
    np.testing.assert_array_equal(t[calibrate.SCALE][:, 0], 1.0)  # the public row is as merged
    assert (t[BIAS][:, 1:] <= 0).all() and (t[calibrate.SCALE] > 0).all()
    assert not np.allclose(t[calibrate.SCALE][:, 1:], 1.0)  # the fit moved something
    uncalibrated = tmp_path / "plain"
    fuse.merge_paths(w["base"], [w["branches"]["code"], w["branches"]["math"]],
                     router="learned-rows", top_k=2, out=uncalibrated, **QUIET)
    plain = all_tensors(uncalibrated)
    assert "calibration" not in checkpoint.read_meta(uncalibrated)
    for name in plain:  # calibration changes the router and bias only
        if name not in (ROUTER, BIAS):
            np.testing.assert_array_equal(plain[name], t[name], err_msg=name)
    model, _ = checkpoint.load(w["merged"])
    logits, _ = model(w["request"].tokens[:2, :-1])
    assert np.isfinite(np.asarray(logits)).all()


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
    with pytest.raises(MergeRefused, match="calibration options"):
        calibrate.fit(BYTE_CFG, {}, w["request"].tokens, base_experts=1,
                      options={"target_temperature": 0.0})
    # the command line: exit 2, nothing written
    argv = ["merge", "--base", str(w["base"]), "--branch", str(w["branches"]["code"]),
            "--router", "learned-rows", "--top-k", "2"]
    for extra in (["--calibrate", str(no_public)], ["--calibrate-option", "steps=3"]):
        out = tmp_path / "refused"
        assert main([*argv, *extra, "--out", str(out)]) == 2
        assert not out.exists() and not out.with_name("refused.partial").exists()
    out = tmp_path / "cli"
    assert main([*argv, "--calibrate", str(w["data"]), "--calibrate-option", "steps=5",
                 "--out", str(out)]) == 0
    record = json.loads((out / "meta.json").read_text())["calibration"]
    assert record["options"]["steps"] == 5
