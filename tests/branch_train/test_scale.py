"""Mixed precision and profiling (docs/scale.md): a tiny branch computed in bfloat16 follows the
float32 loss curve; the float32 master copy keeps updates that bfloat16 parameters lose; a bf16
branch job in the trainer writes the base's own frozen hashes; the model FLOP count against
XLA's; a profiled job writes a trace and logs MFU; bad values refused naming the field."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moesaic.branch_train import artifact, profiling, setup, upcycle
from moesaic.branch_train.precision import Precision
from moesaic.branch_train.trainer import Job, train
from moesaic.model import checkpoint, names
from moesaic.model.config import ModelConfig
from moesaic.model.sharding import make_mesh
from moesaic.model.transformer import Decoder
from tests.support.training import make_data, tiny_config

# bf16 compute against float32 over STEPS steps at lr 1e-2: measured at most 1.1e-3 apart
# while the loss falls by about 0.3 (5.59 -> 5.27); TOLERANCE leaves room for another CPU
STEPS, TOLERANCE = 30, 1e-2


def _batches(shape, steps: int) -> list[np.ndarray]:
    """Rows that follow x -> 5x + 3 (mod 32) from random starts: a branch learns them."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        x = np.zeros(shape, np.int32)
        x[:, 0] = rng.integers(0, 32, shape[0])
        for t in range(1, shape[1]):
            x[:, t] = (x[:, t - 1] * 5 + 3) % 32
        out.append(x)
    return out


def _branch(dtype: str, *, stored: str = "float32", master: str = "float32", steps: int,
            lr: float):
    """(losses, final trainable, start trainable, StepConfig) of a tiny branch over a random
    dense base stored in `stored`, computed in `dtype`, its master copy in `master`."""
    config = tiny_config("source=code", train__warmup_steps=2, train__steps=steps,
                         train__lr=lr)
    config.model.dtype = dtype
    config.train.master_dtype = master
    base_cfg = ModelConfig.from_config(config.model).replace(param_dtype=stored)
    sc, step = setup.set_up(config, "branch", make_mesh({"data": -1}), base_cfg)
    base = checkpoint.flatten(nnx.state(Decoder(base_cfg, rngs=nnx.Rngs(0))))
    row = 0.1 * jax.random.normal(jax.random.key(1), (base_cfg.n_layers, base_cfg.d_model))
    trainable, frozen = upcycle.upcycle(sc.layout, base, base_cfg, row, None)
    trainable = jax.device_put(sc.precision.hold_trainable(trainable), sc.trainable_shardings)
    frozen = jax.device_put(sc.precision.hold_frozen(frozen), sc.frozen_shardings)
    opt_state = jax.jit(sc.optimizer.init, out_shardings=sc.opt_shardings)(trainable)
    start = {n: np.asarray(a) for n, a in trainable.items()}
    losses = []
    for i, tokens in enumerate(_batches(sc.batch_shape, steps)):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen,
                                             jax.device_put(tokens, sc.batch_sharding),
                                             jnp.asarray(i, jnp.int32))
        losses.append(float(metrics["loss"]))
    for leaf in jax.tree.leaves(opt_state):  # AdamW's moments in the master dtype
        assert leaf.dtype in (np.dtype(master), np.int32), leaf.dtype
    return np.array(losses), {n: np.asarray(a) for n, a in trainable.items()}, start, sc


def test_a_bf16_branch_follows_the_float32_loss_curve():
    f32, _, _, sc32 = _branch("float32", steps=STEPS, lr=1e-2)
    bf16, _, _, sc16 = _branch("bfloat16", steps=STEPS, lr=1e-2)
    assert f32[0] - f32[-1] > 0.2  # it learns: the comparison is over a falling curve
    assert np.max(np.abs(bf16 - f32)) < TOLERANCE, np.abs(bf16 - f32)
    # bf16 compute holds the frozen matrices in bf16, norms and router rows as stored
    frozen = sc16.frozen_shapes
    assert frozen[names.ATTN_Q].dtype == jnp.bfloat16 and frozen[names.W_GATE].dtype == jnp.bfloat16
    assert frozen[names.ATTN_NORM].dtype == np.float32
    assert all(s.dtype == np.float32 for s in sc32.frozen_shapes.values())
    assert all(s.dtype == np.float32 for s in sc16.trainable_shapes.values())


def test_the_float32_master_keeps_updates_that_bf16_parameters_round_away():
    # a base stored in bf16 and a learning rate whose first update is below bf16's resolution
    # of the weights (|w| ~ 0.02, relative spacing 2^-8): the float32 master moves every
    # entry, while the same update added to the bf16 parameter rounds back to it nearly
    # everywhere, which is what a job without a master copy (train.master_dtype=bfloat16) does
    _, final, start, sc = _branch("bfloat16", stored="bfloat16", steps=1, lr=1e-5)
    assert sc.trainable_shapes[names.W_UP].dtype == np.float32
    assert sc.layout.dtypes[names.W_UP] == jnp.bfloat16
    master, begin = final[names.W_UP], start[names.W_UP]
    assert np.mean(master != begin) > 0.95
    in_bf16 = (begin.astype(jnp.bfloat16) + (master - begin).astype(jnp.bfloat16))
    assert np.mean(in_bf16.astype(np.float32) != begin) < 0.2, np.mean(in_bf16 != begin)
    # what the job writes is in the stored dtype
    stored = Precision.stored({names.W_UP: jnp.asarray(master)}, sc.layout.dtypes)
    assert stored[names.W_UP].dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def bf16_branch(tmp_path_factory):
    """(base, result, workdir) of a bf16 branch job over a fresh float32 base (a model
    checkpoint, no pretraining), which traced steps 1-2 and logged MFU against a stated peak
    (a CPU has none in the table)."""
    data = make_data(tmp_path_factory.mktemp("data"))
    base = tmp_path_factory.mktemp("base") / "model"
    checkpoint.save_model(base, Decoder(ModelConfig.from_config(tiny_config().model),
                                        rngs=nnx.Rngs(0)))
    workdir = tmp_path_factory.mktemp("branch")
    config = tiny_config("source=code", train__steps=2, model__dtype="bfloat16",
                         train__profile_steps="1,2", train__peak_tflops=0.001)
    result = train(config, Job("branch", workdir, data, base, show_progress=False))
    return base, result, workdir


def test_a_bf16_branch_job_writes_the_bases_own_frozen_hashes(bf16_branch):
    base, result, _ = bf16_branch
    assert result.frozen[names.ATTN_Q].dtype == jnp.bfloat16  # held in bf16 for the step
    assert result.trainable[names.W_UP].dtype == np.float32  # the master copy
    meta = artifact.read_meta(result.output)
    stored = checkpoint.tensor_metadata(base)
    for name, digest in meta["frozen_hashes"].items():  # the base's, as stored (float32)
        assert digest == checkpoint.TensorReader(base, name).hash(), name
        assert stored[name][1] == np.float32
    assert names.ATTN_Q in meta["frozen_hashes"]
    own = checkpoint.tensor_metadata(result.output)
    assert own[names.W_UP][1] == np.float32  # the master cast back to the stored dtype


def test_a_profiled_job_writes_a_trace_and_logs_mfu(bf16_branch):
    _, result, workdir = bf16_branch
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert traces, sorted(p.name for p in (workdir / "profile").rglob("*"))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    flops = profiling.model_flops_per_token(result.layout, 16)
    for r in records:  # the model FLOPs of the tokens per second against the stated peak
        assert r["mfu"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e9, rel=1e-6)


def test_the_model_flop_count_is_xlas_and_counts_only_trained_weight_gradients():
    """A dense step against XLA's count of the lowered program (before the backend rewrites
    it; unrolled layers, no remat): XLA also counts the elementwise work, which the model
    count leaves out. A branch's count by hand: both experts forward, only the owner's
    weights (and row) get weight gradients."""
    config = tiny_config(model__scan_layers=False, model__d_model=64, model__d_ff=256,
                         data__seq_len=64)
    sc, step = setup.set_up(config, "pretrain", make_mesh({"data": -1}))
    args = [jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)
            for tree in (sc.trainable_shapes, sc.opt_shapes, sc.frozen_shapes)]
    cost = step.lower(*args, jax.ShapeDtypeStruct(sc.batch_shape, jnp.int32),
                      jax.ShapeDtypeStruct((), jnp.int32)).cost_analysis()
    tokens = sc.batch_shape[0] * 64
    dense = profiling.model_flops_per_token(sc.layout, 64)
    assert 0.9 < dense * tokens / cost["flops"] <= 1.0, dense * tokens / cost["flops"]

    cfg = sc.layout.cfg
    layers, d, f, v = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    attention = 12 * layers * 64 * cfg.n_heads * cfg.head_size
    n_dense = layers * (4 * d * d + 3 * d * f) + d * v
    assert dense == 6 * n_dense + attention  # PaLM's 6N + 12 L T H Q
    branch = setup.set_up(tiny_config("source=code", model__d_model=64, model__d_ff=256),
                          "branch", make_mesh({"data": -1}), cfg)[0].layout
    active = n_dense + layers * (3 * d * f + 2 * d)  # the own expert and two router rows
    trained = layers * (3 * d * f + d)  # the own expert and its row
    assert profiling.model_flops_per_token(branch, 64) == 4 * active + 2 * trained + attention


def test_device_peaks_and_bad_values_are_named():
    assert profiling.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert profiling.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert profiling.peak_tflops("NVIDIA H200") == 989.0
    assert profiling.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert profiling.peak_tflops("TPU v4") == 275.0
    assert profiling.peak_tflops("TPU v5 lite") == 197.0
    assert profiling.peak_tflops("TPU v5p") == 459.0
    assert profiling.peak_tflops("TPU v6 lite") == 918.0
    assert profiling.peak_tflops("cpu") is None
    assert profiling.peak_tflops("cpu", 1.5) == 1.5
    assert profiling.parse_profile_steps("10,12") == (10, 12)
    assert profiling.parse_profile_steps("7") == (7, 7)
    assert profiling.parse_profile_steps("") is None
    for bad in ("12,10", "0,3", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="config.train.profile_steps"):
            profiling.parse_profile_steps(bad)
    config = tiny_config()
    for field, value in (("master_dtype", "int8"), ("master_dtype", "f32x"),
                         ("frozen_dtype", "half")):
        config.train[field] = value
        with pytest.raises(ValueError, match=f"config.train.{field}"):
            setup.set_up(config, "pretrain", make_mesh({"data": -1}))
        config.train[field] = tiny_config().train[field]


def test_the_accelerator_bench_says_it_needs_an_accelerator_on_cpu(capsys):
    """bench/accelerator.py on a CPU-only machine: the message, exit code 0, nothing run."""
    import importlib.util

    from tests.support.processes import ROOT

    spec = importlib.util.spec_from_file_location("accelerator_bench",
                                                  ROOT / "bench" / "accelerator.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert jax.devices()[0].platform == "cpu"
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert out.strip() == bench.NEEDS_ACCELERATOR
    assert "needs a GPU or TPU" in out
