"""`moesaic plan`: the 7B branch step compiled ahead of time on 8 fake devices, its memory
per device against the arithmetic of the parameters, a refusal when it does not fit, and
the re-run in a fresh interpreter when jax is already imported with too few devices."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from moesaic.cli import plan as plan_command
from moesaic.launch import plan

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_parse_sizes_and_meshes():
    assert plan.parse_bytes("80GB") == 80 * 10**9
    assert plan.parse_bytes("16GiB") == 16 * 2**30
    assert plan.parse_bytes("1.5 tb") == 1_500_000_000_000
    assert plan.parse_bytes("1024") == 1024
    with pytest.raises(ValueError, match="--hbm '80 gigs'"):
        plan.parse_bytes("80 gigs")
    assert plan.parse_mesh("data=1,fsdp=8") == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    for bad in ("fsdp=0", "pipeline=2", "fsdp"):
        with pytest.raises(ValueError, match="--mesh"):
            plan.parse_mesh(bad)


def test_7b_branch_plan_on_8_devices_matches_the_arithmetic():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "moesaic.cli.main", "plan", "--config",
         "moesaic/configs/olmo2_7b.py:source=code", "--mesh", "data=1,fsdp=8", "--hbm", "5GB",
         "--json", "--config.data.global_batch=8", "--config.data.seq_len=512",
         "--config.train.microbatches=1"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == plan.EXIT_DOES_NOT_FIT, proc.stderr
    assert seconds < 60, f"the 7B plan took {seconds:.0f} s"
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    # OLMo-2 7B: the dense base upcycled to [public, own]; only the own expert trains.
    vocab, d, layers, heads, head_dim, ff, shards, f32 = 100352, 4096, 32, 32, 128, 11008, 8, 4
    expert = 3 * layers * d * ff
    trainable = expert + layers * d + layers  # own FFN, router row (L, 1, D), bias (L, 1)
    frozen = (2 * vocab * d + 4 * layers * d * heads * head_dim + 2 * layers * heads * head_dim
              + 2 * layers * d + d + expert + layers * d + layers)
    assert result["experts"] == 2
    assert result["counts"] == {"trainable": trainable, "frozen": frozen}

    # Per device: everything with a d_model axis is split 8 ways over fsdp; the biases and
    # QK-norm scales (no d_model axis) are replicated. AdamW keeps mu and nu for the
    # trainable parameters only, plus int32 step counts. The trainable master copy is float32;
    # the frozen matrices (embeddings, attention, the public expert) are held in bf16, the
    # compute dtype (train.frozen_dtype), the norms, router row and bias as stored (float32).
    trainable_dev = f32 * ((expert + layers * d) // shards + layers)
    frozen_dev = (2 * ((2 * vocab * d + 4 * layers * d * heads * head_dim + expert) // shards)
                  + f32 * ((2 * layers * d + d + layers * d) // shards
                           + 2 * layers * heads * head_dim + layers))
    by_hand = result["by_hand"]
    assert by_hand["trainable"] == trainable_dev
    assert by_hand["frozen"] == frozen_dev
    assert 0 <= by_hand["optimizer"] - 2 * trainable_dev <= 64
    assert by_hand["batch"] == 8 * 513 * 4 // shards + 4

    xla = result["xla"]
    assert xla["argument"] == sum(by_hand.values())  # XLA plans exactly these arguments
    assert xla["alias"] >= by_hand["trainable"] + by_hand["optimizer"]  # donated, updated in place
    assert xla["temp"] > 0
    assert result["needed"] == xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    assert result["needed"] > 5e9
    assert f"needs {result['needed'] / 1e9:.2f} GB per device" in proc.stderr
    assert "--hbm gives 5.00 GB" in proc.stderr

    specs = {(p["kind"], p["name"]): p["spec"] for p in result["parameters"]}
    assert specs[("train", "blocks/ffn/w_gate")] == [None, None, "fsdp", None]
    assert specs[("frozen", "blocks/ffn/w_down")] == [None, None, None, "fsdp"]
    assert specs[("frozen", "embed")] == [None, "fsdp"]
    assert specs[("frozen", "blocks/attn/q_norm")] == [None, None, None]
    assert ("train", "embed") not in specs and ("frozen", "blocks/ffn/bias") in specs


TINY = ["model.d_model=32", "model.n_layers=2", "model.d_ff=64", "data.seq_len=16",
        "data.global_batch=4"]


def _plan_here(capfd, config: str, mesh: str, *overrides: str, hbm: str = "") -> dict:
    """`moesaic plan ... --json` called in this process (cwd: the repo); its JSON result."""
    args = argparse.Namespace(config=config, mesh=mesh, hbm=hbm, base="", base_experts=1,
                              json=True, config_overrides=[*overrides, *TINY])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert plan_command.run(args) == 0
    finally:
        os.chdir(cwd)
    return json.loads(capfd.readouterr().out.strip().splitlines()[-1])


def test_plan_reruns_itself_when_jax_has_too_few_devices(capfd):
    import jax

    assert jax.device_count() < 2  # this test process imported jax without fake devices
    result = _plan_here(capfd, "moesaic/configs/tiny.py:source=code", "fsdp=2", hbm="1GB")
    assert result["mesh"]["fsdp"] == 2 and result["experts"] == 2
    # tiny, d_model 32, vocab 264, 2 layers, d_ff 64: the own expert, row and bias train.
    assert result["counts"]["trainable"] == 3 * 2 * 32 * 64 + 2 * 32 + 2
    assert result["by_hand"]["trainable"] == 4 * ((3 * 2 * 32 * 64 + 2 * 32) // 2 + 2)
    assert result["needed"] < 1e9
    assert result["start"] == {}  # only a QLoRA start is planned


def test_a_qlora_start_is_planned_beside_its_step():
    """A QLoRA branch's start (`plan_start`): the base held as the step holds it (its frozen
    argument, less the router slots a dense base lacks), quantized a layer at a time, then
    the router statistics over it; the job needs the larger of the start and the step. (The
    start's programs only: the step's compile is the other tests'.)"""
    import jax

    from moesaic.branch_train import setup
    from moesaic.configs import loading
    from moesaic.launch import plan_start
    from moesaic.model.sharding import make_mesh

    config = loading.resolve("moesaic/configs/tiny.py:source=code",
                             [*TINY, "branch.mode=lora", "branch.lora.quantize=nf4"])
    base_cfg = plan._base_config(config, "", 1)
    mesh = make_mesh(plan.parse_mesh("data=1"), devices=jax.devices()[:1])
    sc, _ = setup.set_up(config, "lora", mesh, base_cfg)
    start = plan_start.start_memory(sc, base_cfg)
    frozen = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(sc.frozen_shapes))
    assert frozen - start["held"] == 4 * 2 * (32 + 1)  # router (2, 1, 32), bias (2, 1)
    assert start["quantize"] > start["held"] and start["stats"] > start["held"]
    assert start["needed"] == max(start["quantize"], start["stats"])
    config.branch.lora.quantize = "none"
    assert plan_start.start_memory(setup.set_up(config, "lora", mesh, base_cfg)[0],
                                   base_cfg) == {}
    xla = {"argument": 10, "output": 2, "alias": 2, "temp": 5}
    assert plan.Plan({}, 2, 1, {}, {}, xla, [], 0.0, start={"needed": 4}).needed == 15
    larger = plan.Plan({}, 2, 1, {}, {}, xla, [], 0.0, start={"needed": 20, "held": 3})
    assert larger.needed == 20 and "the start's" in larger.memory_lines(None)[-1]
    assert larger.start_lines()[-1].startswith("start (base loaded, router statistics)")


def test_plan_of_a_dense_branch_trains_everything(capfd):
    """config.branch.mode=dense: continued pretraining; no frozen parameters."""
    result = _plan_here(capfd, "moesaic/configs/tiny.py", "data=2", "branch.mode=dense")
    assert result["experts"] == 1 and result["counts"]["frozen"] == 0
    assert result["by_hand"]["frozen"] == 0
    assert 0 <= result["by_hand"]["optimizer"] - 2 * result["by_hand"]["trainable"] <= 64


def test_plan_of_an_ffn_job_trains_the_dense_ffn_only(capfd):
    """config.branch.mode=ffn: the dense base's FFN trains in place, everything else frozen."""
    result = _plan_here(capfd, "moesaic/configs/tiny.py:source=code", "data=2",
                        "branch.mode=ffn")
    assert result["experts"] == 1 and result["counts"]["trainable"] == 3 * 2 * 32 * 64


def test_plan_takes_the_base_from_the_config(capfd, monkeypatch):
    """An MoE config of n experts names the branch model, so its base has n - 1; before, the
    base was dense whatever the config said (flexolmo_7x7b planned olmo2_7b's 2 experts)."""
    from moesaic.cli import main as cli
    from moesaic.configs import loading

    monkeypatch.chdir(ROOT)
    argv = ["plan", "--config", "moesaic/configs/tiny.py:experts=3", "--mesh", "data=1",
            "--json", *(f"--config.{o}" for o in TINY)]
    assert cli.main(argv) == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert (result["experts"], result["base_experts"]) == (3, 2)

    def branch_of(spec: str, *overrides: str) -> tuple[int, int]:
        config = loading.resolve(spec, list(overrides))
        layout = plan.branch_layout(config, base_experts=plan.default_base_experts(config))
        return plan.default_base_experts(config), layout.cfg.n_experts

    assert branch_of("moesaic/configs/flexolmo_7x7b.py") == (6, 7)
    assert branch_of("moesaic/configs/olmo2_7b.py") == (1, 2)  # public + own
    assert branch_of("moesaic/configs/tiny.py") == (1, 2)  # a dense base: FlexOlmo's case
    assert branch_of("moesaic/configs/tiny.py:experts=2", "branch.mode=dense") == (2, 2)
    args = argparse.Namespace(config="c.py", mesh="", hbm="", base="", base_experts=None,
                              json=False, config_overrides=[])
    assert "--base-experts" not in plan_command._argv(args)  # the re-run defaults it the same way


@pytest.mark.parametrize("args, message", [
    (["--mesh", "fsdp=0"], "--mesh 'fsdp=0': expected axis=size pairs"),
    (["--hbm", "80 gigs"], "--hbm '80 gigs': expected a size"),
    (["--config.model.nope=1"], "config has no field 'model.nope'"),
    (["--config.model.d_model=abc"], "config field 'model.d_model': expected int, got 'abc'"),
    (["--mesh", "data=1", "--base", "/nonexistent/ckpt"], "/nonexistent/ckpt does not exist"),
    (["--mesh", "data=1", "--base-experts", "0"], "--base-experts=0: must be at least 1"),
    (["--mesh", "data=1", "--base-experts", "2", "--config.branch.mode=ffn"],
     "an ffn job trains the base's one FFN in place; this base is an MoE of 2 experts"),
    ([], "config.mesh {'data': -1"),
])
def test_plan_input_errors_are_one_line(args, message, capfd, monkeypatch):
    from moesaic.cli import main as cli

    monkeypatch.chdir(ROOT)
    assert cli.main(["plan", "--config", "moesaic/configs/tiny.py", *args]) == 2
    err = capfd.readouterr().err
    assert err.startswith("moesaic plan: error: ") and message in err, err
    assert "Traceback" not in err
