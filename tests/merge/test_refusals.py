"""Every merge refusal, each leaving nothing written, and `moesaic merge` on the command
line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from moesaic.merge import fuse
from moesaic.merge.sources import MergeRefused
from moesaic.model import checkpoint
from tests.support.merging import (
    CFG,
    all_tensors,
    expect_refusal,
    make_base,
    make_branch,
    rewrite,
    synthetic_stats,
)


def test_refuses_branch_of_another_base(world, tmp_path):
    other = make_base(tmp_path / "other_base", seed=7)
    stray = make_branch(other, tmp_path / "stray", "stray", 5)
    expect_refusal(world, tmp_path, [world["branches"]["code"], stray],
                    r"branch 'stray'.*another base")


def test_refuses_modified_frozen_tensor(world, tmp_path):
    def tamper(own, stats, meta, hashes):
        meta["frozen_hashes"]["blocks/attn/q"] = "0" * 64
    bad = make_branch(world["base"], tmp_path / "bad", "bad", 5, tamper=tamper)
    expect_refusal(world, tmp_path, [bad], r"branch 'bad'.*frozen tensor 'blocks/attn/q'")


def test_refuses_trained_shared_tensor(world, tmp_path):
    def tamper(own, stats, meta, hashes):
        del meta["frozen_hashes"]["embed"]
    bad = make_branch(world["base"], tmp_path / "bad", "bad", 5, tamper=tamper)
    expect_refusal(world, tmp_path, [bad], r"branch 'bad'.*\['embed'\].*frozen_hashes")


def test_refuses_shape_mismatch(world, tmp_path):
    def tamper(own, stats, meta, hashes):
        own["blocks/ffn/w_up"] = own["blocks/ffn/w_up"][:, :, :, :40]
    bad = make_branch(world["base"], tmp_path / "bad", "bad", 5, tamper=tamper)
    expect_refusal(world, tmp_path, [bad], r"branch 'bad'.*'blocks/ffn/w_up' has shape")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_refuses_nan_and_inf(world, tmp_path, value):
    def tamper(own, stats, meta, hashes):
        own["blocks/ffn/w_down"][1, 0, 3, 4] = value
    bad = make_branch(world["base"], tmp_path / "bad", "bad", 5, tamper=tamper)
    expect_refusal(world, tmp_path, [bad],
                    r"branch 'bad'.*'blocks/ffn/w_down' holds NaN or Inf.*\(1, 0, 3, 4\)")


def test_refuses_uncommitted_checkpoint(world, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(world["branches"]["law"], half.with_name("half.partial"))
    expect_refusal(world, tmp_path, [half], r"never committed.*half.partial")
    no_meta = tmp_path / "no_meta"
    shutil.copytree(world["branches"]["law"], no_meta)
    (no_meta / checkpoint.META).unlink()
    expect_refusal(world, tmp_path, [no_meta], r"not a committed checkpoint")


def test_a_job_workdir_given_for_its_output_is_named(world, tmp_path):
    workdir = tmp_path / "branches" / "law"
    shutil.copytree(world["branches"]["law"], workdir / "artifact")
    expect_refusal(world, tmp_path, [workdir],
                   rf"{workdir} is not a checkpoint but holds one; did you mean "
                   rf"{workdir / 'artifact'}\?")


def test_refuses_duplicate_sources(world, tmp_path):
    twin = make_branch(world["base"], tmp_path / "twin", "code", 9)
    expect_refusal(world, tmp_path, [world["branches"]["code"], twin], r"'code' appears twice")


def test_refuses_modified_base(world, tmp_path):
    base = tmp_path / "base_copy"
    shutil.copytree(world["base"], base)
    meta = json.loads((base / checkpoint.META).read_text())
    meta["fingerprint"] = "f" * 64
    (base / checkpoint.META).write_text(json.dumps(meta))
    with pytest.raises(MergeRefused, match="do not match its recorded fingerprint"):
        fuse.merge_paths(base, [], router="learned-rows", top_k=1, out=tmp_path / "o",
                         log=lambda s: None)


def test_cli_merge_remove_add_and_refusal(world, tmp_path, capsys):
    from moesaic.cli.main import main
    b = world["branches"]
    out = tmp_path / "m"
    assert main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--branch", str(b["math"]), "--router", "centroid", "--top-k", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "routing report" in printed and "max cos" in printed
    assert checkpoint.read_meta(out)["router"]["inputs"]["public"].startswith("normalised mean")
    assert main(["merge", "remove", str(out), "--source", "math", "--out",
                 str(tmp_path / "r")]) == 0
    experts = checkpoint.read_meta(tmp_path / "r")["experts"]
    assert [e["source"] for e in experts] == ["public", "code"]
    assert main(["merge", "add", str(tmp_path / "r"), "--branch", str(b["law"]), "--out",
                 str(tmp_path / "a")]) == 0
    assert checkpoint.read_meta(tmp_path / "a")["model"]["n_experts"] == 3
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--branch", str(b["code"]), "--router", "learned-rows", "--out",
                 str(tmp_path / "dup")])
    assert code == 2 and "appears twice" in capsys.readouterr().err
    assert not (tmp_path / "dup").exists()
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "ridge", "--out", str(tmp_path / "ridge")])
    assert code == 2 and "--public-stats" in capsys.readouterr().err
    # remove / add keep the merged rows: a router flag would be ignored, so it is refused
    code = main(["merge", "remove", str(out), "--source", "math", "--router", "ridge",
                 "--router-scale", "5", "--out", str(tmp_path / "r2")])
    assert code == 2 and "takes no --router, --router-scale" in capsys.readouterr().err
    code = main(["merge", "add", str(tmp_path / "r"), "--branch", str(b["law"]), "--seed", "3",
                 "--out", str(tmp_path / "a2")])
    assert code == 2 and "takes no --seed" in capsys.readouterr().err
    # a data folder that is not there: refused in one line, not a traceback
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "ridge", "--public-data", str(tmp_path / "no_data"),
                 "--out", str(tmp_path / "pd")])
    assert code == 2 and "no prepared source 'public'" in capsys.readouterr().err
    # kind options: set from the command line, refused when the kind does not read them
    assert main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "contrast", "--public-stats", str(world["public"]),
                 "--router-option", "selectivity=1.5", "--router-option", "margin=3",
                 "--out", str(tmp_path / "c")]) == 0
    assert checkpoint.read_meta(tmp_path / "c")["router"]["options"] == {"margin": 3.0,
                                                                  "selectivity": 1.5}
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "centroid", "--router-option", "marign=3", "--ridge-lambda", "1",
                 "--out", str(tmp_path / "c2")])
    assert code == 2 and ("router 'centroid' takes no option marign, ridge_lambda (it takes: "
                          "scale)") in capsys.readouterr().err
    # a name the atomic write reserves would be written and then never read as a checkpoint
    code = main(["merge", "--base", str(world["base"]), "--branch", str(b["code"]),
                 "--router", "learned-rows", "--out", str(tmp_path / "m.partial")])
    assert code == 2 and "may not end in '.partial'" in capsys.readouterr().err
    assert not any(p.name.startswith(("r2", "a2", "pd", "m.partial", "c2"))
                   for p in tmp_path.iterdir())


def test_public_stats_and_a_base_are_checked_like_any_input(world, tmp_path):
    b = world["branches"]
    other = make_base(tmp_path / "other", seed=7)
    elsewhere = make_branch(other, tmp_path / "elsewhere", "web", 9)  # stats under another base
    with pytest.raises(MergeRefused, match="public stats .*computed under another model"):
        fuse.merge_paths(world["base"], [b["code"]], router="ridge", top_k=1,
                         public_stats=elsewhere, out=tmp_path / "m", log=lambda s: None)
    flat = all_tensors(world["base"])
    flat["blocks/attn/q"] = flat["blocks/attn/q"].copy()
    flat["blocks/attn/q"][1, 2] = np.nan
    checkpoint.save(tmp_path / "nan_base", flat,
                    checkpoint.read_meta(world["base"]) | {"fingerprint": None})
    meta = json.loads((tmp_path / "nan_base" / checkpoint.META).read_text())
    meta["fingerprint"] = checkpoint.fingerprint(flat)
    (tmp_path / "nan_base" / checkpoint.META).write_text(json.dumps(meta))
    with pytest.raises(MergeRefused, match=r"base .*'blocks/attn/q' holds NaN or Inf \(first "
                                           r"at index \(1, 2"):
        fuse.merge_paths(tmp_path / "nan_base", [], router="learned-rows", top_k=1,
                         out=tmp_path / "n", log=lambda s: None)
    assert not (tmp_path / "m").exists() and not (tmp_path / "n").exists()


def test_refuses_party_tensors_modified_after_they_were_written(world, tmp_path):
    b = world["branches"]

    def bump(name, index=None):
        def change(flat):
            flat[name] = flat[name].copy()
            if index is None:
                flat[name] += 1
            else:
                flat[name][:, index] += 1
        return change
    code = rewrite(b["code"], tmp_path / "code", bump("blocks/ffn/w_up"))
    expect_refusal(world, tmp_path, [code, b["math"]],
                    r"branch 'code'.*do not match the fingerprint")
    kw = dict(router="ridge", top_k=2, public_stats=world["public"], log=lambda s: None)
    fuse.merge_paths(world["base"], [b["code"], b["math"], b["law"]], out=tmp_path / "m", **kw)
    slot = rewrite(tmp_path / "m", tmp_path / "m_slot", bump("blocks/ffn/w_up", 1))
    with pytest.raises(MergeRefused, match=r"branch 'code' \(.*m_slot\).*do not match the "
                                           r"fingerprint"):
        fuse.remove(slot, "math", out=tmp_path / "r", log=lambda s: None)
    stats = rewrite(tmp_path / "m", tmp_path / "m_stats", bump("stats/law/x_sum"))
    with pytest.raises(MergeRefused, match=r"branch 'law'.*do not match the fingerprint"):
        fuse.add(stats, [], out=tmp_path / "a", log=lambda s: None)
    public = rewrite(tmp_path / "m", tmp_path / "m_pub", bump("stats/public/xtx"))
    with pytest.raises(MergeRefused, match=r"public stats .*m_pub.*recorded fingerprint"):
        fuse.remove(public, "math", out=tmp_path / "r", log=lambda s: None)
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()
    meta = fuse.remove(tmp_path / "m", "math", out=tmp_path / "r", log=lambda s: None)
    assert meta["merge"]["public_stats_fingerprint"] == checkpoint.read_meta(world["public"])[
        "fingerprint"]


def test_refuses_a_merged_base(world, tmp_path):
    """A merged model as --base would keep only its base and silently drop its parties; a
    branch trained from one could never be merged."""
    import ml_collections

    from moesaic.branch_train import base_model

    b = world["branches"]
    fuse.merge_paths(world["base"], [b["code"], b["math"]], router="learned-rows", top_k=2,
                     out=tmp_path / "m", log=lambda s: None)
    with pytest.raises(MergeRefused, match=r"merged checkpoint.*drop its parties \['code', "
                                           r"'math'\].*moesaic merge add"):
        fuse.merge_paths(tmp_path / "m", [b["law"]], router="learned-rows", top_k=2,
                         out=tmp_path / "o", log=lambda s: None)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="'merged' checkpoint; a branch starts from"):
        base_model.read_base(tmp_path / "m", ml_collections.ConfigDict({"model": {}}))


def test_public_stats_of_another_shape_are_named(world, tmp_path):
    stats, n = synthetic_stats(CFG.replace(d_model=16), 3)
    checkpoint.save(tmp_path / "small", stats, {"kind": "router_stats", "stats_tokens": n})
    with pytest.raises(MergeRefused, match=r"public stats .*small: tensor 'stats/x_sum' has "
                                           r"shape \(2, 16\).*computed under a model of another"):
        fuse.merge_paths(world["base"], [world["branches"]["code"]], router="ridge", top_k=1,
                         out=tmp_path / "o", public_stats=tmp_path / "small",
                         log=lambda s: None)


def test_cli_refuses_top_k_below_one(world, tmp_path, capsys):
    from moesaic.cli.main import main
    for value in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_:
            main(["merge", "--base", str(world["base"]), "--branch",
                  str(world["branches"]["code"]), "--router", "learned-rows", "--top-k", value,
                  "--out", str(tmp_path / "m")])
        assert exit_.value.code == 2 and "at least 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    code = main(["merge", "--base", str(world["base"]), "--branch",
                 str(world["branches"]["code"]), "--router", "learned-rows", "--out",
                 str(tmp_path / "m")])
    assert code == 0
    code = main(["merge", "--base", str(tmp_path / "m"), "--branch",
                 str(world["branches"]["law"]), "--router", "centroid",
                 "--public-data", str(tmp_path / "no_data"), "--out", str(tmp_path / "o")])
    assert code == 2 and "merge add" in capsys.readouterr().err
    code = main(["merge", "--base", str(world["base"]), "--out", str(tmp_path / "o")])
    assert code == 2 and "merge needs --router, --branch (" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_every_flag_the_action_would_ignore(world, tmp_path, capsys):
    from moesaic.cli.main import main

    b = world["branches"]
    merge = ["merge", "--base", str(world["base"]), "--branch", str(b["code"]), "--router",
             "learned-rows"]
    cases = [
        (["merge", "soup", "--branch", str(b["code"]), "--branch", str(b["math"]), "--top-k",
          "2"], "merge soup takes no --top-k: a soup is a weighted mean"),
        (["merge", "soup", "--branch", str(b["code"]), "--branch", str(b["math"]),
          "--weighting", "inverse"], "--weighting weight the soup by each branch's loss on "
                                     "--weights-data, which is not given"),
        (["merge", "remove", str(tmp_path / "m"), "--source", "code", "--base",
          str(world["base"])], "merge remove takes no --base: it rebuilds the router"),
        (["merge", "add", str(tmp_path / "m"), "--branch", str(b["law"]), "--source", "law"],
         "merge add takes no --source"),
        ([*merge, "--weights-data", str(tmp_path)],
         "merge takes no --weights-data: a merge starts"),
        (["merge", "btx", "--branch", str(b["code"]), "--branch", str(b["math"]), "--router",
          "centroid", "--public-stats", str(world["public"])],
         "merge btx takes no --public-stats: a BTX model has no public expert"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()
