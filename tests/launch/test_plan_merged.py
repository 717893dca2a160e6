"""`moesaic plan --job eval|tune-router|decode`: the merged model's steps compiled ahead of
time with an expert axis, the bytes every collective moves per step read from the compiled
HLO, and the refusals before anything compiles."""

from __future__ import annotations

import json
import pathlib

import pytest

from moesaic.launch.collectives import collective_bytes, shape_bytes
from tests.support.processes import last_json_line, run_python

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Two loops as XLA writes them after partitioning: an all-gather in the entry, an all-to-all
# of a tuple (with XLA's /*index=*/ comments) in a loop of 3 nested in a loop of 4, and a loop
# without a known trip count.
_HLO = """HloModule m

%inner_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %y = bf16[2,8]{1,0} convert(%x)
  %a2a = (f32[4,8]{1,0}, /*index=1*/bf16[2,8]{1,0}) all-to-all(%x, /*index=1*/%y), channel_id=1
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %x)
}

%inner_cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%outer_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %w = (s32[], f32[4,8]{1,0}) while(%p), condition=%inner_cond, body=%inner_body, TRIPS_3
  %r = f32[16]{0} all-reduce(%v), channel_id=2, to_apply=%add
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %x)
}

%unknown_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %z = f32[10]{0} parameter(1)
  %g = f32[40]{0} all-gather(%z), dimensions={0}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %x)
}

ENTRY %main (a: f32[2,8]) -> f32[8,8] {
  %a = f32[2,8]{1,0} parameter(0)
  %g = f32[8,8]{1,0} all-gather(%a), dimensions={0}
  %w = (s32[], f32[4,8]{1,0}) while(%t0), condition=%inner_cond, body=%outer_body, TRIPS_4
  %u = (s32[], f32[4,8]{1,0}) while(%t0), condition=%inner_cond, body=%unknown_body
  ROOT %o = f32[8,8]{1,0} copy(%g)
}
"""
for _n in (3, 4):
    _HLO = _HLO.replace(f"TRIPS_{_n}", 'backend_config={"known_trip_count":{"n":"' + f'{_n}"}}}}')


def test_collective_bytes_count_every_execution_of_a_step():
    assert shape_bytes("(f32[4,8]{1,0}, bf16[2,8]{1,0})") == 4 * 32 + 2 * 16
    totals = collective_bytes(_HLO)
    # entry: one all-gather of 2x8 -> 8x8 floats, plus the unknown loop's (counted once)
    assert totals["all-gather"] == {"count": 2, "operand": 64 + 40, "result": 256 + 160}
    # 4 x 3 = 12 all-to-alls of a 4x8 float32 and a 2x8 bfloat16 operand
    assert totals["all-to-all"] == {"count": 12, "operand": 12 * 160, "result": 12 * 160}
    assert totals["all-reduce"]["count"] == 4  # %v is not defined: its operand bytes are 0
    assert totals["unknown_trip_counts"] == 1


_PLANS = """
import json
from moesaic.configs import loading
from moesaic.launch import plan_merged

mesh = {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
config = loading.resolve("moesaic/configs/flexolmo_7x7b.py", [])
out = {}
for job, dispatch in (("eval", "all_to_all"), ("decode", "dropless")):
    out[job] = plan_merged.make_plan(config, mesh, job, batch=8, seq_len=4096,
                                     dispatch=dispatch).to_dict()
tiny = loading.resolve("moesaic/configs/tiny.py:experts=5", [])
out["tiny"] = plan_merged.make_plan(tiny, {**mesh, "expert": 4, "data": 2}, "tune-router",
                                    batch=8, seq_len=32, dispatch="all_to_all").to_dict()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def plans():
    return last_json_line(run_python(_PLANS, devices=8, timeout=600).stdout)


def test_the_merged_7x7b_model_fits_80gb_for_eval_and_decode_on_an_expert_axis(plans):
    vocab, d, layers, heads, head_dim, ff, f32 = 100352, 4096, 32, 32, 128, 11008, 4
    replicated = (2 * vocab * d + 4 * layers * d * heads * head_dim + 2 * layers * heads * head_dim
                  + 2 * layers * d + d)
    expert_slot = 3 * layers * d * ff  # one slot per device: 7 experts padded to 8
    router = layers * 8 * d + layers * 8  # rows and biases, split over the 8 devices
    for job in ("eval", "decode"):
        p = plans[job]
        assert (p["experts"], p["padding"]) == (7, 1)
        assert p["by_hand"]["parameters"] == f32 * (replicated + expert_slot + router // 8)
        assert p["needed"] < 80e9, (job, p["needed"] / 1e9)
    # the explicit dispatch: two all-to-alls per layer, each of the 8 slots x the device's
    # 4096 tokens x d_model (XLA:CPU moves them as float32)
    a2a = plans["eval"]["collectives"]["all-to-all"]
    assert a2a["count"] == 2 * layers
    assert a2a["operand"] == 2 * layers * 8 * 4096 * d * f32


def test_tune_router_plan_sends_tokens_and_keeps_optimizer_state_for_the_rows_only(plans):
    p = plans["tiny"]  # tiny: 4 layers, d_model 128; 5 experts padded to 8 slots, 2 a device
    layers, d, slots_per_device, tokens = 4, 128, 2, 8 * 32 // 8
    rows = 4 * layers * slots_per_device * d  # float32 router rows on one device
    assert p["by_hand"]["optimizer"] == 2 * rows + 4  # AdamW's mu and nu, and its count
    a2a = p["collectives"]["all-to-all"]
    # out and back in the forward, and their transposes in the backward, in every layer
    assert a2a["count"] == 4 * layers
    assert a2a["operand"] == 4 * layers * 8 * tokens * d * 4


@pytest.mark.parametrize("args, message", [
    (["--job", "eval", "--mesh", "data=1,expert=16"],
     "--mesh: expert=16 is larger than the model's 7 experts"),
    (["--job", "decode", "--mesh", "data=1,expert=2", "--config.model.n_experts=1",
      "--config.model.top_k=1"], "--job: config.model has one expert"),
    (["--job", "eval", "--mesh", "data=1", "--base-experts", "2"],
     "--base-experts set the base of a branch job"),
    (["--mesh", "data=1,fsdp=2,expert=16"], "--mesh: expert=16 is larger than the model's 7"),
    (["--mesh", "data=1", "--batch", "4"], "--batch: set the merged model's step"),
])
def test_plan_refuses_an_expert_axis_the_experts_cannot_fill(args, message, capfd,
                                                             monkeypatch):
    from moesaic.cli import main as cli

    monkeypatch.chdir(ROOT)
    assert cli.main(["plan", "--config", "moesaic/configs/flexolmo_7x7b.py", *args]) == 2
    err = capfd.readouterr().err
    assert err.startswith("moesaic plan: error: ") and message in err, err
    assert "Traceback" not in err and json  # one line, nothing compiled
