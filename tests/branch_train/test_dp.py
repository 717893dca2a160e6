"""Private training: the accountant's epsilon against values computed independently, and the
DP-SGD step (per-row clipping, noise) against the plain step."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moesaic.branch_train import dp, setup
from moesaic.model.sharding import make_mesh
from tests.support.training import tiny_config


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism of sensitivity 1 and noise sigma at delta
    (Balle and Wang 2018): delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s)."""
    def phi(x):
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps):
        half = 1 / (2 * sigma)
        return phi(half - eps * sigma) - math.exp(eps) * phi(-half - eps * sigma)

    lo, hi = 0.0, 50.0
    for _ in range(200):  # delta_of decreases in eps
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_epsilon_matches_independent_accounting():
    # DP-SGD of the classic MNIST setting: q = 256 / 60000, sigma 1.1, 60 epochs, delta 1e-5
    rdp = dp.epsilon(1.1, 256, 60000, 14062, 1e-5)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1)),
        14062)
    direct = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert rdp == pytest.approx(direct, rel=1e-3)  # 2.597
    pld = dp.epsilon(1.1, 256, 60000, 14062, 1e-5, accountant="pld")
    assert pld < rdp < 1.15 * pld  # PLD is tight, RDP an upper bound: 2.382 against 2.597
    # one full-batch step is the Gaussian mechanism, whose epsilon has a closed form
    exact = _analytic_gaussian_epsilon(2.0, 1e-5)
    assert dp.epsilon(2.0, 100, 100, 1, 1e-5, accountant="pld") == pytest.approx(exact, rel=0.01)
    assert dp.epsilon(2.0, 100, 100, 1, 1e-5) >= exact
    assert dp.epsilon(1.1, 8, 100, 0, 1e-5) == 0.0 and dp.epsilon(0.0, 8, 100, 3, 1e-5) == math.inf


def test_the_accountant_counts_the_party_rows_of_the_mixture(tmp_path):
    from moesaic.data.loader import TokenBatches
    from tests.support.training import make_data

    data = make_data(tmp_path)
    batches = TokenBatches(data, "code:0.75,public:0.25", seq_len=16, global_batch=8, seed=0)
    settings = dp.DpSettings(1.0, 1.1, 1e-5)
    accountant = dp.Accountant.of(settings, batches, "code", 8)
    assert accountant.batch_rows == 6  # the public quarter of the batch is public
    assert accountant.num_rows == batches.streams["code"].per_epoch
    assert 0 < accountant.epsilon(10) < accountant.epsilon(20) < math.inf


@pytest.mark.parametrize("field, value, message", [
    ("clip_norm", -1.0, "clip_norm=-1.0"), ("noise_multiplier", -0.5, "noise_multiplier"),
    ("delta", 1.5, "delta=1.5")])
def test_bad_settings_are_named(field, value, message):
    config = tiny_config()
    config.branch.dp.clip_norm = 1.0
    config.branch.dp[field] = value
    with pytest.raises(ValueError, match=message):
        dp.DpSettings.of(config)
    assert dp.DpSettings.of(tiny_config()) is None  # off by default


def _steps(clip_norm: float, noise: float):
    config = tiny_config(model__n_layers=1, model__d_model=16, model__d_ff=32,
                         data__seq_len=8, data__global_batch=4)  # small programs to compile
    sc, plain = setup.set_up(config, "pretrain", make_mesh({"data": 1}))
    private = jax.jit(dp.private_step(sc, dp.DpSettings(clip_norm, noise, 1e-5), seed=0))
    key = jax.random.PRNGKey(0)
    trainable = {n: 0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype)
                 for i, (n, s) in enumerate(sc.trainable_shapes.items())}
    opt_state = sc.optimizer.init(trainable)
    batch = np.asarray(jax.random.randint(key, sc.batch_shape, 0, 256), np.int32)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731 (the steps donate)
    return sc, plain, private, trainable, opt_state, batch, copy


def test_the_private_step_clips_each_row_and_adds_seeded_noise():
    sc, plain, private, trainable, opt_state, batch, copy = _steps(1e6, 0.0)
    # no clipping, no noise: the mean of the rows' gradients is the batch's gradient
    p_plain, _, m_plain = plain(copy(trainable), copy(opt_state), {}, batch, jnp.int32(0))
    p_dp, _, m_dp = private(copy(trainable), copy(opt_state), {}, batch, jnp.int32(0))
    assert float(m_dp["loss"]) == pytest.approx(float(m_plain["loss"]), rel=1e-5)
    assert float(m_dp["grad_norm"]) == pytest.approx(float(m_plain["grad_norm"]), rel=1e-4)
    for name in p_plain:
        np.testing.assert_allclose(p_dp[name], p_plain[name], rtol=1e-4, atol=1e-6)
    # every row clipped to 1e-3, then noise: the same seed and step give the same update,
    # another step another one
    noisy = jax.jit(dp.private_step(sc, dp.DpSettings(1e-3, 1.0, 1e-5), seed=0))
    runs = [noisy(copy(trainable), copy(opt_state), {}, batch, jnp.int32(s))[2]
            for s in (0, 0, 1)]
    assert all(float(m["clipped"]) == 1.0 for m in runs)
    norms = [float(m["grad_norm"]) for m in runs]
    assert norms[0] == norms[1] != norms[2]
    # the clipped mean is at most 1e-3 long; the noise, 1e-3 / rows per coordinate, is far
    # longer over the tree's coordinates
    n = sum(math.prod(s.shape) for s in sc.trainable_shapes.values())
    assert norms[0] == pytest.approx(1e-3 / sc.batch_shape[0] * math.sqrt(n), rel=0.05)


def test_a_resume_keeps_the_private_settings():
    from moesaic.branch_train import trainer

    config = tiny_config("source=code")
    old = config.to_dict()
    del old["branch"]["dp"]  # a checkpoint written before private training existed
    assert trainer.resume_mismatches({"config": old}, config, "branch", {}) == []
    config.branch.dp.clip_norm = 1.0
    (diff,) = trainer.resume_mismatches({"config": old}, config, "branch", {})
    assert diff.startswith("branch.dp: checkpoint {'clip_norm': 0.0")
