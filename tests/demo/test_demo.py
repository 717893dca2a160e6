"""The demo: its settings (moesaic/configs/demo.py) and the job configs a user names with them,
the workdir's claim on its settings, the command's refusals, and the smoke demo end to end
(every stage runs, the report has its structure, the numbers are sane, a re-run skips every
stage)."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil

import pytest

from moesaic.cli import demo as demo_command
from moesaic.cli import main as cli
from moesaic.cli import train as cli_train
from moesaic.configs import demo as settings
from moesaic.configs import loading
from moesaic.demo import findings, pipeline, systems
from moesaic.demo.workdir import BEFORE_RECORDED, claim_workdir
from tests.support.processes import last_json_line, run_python

CONFIG = "moesaic/configs/demo.py"
# What the demo before its config file wrote to W/preset.json for `--preset smoke`.
OLD_SMOKE = {
    "data_size": "smoke", "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2,
                                    "d_ff": 64},
    "seq_len": 32, "batch": 8, "pretrain_steps": 300, "branch_steps": 40, "dense_steps": 40,
    "moe_steps": 60, "lr": 0.003, "branch_lr": 0.002, "public_mix": 0.3,
    "router_input": "prefix_mean", "top_k": 4, "tune_steps": 20, "eval_sequences": 6,
    "uncoordinated": False, "negative_bias": False, "btx_top_k": 2}


def smoke_settings(*overrides: str):
    return loading.resolve(f"{CONFIG}:preset=smoke", list(overrides))


# ---- settings, job configs and the workdir's claim (no training) ---------------------------

def test_settings_take_overrides_and_refuse_bad_ones():
    preset = smoke_settings("branch_lr=7e-4", "router_input=token", "top_k=2")
    assert (preset.branch_lr, preset.router_input, preset.top_k) == (7e-4, "token", 2)
    assert smoke_settings("uncoordinated=true").uncoordinated is True
    assert smoke_settings("uncoordinated=0").uncoordinated is False
    assert settings.get_config(None).to_dict() == settings.get_config("preset=default").to_dict()
    assert settings.get_config("preset=smoke,branch_steps=600").branch_steps == 600
    for bad, error, says in [("seeds=3", KeyError, "no field 'seeds'"),
                             ("top_k=two", ValueError, "expected int"),
                             ("uncoordinated=yes2", ValueError, "expected a boolean")]:
        with pytest.raises(error, match=says):
            smoke_settings(bad)
    for arg, says in [("preset=large", "one of"), ("job=eval", "demo job 'eval'"),
                      ("job=branch", "needs source=NAME"), ("job=pretrain,source=x", "no source"),
                      ("source=code", "only with job="), ("seeds=3", "a demo setting")]:
        with pytest.raises(ValueError, match=says):
            settings.get_config(arg)


def test_the_job_config_a_user_names_is_the_one_the_demo_trains_with(monkeypatch, tmp_path):
    """`--config moesaic/configs/demo.py:preset=smoke,job=branch,source=code` (and every other
    job) gives the config the demo's stage trains with, and `moesaic branch` / `pretrain` run
    it as the job kind the demo runs it as."""
    preset = smoke_settings("uncoordinated=true", "branch_steps=60")
    trained = {}

    def fake_train(config, job):
        trained[job.workdir.relative_to(tmp_path).as_posix()] = (config.to_dict(), job.kind)
        return argparse.Namespace(stopped=False)

    monkeypatch.setattr(pipeline, "train", fake_train)
    monkeypatch.setattr(pipeline, "upcycle_checkpoint", lambda *a, **k: None)
    demo = pipeline.Demo(tmp_path, preset)
    jobs = {"public": ("public", "job=pretrain"), "moe-all": ("moe-all", "job=moe-all"),
            **{f"{stage}/{d}": (f"{folder}/{d}", f"job={stage},source={d}")
               for stage, folder in (("branch", "branches"), ("dense", "dense"), ("ffn", "ffn"))
               for d in systems.DOMAINS}}
    for stage in demo.stages():
        if stage.name in jobs:
            stage.run()
    assert sorted(trained) == sorted(folder for folder, _ in jobs.values())
    for folder, arg in jobs.values():
        named = loading.resolve(f"{CONFIG}:preset=smoke,{arg},uncoordinated=true,"
                                "branch_steps=60", [])
        config, kind = trained[folder]
        assert named.to_dict() == config, arg
        assert kind == ("pretrain" if arg == "job=pretrain"
                        else cli_train.MODES[named.branch.mode]), arg
    branch = trained["branches/code"][0]
    assert (branch["train"]["steps"], branch["train"]["warmup_steps"]) == (60, 6)
    assert branch["branch"]["public_mix"] == 0.3 and not branch["model"]["scan_layers"]


def test_the_docstring_command_trains_a_new_party_like_the_demo():
    args = cli.command_parser("branch").parse_args(
        ["--config", f"{CONFIG}:job=branch,source=NEWPARTY", "--base", "W/public/public",
         "--workdir", "W/branches/NEWPARTY"])
    config = loading.resolve(args.config, [])
    demo_config = settings.job_config(settings.get_config(None), "branch", "NEWPARTY")
    assert config.to_dict() == demo_config.to_dict()
    assert config.branch.source == "NEWPARTY" and config.branch.mode == "coordinated"


def test_the_workdir_keeps_the_settings_it_was_made_with(tmp_path):
    preset = smoke_settings("branch_lr=7e-4")
    claim_workdir(tmp_path, preset)
    claim_workdir(tmp_path, preset)  # the same settings again: fine
    with pytest.raises(ValueError, match="branch_lr: 0.0007 there, 0.002 now"):
        claim_workdir(tmp_path, smoke_settings())
    args = argparse.Namespace(workdir=str(tmp_path), config=f"{CONFIG}:preset=smoke",
                              config_overrides=[], command="demo")
    assert demo_command.run(args) == 2
    recorded = json.loads((tmp_path / "preset.json").read_text())
    del recorded["uncoordinated"]  # a workdir made before the field existed ran at its default
    (tmp_path / "preset.json").write_text(json.dumps(recorded))
    claim_workdir(tmp_path, preset)
    with pytest.raises(ValueError, match="uncoordinated: False there, True now"):
        claim_workdir(tmp_path, smoke_settings("branch_lr=7e-4", "uncoordinated=true"))
    old = tmp_path / "old"
    (old / "public").mkdir(parents=True)  # a workdir of unknown settings
    with pytest.raises(ValueError, match="no preset.json"):
        claim_workdir(old, preset)


def test_a_workdir_of_the_demo_before_its_config_file_is_accepted_or_refused_as_before(
        tmp_path):
    """W/preset.json as `--preset smoke` wrote it: the same settings are accepted (and a new
    workdir records them in the same words), other ones refused; one from before negative_bias
    and btx_top_k were recorded ran at True and 4, so today's smoke preset is refused there."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preset.json").write_text(json.dumps(OLD_SMOKE, indent=1) + "\n")
    claim_workdir(tmp_path / "old", smoke_settings())
    with pytest.raises(ValueError, match="branch_steps: 40 there, 600 now"):
        claim_workdir(tmp_path / "old", smoke_settings("branch_steps=600"))
    (tmp_path / "new").mkdir()
    claim_workdir(tmp_path / "new", smoke_settings())
    added = {k: BEFORE_RECORDED[k] for k in ("low_rank", "lora_branches", "lora_rank")}
    assert (json.loads((tmp_path / "new" / "preset.json").read_text())
            == {**OLD_SMOKE, **added, "screen_rows": 0})  # the settings added since
    claim_workdir(tmp_path / "old", smoke_settings("screen_rows=8"))  # adds stages only
    older = {k: v for k, v in OLD_SMOKE.items() if k not in ("negative_bias", "btx_top_k")}
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "preset.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match="btx_top_k: 4 there, 2 now, negative_bias: True "
                                         "there, False now"):
        claim_workdir(tmp_path / "older", smoke_settings())
    claim_workdir(tmp_path / "older",
                          smoke_settings("negative_bias=true", "btx_top_k=4"))


@pytest.mark.parametrize("argv, says", [
    (["--preset", "smoke"], "write --config moesaic/configs/demo.py:preset=smoke"),
    (["--set", "branch_lr=7e-4"], "write --config.branch_lr=7e-4"),
])
def test_the_old_options_are_refused_with_their_new_spelling(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--workdir", str(tmp_path), *argv])
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, says", [
    (["--config.branch_step=600"], "config has no field 'branch_step'"),
    (["--config", f"{CONFIG}:job=branch,source=code"], "is a training job's config"),
])
def test_the_command_refuses_bad_settings_in_one_line(tmp_path, capsys, argv, says):
    assert cli.main(["demo", "--workdir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moesaic demo: error: ") and says in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_the_demo_command_compiles_each_program_once_into_its_workdir(tmp_path):
    """`moesaic demo` keeps XLA's persistent cache in W/xla-cache (the branches and the dense
    experts compile the same programs); a cache the user named is left in charge."""
    code = f"""
        import json, pathlib, jax, jax.numpy as jnp
        from moesaic.demo import workdir
        workdir.use_compilation_cache(pathlib.Path({str(tmp_path)!r}) / "xla-cache")
        jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()
        print(json.dumps(jax.config.jax_compilation_cache_dir))
    """
    ours = run_python(code, env={"JAX_COMPILATION_CACHE_DIR": ""})
    assert last_json_line(ours.stdout) == str(tmp_path / "xla-cache")
    assert any((tmp_path / "xla-cache").iterdir())
    shutil.rmtree(tmp_path / "xla-cache")
    theirs = run_python(code, env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")})
    assert last_json_line(theirs.stdout) == str(tmp_path / "mine")
    assert not (tmp_path / "xla-cache").exists()


def test_the_makefile_runs_the_demo_with_a_preset_of_the_config_file():
    makefile = (pathlib.Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert ("moesaic demo --workdir $(WORKDIR) --config moesaic/configs/demo.py:preset=$(PRESET)"
            in makefile)


# ---- the smoke demo end to end -----------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    results = pipeline.run_demo(workdir, smoke_settings())
    return workdir, results


@pytest.mark.slow
def test_report_structure(smoke):
    workdir, _ = smoke
    report = json.loads((workdir / "report.json").read_text())
    reported = report["systems"]
    for name in ("public model", "soup (uniform)", "soup (weighted)", "BTM (top-2)",
                 "c-BTM (top-2)", systems.BTX, systems.BTX_TUNED,
                 "unrestricted MoE (all data)", systems.TUNED,
                 *(f"merged MoE ({r})" for r in systems.ROUTERS),
                 *(f"dense expert {d}" for d in systems.DOMAINS)):
        assert name in reported, name
        for domain in systems.DOMAINS:
            assert math.isfinite(reported[name][domain]["bpb"]), (name, domain)
            assert reported[name][domain]["bpb"] > 0
    text = (workdir / "report.md").read_text()
    assert "| system |" in text and "merged MoE (learned-rows)" in text
    assert "## Downstream tasks" in text and "math exact match" in report["tasks"]["tasks"]
    assert "## Extraction audit" in text and set(report["audit"]["parties"]) == set(
        systems.DOMAINS)
    assert "Preset `smoke`." in text
    code = json.loads((workdir / "data" / "code" / "manifest.json").read_text())
    code_hash = code["content_hash"]
    assert f"code {code_hash[:12]}" in text  # which corpora these numbers come from
    for plot in ("bpb_by_domain.png", "bpb_avg.png"):
        assert (workdir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # avg is over the private domains, for every system alike
    assert report["average_over"] == list(systems.DOMAINS)
    for name, rows in reported.items():
        assert rows["avg"]["bpb"] == pytest.approx(findings.private_avg(rows)), name
    own = reported[systems.DENSE_OWN]
    assert {d: own[d]["bpb"] for d in systems.DOMAINS} == {
        d: reported[f"dense expert {d}"][d]["bpb"] for d in systems.DOMAINS}
    assert any(p.name.startswith("routing_merged") for p in workdir.glob("*.png"))


@pytest.mark.slow
def test_merged_model_beats_the_public_model_on_the_private_domains(smoke):
    _, results = smoke
    reported = results["systems"]
    public = findings.private_avg(reported["public model"])
    merged = {r: findings.private_avg(reported[f"merged MoE ({r})"]) for r in systems.ROUTERS
              if r != "random"}  # a random router is the control, not a merge that may win
    assert min(merged.values()) < public - 0.02, (merged, public)
    # the routing ceiling: each branch alone on its own domain
    assert set(reported[systems.CEILING]) == set(systems.DOMAINS)


@pytest.mark.slow
def test_opt_out_removes_exactly_one_expert(smoke):
    workdir, results = smoke
    from moesaic.model import checkpoint

    full = checkpoint.read_meta(workdir / "merged" / "learned-rows")
    without = checkpoint.read_meta(workdir / "merged" /
                                   f"learned-rows-without-{systems.OPT_OUT}")
    assert [e["source"] for e in without["experts"]] == [
        e["source"] for e in full["experts"] if e["source"] != systems.OPT_OUT]


@pytest.mark.slow
@pytest.mark.parametrize("untuned, tuned", [("merged/learned-rows", "merged/learned-rows-tuned"),
                                            ("btx", "btx-tuned")])
def test_router_tuning_changes_the_router_rows_only(smoke, untuned, tuned):
    """The merged MoE's tuning and BTX's (FlexOlmo's Table 1 BTX): only the rows move."""
    workdir, _ = smoke
    import numpy as np

    from moesaic.merge.sources import ROUTER
    from moesaic.model import checkpoint

    merged, tuned = workdir / untuned, workdir / tuned
    assert checkpoint.read_meta(merged)["kind"] == checkpoint.read_meta(tuned)["kind"]
    record = checkpoint.read_meta(tuned)["router"]["tuned"]
    assert record["steps"] == smoke_settings().tune_steps
    assert record["data"]["mixture"] == "public" and record["data"]["dir"] == str(workdir / "data")
    names = list(checkpoint.tensor_metadata(merged))
    assert names == list(checkpoint.tensor_metadata(tuned))
    before, after = checkpoint.load_tensors(merged, names), checkpoint.load_tensors(tuned, names)
    for name in names:
        same = np.array_equal(before[name], after[name])
        assert same == (name != ROUTER), name


@pytest.mark.slow
def test_rerun_skips_finished_stages(smoke, capsys):
    workdir, results = smoke
    again = pipeline.run_demo(workdir, smoke_settings())
    assert again == results
    captured = capsys.readouterr()
    stages = pipeline.stage_names(smoke_settings())
    assert stages[:3] == ["data", "public", "branch/code"] and stages[-1] == "eval"
    assert (captured.out + captured.err).count("done before") == len(stages)


@pytest.mark.slow
def test_rerun_after_an_interrupted_soups_stage_writes_only_what_is_missing(smoke):
    """The soups stage writes five checkpoints before its `done` mark; a run stopped between
    them resumes without tripping over the soups already written."""
    workdir, results = smoke
    soups = workdir / "soups"
    kept = (soups / "uniform" / "meta.json").stat().st_mtime_ns
    (soups / "done").unlink()
    shutil.rmtree(soups / "weighted-math")
    assert pipeline.run_demo(workdir, smoke_settings()) == results
    assert (soups / "done").exists() and (soups / "weighted-math" / "meta.json").exists()
    assert (soups / "uniform" / "meta.json").stat().st_mtime_ns == kept


@pytest.mark.slow
def test_uncoordinated_experts_train_merge_and_join_the_report(smoke, tmp_path):
    """`--config.uncoordinated=true`: one ffn job per domain, two merges of them, three more
    systems in the report. Run over a copy of the smoke workdir whose recorded settings are
    switched on, so only the new stages and the evaluation run."""
    workdir, results = smoke
    copy = tmp_path / "demo"
    shutil.copytree(workdir, copy)
    for made in ("results.json", "report.json", "report.md"):
        (copy / made).unlink()
    recorded = json.loads((copy / "preset.json").read_text())
    (copy / "preset.json").write_text(json.dumps({**recorded, "uncoordinated": True}))
    again = pipeline.run_demo(copy, smoke_settings("uncoordinated=true"))
    new = [systems.FFN_ALONE, *systems.UNCOORDINATED.values()]
    assert set(again["systems"]) == set(results["systems"]) | set(new)
    for name in new:
        for domain, metrics in again["systems"][name].items():
            assert math.isfinite(metrics["bpb"]) and metrics["bpb"] > 0, (name, domain)
    for name in results["systems"]:  # the other systems are the same models, re-evaluated
        assert again["systems"][name]["code"]["bpb"] == pytest.approx(
            results["systems"][name]["code"]["bpb"], rel=1e-6), name
    report = (copy / "report.md").read_text()
    assert "FlexOlmo's uncoordinated experts" in report and all(n in report for n in new)
