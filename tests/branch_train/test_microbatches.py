"""Gradient accumulation (`config.train.microbatches`): the step over M microbatches gives the
full batch's loss, gradient norm and updated parameters (a pretrain and a branch job, on a
data x fsdp mesh of 4 fake devices, and in the trainer); `moesaic plan` compiles the
microbatched step (less memory); bad values are refused with the field's name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moesaic.branch_train import setup, upcycle
from moesaic.branch_train.trainer import Job, train
from moesaic.model import checkpoint, names
from moesaic.model.config import ModelConfig
from moesaic.model.sharding import make_mesh
from moesaic.model.transformer import Decoder
from tests.support.processes import last_json_line, run_python
from tests.support.training import make_data, run_moesaic, tiny_config

# float32, summed in another order: loss and gradient norm to RTOL; the parameters to RTOL
# and ATOL, 0.3% of the learning rate (3e-3): AdamW's first updates are near lr * sign(g),
# so where a gradient is near AdamW's eps its rounding moves an update by more than RTOL
RTOL, ATOL = 1e-5, 1e-5
STEPS = 2  # the second AdamW update depends on the gradient's size, not only its sign


def _run(config, kind: str, microbatches: int, mesh, base_cfg=None, seed: int = 0):
    """(losses, grad norms, final trainable, largest change of a parameter) of STEPS steps of
    `kind` on fixed batches."""
    config = config.copy_and_resolve_references()
    config.train.microbatches = microbatches
    sc, step = setup.set_up(config, kind, mesh, base_cfg)
    layout = sc.layout
    if kind == "pretrain":
        full = checkpoint.flatten(nnx.state(Decoder(layout.cfg, rngs=nnx.Rngs(seed))))
        trainable, frozen = upcycle.split_full(layout, full)
    else:  # a branch upcycled from a dense base, with a router row that routes
        base = checkpoint.flatten(nnx.state(Decoder(base_cfg, rngs=nnx.Rngs(seed))))
        row = jax.random.normal(jax.random.key(1), (base_cfg.n_layers, base_cfg.d_model))
        trainable, frozen = upcycle.upcycle(layout, base, base_cfg, row,
                                            -0.1 * jnp.ones((base_cfg.n_layers,)))
    # own buffers: the step donates them, and a slice of the base may share the frozen one's
    trainable = jax.device_put(jax.tree.map(jnp.copy, trainable), sc.trainable_shardings)
    frozen = jax.device_put(frozen, sc.frozen_shardings)
    opt_state = jax.jit(sc.optimizer.init, out_shardings=sc.opt_shardings)(trainable)
    start = {n: np.array(a) for n, a in trainable.items()}  # copies: the step donates
    rng = np.random.default_rng(seed)
    losses, norms = [], []
    for i in range(STEPS):
        tokens = rng.integers(0, 256, sc.batch_shape).astype(np.int32)  # no pad tokens
        batch = jax.device_put(tokens, sc.batch_sharding)
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch,
                                             jnp.asarray(i, jnp.int32))
        assert set(metrics) == {"loss", "nll", "z_loss", "grad_norm", "lr"}
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    final = {n: np.asarray(a) for n, a in trainable.items()}
    return losses, norms, final, max(float(np.max(np.abs(final[n] - start[n]))) for n in start)


def _assert_same(one, many):
    np.testing.assert_allclose(many[0], one[0], rtol=RTOL, err_msg="loss")
    np.testing.assert_allclose(many[1], one[1], rtol=RTOL, err_msg="grad norm")
    assert set(many[2]) == set(one[2])
    for name in one[2]:
        np.testing.assert_allclose(many[2][name], one[2][name], rtol=RTOL, atol=ATOL,
                                   err_msg=name)


def _config(arg=None):
    # warmup 0: the first update already has the full learning rate
    return tiny_config(arg, train__warmup_steps=0, data__global_batch=8)


def test_four_microbatches_give_the_full_batch_step_in_pretraining():
    mesh = make_mesh({"data": -1})
    config = _config()
    one = _run(config, "pretrain", 1, mesh)
    _assert_same(one, _run(config, "pretrain", 4, mesh))
    assert one[3] > 1e-3  # the steps did move the parameters


def test_four_microbatches_give_the_full_batch_step_in_a_branch():
    mesh = make_mesh({"data": -1})
    config = _config("source=code")
    base_cfg = ModelConfig.from_config(config.model)  # dense: the branch has 2 experts
    one = _run(config, "branch", 1, mesh, base_cfg)
    many = _run(config, "branch", 4, mesh, base_cfg)
    assert set(one[2]) == set(names.EXPERT_TENSORS)  # the owner's expert, router row, bias
    assert one[3] > 1e-3
    _assert_same(one, many)


def test_the_trainer_runs_microbatches_and_logs_the_full_batch_losses(tmp_path):
    data = make_data(tmp_path / "data")
    losses = {}
    for m in (1, 2):
        job = Job("pretrain", tmp_path / f"m{m}", data, show_progress=False)
        losses[m] = train(tiny_config(train__steps=3, train__microbatches=m), job).losses
    assert sorted(losses[2]) == sorted(losses[1]) == [1, 2, 3]
    np.testing.assert_allclose([losses[2][s] for s in (1, 2, 3)],
                               [losses[1][s] for s in (1, 2, 3)], rtol=RTOL)


def test_bad_microbatches_are_refused_with_the_field():
    mesh = make_mesh({"data": -1})
    for bad, message in ((0, r"config.train.microbatches=0: must be a whole number >= 1"),
                         (-2, r"config.train.microbatches=-2: must be a whole number >= 1"),
                         (3, r"config.train.microbatches=3 does not divide "
                             r"config.data.global_batch=8")):
        config = _config()
        config.train.microbatches = bad
        with pytest.raises(ValueError, match=message):
            setup.set_up(config, "pretrain", mesh)
    with pytest.raises(ValueError, match=r"config.train.microbatches=2.0: must be a whole"):
        setup.check_microbatches(2.0, 8, {}, ())  # (a ConfigDict refuses it earlier)
    # the data-parallel axes (batch -> data, fsdp) must split every microbatch's rows
    mesh_shape = {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1}
    rules = tuple(tuple(r) for r in _config().rules)
    with pytest.raises(ValueError, match=r"config.train.microbatches=4: a microbatch of 2 rows "
                                         r"\(config.data.global_batch=8 / 4\) does not split "
                                         r"over the 4 data-parallel devices of the mesh "
                                         r"\(data x fsdp\)"):
        setup.check_microbatches(4, 8, mesh_shape, rules)
    setup.check_microbatches(2, 8, mesh_shape, rules)
    setup.check_microbatches(1, 6, mesh_shape, rules)  # one batch: sharded as it always was
    setup.check_microbatches(8, 8, dict(mesh_shape, data=1, fsdp=1), rules)


def test_microbatches_on_a_data_by_fsdp_mesh_equal_one_device():
    code = """
        import json
        import jax
        from moesaic.model.sharding import make_mesh
        from tests.branch_train.test_microbatches import _assert_same, _config, _run

        config = _config()
        one = _run(config, "pretrain", 1, make_mesh({"data": 1}, devices=jax.devices()[:1]))
        mesh = make_mesh({"data": 2, "fsdp": 2})
        _assert_same(one, _run(config, "pretrain", 2, mesh))
        try:
            _run(config, "pretrain", 4, mesh)
            refused = ""
        except ValueError as error:
            refused = str(error)
        print(json.dumps({"same": True, "refused": refused}))
    """
    result = last_json_line(run_python(code, devices=4).stdout)
    assert result["same"]
    assert "a microbatch of 2 rows" in result["refused"]
    assert "4 data-parallel devices of the mesh (data x fsdp)" in result["refused"]


def _plan(*overrides: str, check: bool = True):
    return run_moesaic(["plan", "--config", "moesaic/configs/tiny.py:source=code", "--mesh",
                        "data=2,fsdp=2", "--json", "--config.data.global_batch=32",
                        "--config.data.seq_len=128", *overrides], check=check)


def test_plan_compiles_the_microbatched_step_and_refuses_a_bad_split():
    one = last_json_line(_plan().stdout)
    many = last_json_line(_plan("--config.train.microbatches=4").stdout)
    assert many["xla"]["argument"] == one["xla"]["argument"]  # the same arguments
    assert many["needed"] < one["needed"], (many["xla"], one["xla"])
    refused = _plan("--config.train.microbatches=16", check=False)
    assert refused.returncode == 2
    assert ("moesaic plan: error: config.train.microbatches=16: a microbatch of 2 rows "
            "(config.data.global_batch=32 / 16) does not split over the 4 data-parallel "
            "devices of the mesh (data x fsdp)") in refused.stderr
