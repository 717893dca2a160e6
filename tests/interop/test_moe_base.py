"""An MoE base end to end: a FlexOlmo made with transformers, imported with `moesaic import-hf`,
gains two parties (branch jobs on the two-expert base), which merge; removing one gives the
merge that never had it, bit for bit, and adding it back gives the merge of both in that
order, bit for bit. The base's experts and router rows reach every merged model unchanged."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesaic.branch_train.trainer import Job, train  # noqa: E402
from moesaic.cli.main import main  # noqa: E402
from moesaic.model import checkpoint, names  # noqa: E402
from tests.support.training import TINY, make_data, tiny_config  # noqa: E402

# FlexOlmo's layout at the training tests' shapes, with the byte tokenizer's ids
HF = dict(vocab_size=264, eos_token_id=256, pad_token_id=257, hidden_size=TINY["model.d_model"],
          intermediate_size=TINY["model.d_ff"], num_hidden_layers=TINY["model.n_layers"],
          num_attention_heads=TINY["model.n_heads"], num_key_value_heads=TINY["model.n_kv_heads"],
          rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
          num_experts=2, num_experts_per_tok=2, norm_topk_prob=False)


def _tensors(path) -> dict[str, np.ndarray]:
    return checkpoint.load_tensors(path, checkpoint.tensor_metadata(path))


def _assert_same(path, other) -> None:
    a, b = _tensors(path), _tensors(other)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert checkpoint.read_meta(path)["fingerprint"] == checkpoint.read_meta(other)["fingerprint"]


@pytest.mark.slow
def test_flexolmo_base_gains_two_parties_and_one_leaves_and_joins_exactly(tmp_path):
    torch.manual_seed(0)
    transformers.FlexOlmoForCausalLM(transformers.FlexOlmoConfig(**HF)).save_pretrained(
        tmp_path / "hf")
    base = tmp_path / "base"
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(base),
                 "--tokenizer", "bytes"]) == 0
    data = make_data(tmp_path / "data")
    branch = {}
    for source in ("code", "math"):
        train(tiny_config(f"source={source},experts=2", train__steps=2, branch__stats_batches=1),
              Job("branch", tmp_path / source, data, base=base, show_progress=False))
        branch[source] = str(tmp_path / source / "artifact")

    def merge(*argv, out):
        assert main(["merge", *argv, "--out", str(tmp_path / out)]) == 0
        return tmp_path / out

    common = ["--base", str(base), "--router", "learned-rows", "--top-k", "2"]
    both = merge(*common, "--branch", branch["code"], "--branch", branch["math"], out="both")
    removed = merge("remove", str(both), "--source", "code", out="removed")
    _assert_same(removed, merge(*common, "--branch", branch["math"], out="math_only"))
    back = merge("add", str(removed), "--branch", branch["code"], out="back")
    _assert_same(back, merge(*common, "--branch", branch["math"], "--branch", branch["code"],
                             out="math_then_code"))

    imported, merged = _tensors(base), _tensors(both)
    for name in names.FFN_EXPERT + (names.ROUTER,):
        np.testing.assert_array_equal(merged[name][:, :2], imported[name], err_msg=name)
    meta = checkpoint.read_meta(both)
    assert meta["model"]["n_experts"] == 4 and meta["model"]["top_k"] == 2
    model, _ = checkpoint.load(both)
    logits, _ = model(np.arange(16, dtype=np.int32).reshape(1, 16))
    assert np.isfinite(np.asarray(logits)).all()
