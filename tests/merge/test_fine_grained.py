"""Fine-grained experts (`merge --fine-grained M`): sub-experts sharing their unit's row give
the unsplit merge's logits, opting out and joining move a party's sub-experts as one unit and
stay exact, and a split that cannot be made is named with nothing written."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moesaic.interop.hf_export import export_hf
from moesaic.merge import fine_grained, fuse
from moesaic.model import checkpoint, names
from moesaic.model.params import build_model
from tests.support.merging import all_tensors, assert_same, expect_refusal

QUIET = {"log": lambda s: None}


def _merge(world, sources, out, **kw):
    return fuse.merge_paths(world["base"], [world["branches"][s] for s in sources],
                            router="learned-rows", top_k=2, out=out, **QUIET, **kw)


def _logits(path, tokens):
    cfg = checkpoint.model_config(checkpoint.read_meta(path))
    return np.asarray(build_model(cfg, all_tensors(path))(tokens)[0])


def test_shared_rows_give_the_unsplit_merge(world, tmp_path):
    plain, fine, scaled = tmp_path / "plain", tmp_path / "fine", tmp_path / "scaled"
    _merge(world, ["code", "math"], plain)
    meta = _merge(world, ["code", "math"], fine, fine_grained_to=4)
    cfg = checkpoint.model_config(meta)
    assert (cfg.n_experts, cfg.top_k, cfg.d_ff, cfg.expert_split) == (12, 8, 12, 4)
    assert [e["source"] for e in meta["experts"]] == [s for s in ("public", "code", "math")
                                                     for _ in range(4)]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 60, (2, 12)))
    want = _logits(plain, tokens)
    np.testing.assert_allclose(_logits(fine, tokens), want, atol=2e-6, rtol=1e-5)

    got = all_tensors(fine)
    for source, unit in (("public", 0), ("math", 2)):
        order = got[fine_grained.order_name(source)]
        whole = (all_tensors(world["base"])[names.W_DOWN][:, 0] if source == "public" else
                 all_tensors(world["branches"][source])[names.W_DOWN][:, 0])
        for layer in range(order.shape[0]):
            assert sorted(order[layer]) == list(range(48))  # a permutation of the units
            subs = got[names.W_DOWN][layer, 4 * unit:4 * unit + 4]  # (4, 12, D)
            np.testing.assert_array_equal(np.concatenate(subs), whole[layer][order[layer]])
    with pytest.raises(ValueError, match="expert_split=4"):
        export_hf(fine, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    # a per-sub-expert part: a party's rows differ, their mean is still its row; the public
    # expert's stay its row
    _merge(world, ["code", "math"], scaled, fine_grained_to=4, fine_grained_scale=2.0)
    rows = all_tensors(scaled)[names.ROUTER].reshape(2, 3, 4, -1)
    unit_rows = all_tensors(fine)[names.ROUTER].reshape(2, 3, 4, -1)[:, :, 0]
    assert np.abs(rows[:, 1:] - rows[:, 1:, :1]).max() > 1e-3  # the parties' sub-experts
    np.testing.assert_array_equal(rows[:, 0], unit_rows[:, :1].repeat(4, axis=1))  # public's
    np.testing.assert_allclose(rows.mean(axis=2), unit_rows, atol=1e-6)


def test_remove_and_add_move_all_of_a_partys_sub_experts(world, tmp_path):
    full, removed, never = tmp_path / "full", tmp_path / "removed", tmp_path / "never"
    kw = {"fine_grained_to": 2, "fine_grained_scale": 1.0}
    _merge(world, ["code", "math", "law"], full, **kw)
    meta = fuse.remove(full, "math", out=removed, **QUIET)
    assert [e["source"] for e in meta["experts"]].count("math") == 0
    _merge(world, ["code", "law"], never, **kw)
    assert_same(removed, never)
    added, at_once = tmp_path / "added", tmp_path / "at_once"
    fuse.add(never, [world["branches"]["math"]], out=added, **QUIET)
    _merge(world, ["code", "law", "math"], at_once, **kw)
    assert_same(added, at_once)


@pytest.mark.parametrize(("kw", "match"), [
    ({"fine_grained_to": 5}, r"'blocks/ffn/w_gate'.*width 48 \(model.d_ff\), which 5 does not"),
    ({"fine_grained_to": 0}, "--fine-grained 0: .* at least 1"),
    ({"fine_grained_to": 2, "low_rank_to": 4}, "--fine-grained 2: splits FFN experts only"),
])
def test_a_split_that_cannot_be_made_is_named(world, tmp_path, kw, match):
    expect_refusal(world, tmp_path, [world["branches"]["code"]], match, **kw)
