"""`moesaic eval`, `moesaic tune-router` and `moesaic generate` with --mesh: a merged model of
5 experts expert-parallel on an expert axis of 4 (padded to 8 slots) gives the numbers of one
device, and a mesh that does not fit is refused before anything is read or compiled."""

from __future__ import annotations

import numpy as np
import pytest

from moesaic.cli import mesh as mesh_flags
from tests.support.processes import last_json_line, run_python
from tests.support.training import make_data

_CODE = """
import contextlib, io, json
import numpy as np
from flax import nnx
from moesaic.cli.main import main
from moesaic.model import Decoder, ModelConfig, checkpoint

root = {root!r}
# 4 layers: the expert tensors are read split over the expert axis along their layers
cfg = ModelConfig(d_model=16, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=32, n_experts=5,
                  top_k=2, init_std=0.3, router_trainable=False)
checkpoint.save_model(f"{{root}}/m", Decoder(cfg, rngs=nnx.Rngs(0)),
                      {{"kind": "merged", "router": {{"kind": "random"}}}})
common = ["--data", f"{{root}}/data", "--sources", "code", "--max-sequences", "4",
          "--seq-len", "24", "--batch-size", "4", "--no-progress"]
out = {{}}
for name, extra in (("one", []),
                    ("all_to_all", ["--mesh", "data=1,expert=4", "--dispatch", "all_to_all"])):
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["eval", "--model", f"{{root}}/m", *common, "--json", f"{{root}}/{{name}}.json",
                   *extra])
    out[name] = dict(rc=rc, **json.load(open(f"{{root}}/{{name}}.json"))["domains"]["code"])
tune = ["tune-router", f"{{root}}/m", "--data", f"{{root}}/data", "--source", "code",
        "--steps", "2", "--seq-len", "24", "--batch", "4"]
for name, extra in (("one", []), ("expert", ["--mesh", "data=1,expert=4"])):
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main([*tune, "--out", f"{{root}}/t_{{name}}"])
    rows = checkpoint.load_tensors(f"{{root}}/t_{{name}}", ["blocks/ffn/router"])
    out[f"tune_{{name}}"] = dict(rc=rc, rows=np.asarray(rows["blocks/ffn/router"]).tolist(),
                                 meta=checkpoint.read_meta(f"{{root}}/t_{{name}}")["model"])
gen = ["generate", "--model", f"{{root}}/m", "--prompt", "abc", "--prompt", "hello there",
       "--max-new-tokens", "4", "--no-progress"]
for name, extra in (("one", []), ("expert", ["--mesh", "data=1,expert=4"])):
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main([*gen, "--json", f"{{root}}/g_{{name}}.json", *extra])
    out[f"generate_{{name}}"] = dict(rc=rc, **json.load(open(f"{{root}}/g_{{name}}.json")))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_cli")
    make_data(root / "data")
    return last_json_line(run_python(_CODE.format(root=str(root)), devices=4,
                                     timeout=600).stdout)


def test_eval_on_an_expert_axis_gives_the_numbers_of_one_device(runs):
    one = runs["one"]
    for name in ("all_to_all",):  # dropless on the mesh: tests/model/test_expert_parallel.py
        assert runs[name]["rc"] == 0
        assert runs[name]["nll"] == pytest.approx(one["nll"], abs=1e-5)
        assert runs[name]["tokens"] == one["tokens"]
        shares = runs[name]["routing"]["weight_share"]
        assert len(shares[0]) == 5  # the real experts only, never the padding
        np.testing.assert_allclose(shares, one["routing"]["weight_share"], atol=1e-5)


def test_tune_router_on_an_expert_axis_writes_the_rows_of_one_device(runs):
    one, expert = runs["tune_one"], runs["tune_expert"]
    assert one["rc"] == expert["rc"] == 0
    assert len(expert["rows"][0]) == 5  # the padding cut before writing
    assert expert["meta"]["expert_padding"] == 0
    np.testing.assert_allclose(expert["rows"], one["rows"], atol=1e-5)


def test_generate_on_an_expert_axis_writes_the_tokens_of_one_device(runs):
    one, expert = runs["generate_one"], runs["generate_expert"]
    assert one["rc"] == expert["rc"] == 0
    assert [c["completion"] for c in expert["completions"]] == \
        [c["completion"] for c in one["completions"]]


def test_a_mesh_that_does_not_fit_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ValueError, match="needs 4 devices, this process has 1"):
        mesh_flags.build("data=1,expert=4", 5)
    with pytest.raises(ValueError, match="expert=16 is larger than the model's 5 experts"):
        mesh_flags.build("expert=16", 5)
    with pytest.raises(ValueError, match="expected axis=size pairs"):
        mesh_flags.build("experts=4", 5)
    from moesaic.cli.main import main

    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path),
                 "--sources", "code", "--mesh", "data=1,expert=4"]) == 2
    assert "needs 4 devices" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # the refusal wrote nothing
