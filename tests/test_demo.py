"""The smoke demo end to end: every stage runs, the report has its structure, the numbers are
sane, and a re-run skips every stage."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from moesaic.eval import demo
from tests.conftest import last_json_line, run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    results = demo.run_demo(workdir, "smoke")
    return workdir, results


def test_report_structure(smoke):
    workdir, _ = smoke
    report = json.loads((workdir / "report.json").read_text())
    systems = report["systems"]
    for name in ("public model", "soup (uniform)", "soup (weighted)", "BTM (top-2)",
                 "c-BTM (top-2)", demo.BTX, demo.BTX_TUNED,
                 "unrestricted MoE (all data)", demo.TUNED,
                 *(f"merged MoE ({r})" for r in demo.ROUTERS),
                 *(f"dense expert {d}" for d in demo.DOMAINS)):
        assert name in systems, name
        for domain in demo.DOMAINS:
            assert math.isfinite(systems[name][domain]["bpb"]), (name, domain)
            assert systems[name][domain]["bpb"] > 0
    text = (workdir / "report.md").read_text()
    assert "| system |" in text and "merged MoE (learned-rows)" in text
    code = json.loads((workdir / "data" / "code" / "manifest.json").read_text())
    code_hash = code["content_hash"]
    assert f"code {code_hash[:12]}" in text  # which corpora these numbers come from
    for plot in ("bpb_by_domain.png", "bpb_avg.png"):
        assert (workdir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # avg is over the private domains, for every system alike
    assert report["average_over"] == list(demo.DOMAINS)
    for name, rows in systems.items():
        assert rows["avg"]["bpb"] == pytest.approx(demo._private_avg(rows)), name
    own = systems[demo.DENSE_OWN]
    assert {d: own[d]["bpb"] for d in demo.DOMAINS} == {
        d: systems[f"dense expert {d}"][d]["bpb"] for d in demo.DOMAINS}
    assert any(p.name.startswith("routing_merged") for p in workdir.glob("*.png"))


def test_merged_model_beats_the_public_model_on_the_private_domains(smoke):
    _, results = smoke
    systems = results["systems"]
    public = demo._private_avg(systems["public model"])
    merged = {r: demo._private_avg(systems[f"merged MoE ({r})"]) for r in demo.ROUTERS
              if r != "random"}  # a random router is the control, not a merge that may win
    assert min(merged.values()) < public - 0.02, (merged, public)
    # the routing ceiling: each branch alone on its own domain
    assert set(systems[demo.CEILING]) == set(demo.DOMAINS)


def test_opt_out_removes_exactly_one_expert(smoke):
    workdir, results = smoke
    from moesaic.model import checkpoint

    full = checkpoint.read_meta(workdir / "merged" / "learned-rows")
    without = checkpoint.read_meta(workdir / "merged" / f"learned-rows-without-{demo.OPT_OUT}")
    assert [e["source"] for e in without["experts"]] == [
        e["source"] for e in full["experts"] if e["source"] != demo.OPT_OUT]


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
    assert record["steps"] == demo.PRESETS["smoke"].tune_steps
    assert record["data"]["mixture"] == "public" and record["data"]["dir"] == str(workdir / "data")
    names = list(checkpoint.tensor_metadata(merged))
    assert names == list(checkpoint.tensor_metadata(tuned))
    before, after = checkpoint.load_tensors(merged, names), checkpoint.load_tensors(tuned, names)
    for name in names:
        same = np.array_equal(before[name], after[name])
        assert same == (name != ROUTER), name


def test_rerun_skips_finished_stages(smoke, capsys):
    workdir, results = smoke
    again = demo.run_demo(workdir, "smoke")
    assert again == results
    captured = capsys.readouterr()
    stages = demo.stage_names(demo.PRESETS["smoke"])
    assert (captured.out + captured.err).count("done before") == len(stages)


def test_rerun_after_an_interrupted_soups_stage_writes_only_what_is_missing(smoke):
    """The soups stage writes five checkpoints before its `done` mark; a run stopped between
    them resumes without tripping over the soups already written."""
    workdir, results = smoke
    soups = workdir / "soups"
    kept = (soups / "uniform" / "meta.json").stat().st_mtime_ns
    (soups / "done").unlink()
    shutil.rmtree(soups / "weighted-math")
    assert demo.run_demo(workdir, "smoke") == results
    assert (soups / "done").exists() and (soups / "weighted-math" / "meta.json").exists()
    assert (soups / "uniform" / "meta.json").stat().st_mtime_ns == kept


def test_uncoordinated_experts_train_merge_and_join_the_report(smoke, tmp_path):
    """`--set uncoordinated=true`: one ffn job per domain, two merges of them, three more
    systems in the report. Run over a copy of the smoke workdir whose recorded settings are
    switched on, so only the new stages and the evaluation run."""
    workdir, results = smoke
    copy = tmp_path / "demo"
    shutil.copytree(workdir, copy)
    for made in ("results.json", "report.json", "report.md"):
        (copy / made).unlink()
    recorded = json.loads((copy / "preset.json").read_text())
    (copy / "preset.json").write_text(json.dumps({**recorded, "uncoordinated": True}))
    again = demo.run_demo(copy, "smoke", ["uncoordinated=true"])
    new = [demo.FFN_ALONE, *demo.UNCOORDINATED.values()]
    assert set(again["systems"]) == set(results["systems"]) | set(new)
    for name in new:
        for domain, metrics in again["systems"][name].items():
            assert math.isfinite(metrics["bpb"]) and metrics["bpb"] > 0, (name, domain)
    for name in results["systems"]:  # the other systems are the same models, re-evaluated
        assert again["systems"][name]["code"]["bpb"] == pytest.approx(
            results["systems"][name]["code"]["bpb"], rel=1e-6), name
    report = (copy / "report.md").read_text()
    assert "FlexOlmo's uncoordinated experts" in report and all(n in report for n in new)


def test_the_demo_command_compiles_each_program_once_into_its_workdir(tmp_path):
    """`moesaic demo` keeps XLA's persistent cache in W/xla-cache (the branches and the dense
    experts compile the same programs); a cache the user named is left in charge."""
    code = f"""
        import json, pathlib, jax, jax.numpy as jnp
        from moesaic.eval import demo
        demo.use_compilation_cache(pathlib.Path({str(tmp_path)!r}) / "xla-cache")
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
