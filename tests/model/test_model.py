"""The model: each MoE dispatch path against the loop reference, routing semantics, the
logical axes of every parameter, config validation, and sharded equals single-device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moesaic.model import Decoder, ModelConfig, dispatch, lm_loss, moe
from moesaic.model.reference import capacity_keep, moe_reference
from tests.support.processes import last_json_line, run_python

D, F, T = 16, 24, 40


def _weights(key, e):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return (jax.random.normal(k1, (e, D, F)) * 0.3, jax.random.normal(k2, (e, D, F)) * 0.3,
            jax.random.normal(k3, (e, F, D)) * 0.3, jax.random.normal(k4, (e, D)))


@pytest.mark.parametrize("path", ["dropless_ragged", "dropless_blocked", "dropless_gather",
                                  "capacity"])
@pytest.mark.parametrize("e,k,capacity_factor", [(2, 1, 1.0), (4, 2, 0.5), (4, 2, 2.0),
                                                 (8, 3, 1.0), (3, 3, 0.75)])
def test_dispatch_matches_loop_reference(path, e, k, capacity_factor):
    x = jax.random.normal(jax.random.key(1), (T, D))
    w_gate, w_up, w_down, router = _weights(jax.random.key(e * 10 + k), e)
    bias = jnp.linspace(-0.5, 0.5, e)

    def fast(x, w_gate, w_up, w_down, router):
        r = moe.route(x, router, bias, k, False)
        y, dropped = dispatch.get(path)(x, r.weights_tk, r.experts_tk, w_gate, w_up, w_down,
                                        capacity_factor=capacity_factor)
        return y, dropped

    def slow(x, w_gate, w_up, w_down, router):
        r = moe.route(x, router, bias, k, False)
        cf = capacity_factor if path == "capacity" else None
        return moe_reference(x, r, w_gate, w_up, w_down, capacity_factor=cf)

    y_fast, dropped = jax.jit(fast)(x, w_gate, w_up, w_down, router)
    y_slow = slow(x, w_gate, w_up, w_down, router)
    np.testing.assert_allclose(y_fast, y_slow, atol=1e-5, rtol=1e-5)

    r = moe.route(x, router, bias, k, False)
    expected_drops = (0 if path.startswith("dropless") else
                      int((~capacity_keep(np.asarray(r.experts_tk), e, capacity_factor)).sum()))
    assert int(dropped) == expected_drops
    if path == "capacity" and capacity_factor < 1:
        assert expected_drops > 0  # the case really drops tokens

    args = (x, w_gate, w_up, w_down, router)
    grads_fast = jax.jit(jax.grad(lambda *a: jnp.sum(fast(*a)[0] ** 2), argnums=range(5)))(*args)
    grads_slow = jax.grad(lambda *a: jnp.sum(slow(*a) ** 2), argnums=range(5))(*args)
    for g_fast, g_slow in zip(grads_fast, grads_slow):
        np.testing.assert_allclose(g_fast, g_slow, atol=1e-4, rtol=1e-4)


def test_single_expert_is_plain_swiglu():
    cfg = ModelConfig(d_model=D, d_ff=F, n_layers=1, n_heads=2, n_kv_heads=2, n_experts=1)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(layer, "router")
    graphdef, state = nnx.split(layer)
    one_layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    y, _ = one_layer(x)
    g, u, d = (np.asarray(w[...][0, 0]) for w in (layer.w_gate, layer.w_up, layer.w_down))
    xn = np.asarray(x)
    expected = (xn @ g) / (1 + np.exp(-(xn @ g))) * (xn @ u) @ d
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_topk_renormalisation_and_negative_bias():
    x = jnp.eye(4, D)
    router = jnp.eye(3, D) * 2.0  # token i prefers expert i (token 3 is indifferent)
    r = moe.route(x, router, None, 2, norm_topk_prob=False)
    probs = np.asarray(jax.nn.softmax(np.asarray(x @ router.T), -1))
    np.testing.assert_allclose(r.probs_te, probs, rtol=1e-6)
    np.testing.assert_array_equal(r.experts_tk[:3, 0], [0, 1, 2])
    np.testing.assert_allclose(r.weights_tk, np.sort(probs, -1)[:, ::-1][:, :2], rtol=1e-6)
    assert np.all(np.asarray(r.weights_tk).sum(-1) < 1)  # FlexOlmo: not renormalised
    r_norm = moe.route(x, router, None, 2, norm_topk_prob=True)
    np.testing.assert_allclose(np.asarray(r_norm.weights_tk).sum(-1), 1.0, rtol=1e-6)

    # Negative bias: positive entries are clamped to 0, expert 0 (public) never gets one.
    bias = jnp.array([-5.0, 3.0, -1.0])
    np.testing.assert_array_equal(moe.effective_bias(bias), [0.0, 0.0, -1.0])
    r_bias = moe.route(x, router, bias, 1, False)
    logits = np.asarray(x @ router.T) + np.array([0.0, 0.0, -1.0])
    np.testing.assert_allclose(r_bias.logits_te, logits, rtol=1e-6)
    assert int(r_bias.experts_tk[2, 0]) == 2  # 2 - 1 > 0: still its own expert
    x_weak = x.at[2, 2].set(0.4)  # 0.8 - 1 < 0: the public expert wins now
    assert int(moe.route(x_weak, router, bias, 1, False).experts_tk[2, 0]) == 0


def test_prefix_mean_router_input_is_the_causal_running_mean():
    x = jax.random.normal(jax.random.key(3), (2, 6, D))
    got = np.asarray(moe.router_inputs(x, "prefix_mean"))
    xn = np.asarray(x)
    for t in range(6):
        np.testing.assert_allclose(got[:, t], xn[:, :t + 1].mean(axis=1), atol=1e-6)
    np.testing.assert_array_equal(moe.router_inputs(x, "token"), x)

    # In the model: routing from the prefix mean, the experts still see each token.
    cfg = ModelConfig(d_model=D, d_ff=F, n_layers=1, n_heads=2, n_kv_heads=2, n_experts=4,
                      top_k=2, router_input="prefix_mean")
    layer = moe.MoE(cfg, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(layer)
    one = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    y, _ = one(x)
    r = moe.route(jnp.asarray(got.reshape(-1, D)), one.router[...], one.bias[...], 2, False)
    w = [np.asarray(a[...][0]) for a in (layer.w_gate, layer.w_up, layer.w_down)]
    want = moe_reference(jnp.asarray(xn.reshape(-1, D)), r, *w)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, atol=1e-5)


def test_prefix_mean_routing_is_causal():
    cfg = ModelConfig(vocab_size=64, d_model=32, d_ff=48, n_layers=2, n_heads=2, n_kv_heads=2,
                      n_experts=3, top_k=1, router_input="prefix_mean")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 64)
    changed = tokens.at[0, 8:].set((tokens[0, 8:] + 1) % 64)
    a, _ = model(tokens)
    b, _ = model(changed)
    np.testing.assert_allclose(a[0, :8], b[0, :8], atol=1e-6)  # the future changes nothing
    assert not np.allclose(a[0, 8:], b[0, 8:])


@pytest.mark.parametrize("router_input", ["token", "prefix_mean"])
def test_collected_stats_are_sums_of_what_the_router_scores(router_input):
    from moesaic.model.layers import rms_norm
    cfg = ModelConfig(vocab_size=64, d_model=32, d_ff=48, n_layers=1, n_heads=2, n_kv_heads=2,
                      router_input=router_input)  # a dense base: its stats seed the routers
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 64)
    _, aux = model(tokens, collect_stats=True)
    graphdef, state = nnx.split(model.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    x = model.embed[...][tokens]
    h = np.asarray(x + rms_norm(block.attn(x, jnp.broadcast_to(jnp.arange(10), (3, 10))),
                                block.attn_norm[...], cfg.norm_eps))
    if router_input == "prefix_mean":
        h = np.cumsum(h, axis=1) / np.arange(1, 11)[None, :, None]
    flat = h.reshape(-1, 32)
    np.testing.assert_allclose(aux["x_sum"][0], flat.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aux["xtx"][0], flat.T @ flat, rtol=1e-4, atol=1e-3)


def _dots(jaxpr) -> list:
    """Every dot_general of a traced program, inner ones (scan bodies, pjit) too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _dots(inner)
    return found


def _dot_precisions(jaxpr) -> list[tuple[tuple, object]]:
    """(output shape, precision) of every dot_general in a traced program."""
    return [(tuple(e.outvars[0].aval.shape), e.params["precision"]) for e in _dots(jaxpr)]


@pytest.mark.parametrize("experts", [1, 3])
def test_no_dot_of_the_training_step_contracts_two_axes(experts):
    """XLA:CPU runs a dot that contracts two axes (batch and length, as the weight gradient of
    a `btd,dnh` einsum does) about 2x slower than a 2-D matmul; every projection is one
    (tokens, in) x (in, out) matmul, forward and backward."""
    cfg = ModelConfig(vocab_size=64, d_model=32, d_ff=48, n_layers=2, n_heads=2, n_kv_heads=2,
                      n_experts=experts, top_k=min(2, experts))
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    batch = jnp.zeros((2, 9), jnp.int32)
    grad = jax.grad(lambda s: lm_loss(nnx.merge(graphdef, s), batch)[0])
    dots = _dots(jax.make_jaxpr(grad)(state).jaxpr)
    lhs_shapes = [e.invars[0].aval.shape for e in dots]  # axes of size 1 do not count
    contracted = [sum(shape[a] > 1 for a in e.params["dimension_numbers"][0][0])
                  for e, shape in zip(dots, lhs_shapes)]
    assert len(dots) > 10 and set(contracted) == {1}, contracted


def test_dense_is_the_einsum_it_replaces():
    from moesaic.model.layers import dense

    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    w = jax.random.normal(jax.random.key(1), (4, 5, 6))
    np.testing.assert_allclose(dense(x, w, n_in=2), jnp.einsum("btnh,nhd->btd", x, w),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense(x, w[0], n_in=1), jnp.einsum("btnh,hd->btnd", x, w[0]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [4, 5])
def test_causal_attention_in_query_blocks_is_the_one_call(monkeypatch, block):
    """CPU's blocked causal attention: the same outputs and gradients as the one call (block
    5 does not divide T = 16, so it is the one call too)."""
    from moesaic.model import layers

    monkeypatch.setattr(layers, "CPU_QUERY_BLOCK", block)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8)) for i in range(3))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    one = jax.jit(jax.value_and_grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True)), argnums=(0, 1, 2)))(q, k, v)
    blocked = jax.jit(jax.value_and_grad(loss(layers.causal_attention),
                                         argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(blocked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("experts", [1, 3])
def test_the_layer_loop_is_the_scan(experts):
    """`model.scan_layers=False` unrolls the layers: same logits, per-layer aux, statistics and
    gradients as the scan, and no scan left in the program."""
    kw = dict(vocab_size=64, d_model=32, d_ff=48, n_layers=3, n_heads=2, n_kv_heads=2,
              n_experts=experts, top_k=min(2, experts))
    batch = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)

    def run(scan_layers):
        """(the forward pass, the loss's gradients, the gradient program's primitives)."""
        graphdef, state = nnx.split(Decoder(ModelConfig(**kw, scan_layers=scan_layers),
                                            rngs=nnx.Rngs(0)))
        grad = jax.grad(lambda s: lm_loss(nnx.merge(graphdef, s), batch)[0])
        forward_and_grad = jax.jit(lambda s: (nnx.merge(graphdef, s)(batch, True), grad(s)))
        primitives = {e.primitive.name for e in jax.make_jaxpr(grad)(state).jaxpr.eqns}
        return *forward_and_grad(state), primitives

    (logits_s, aux_s), grads_s, primitives_s = run(True)
    (logits_l, aux_l), grads_l, primitives_l = run(False)
    np.testing.assert_allclose(logits_l, logits_s, rtol=1e-5, atol=1e-5)
    assert aux_l.keys() == aux_s.keys()
    for name in aux_s:
        np.testing.assert_allclose(aux_l[name], aux_s[name], rtol=1e-5, atol=1e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads_l, grads_s)
    assert "scan" not in primitives_l and "scan" in primitives_s


def test_router_logits_and_stats_ask_for_full_float32_products():
    """On TPU a float32 matmul defaults to one bfloat16 pass; the router's scores and the
    statistics the ridge rows solve with must not. (CPU computes float32 either way, so the
    traced program is what can be checked here.)"""
    cfg = ModelConfig(vocab_size=64, d_model=32, d_ff=48, n_layers=2, n_heads=2, n_kv_heads=2,
                      n_experts=3, top_k=2)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((2, 8), jnp.int32)
    traced = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t, collect_stats=True))(
        state, tokens)
    found = _dot_precisions(traced.jaxpr)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    router = [p for shape, p in found if shape == (16, 3)]  # (tokens, experts)
    xtx = [p for shape, p in found if shape == (32, 32)]  # (D, D)
    assert router and xtx
    assert all(p == highest for p in router + xtx), (router, xtx)


def test_losses_are_returned():
    cfg = ModelConfig(d_model=32, d_ff=48, n_layers=2, n_experts=4, top_k=2,
                      z_loss_weight=0.1, lb_loss_weight=0.01)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    batch = jax.random.randint(jax.random.key(0), (2, 9), 0, 256)
    loss, metrics = lm_loss(model, batch)
    expected = metrics["nll"] + 0.1 * metrics["z_loss"] + 0.01 * metrics["lb_loss"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(metrics["z_loss"]) > 0 and float(metrics["lb_loss"]) >= 1.0 - 1e-5
    _, aux = model(batch)
    np.testing.assert_allclose(np.asarray(aux["expert_token_share"]).sum(-1), 1.0, rtol=1e-6)


def test_a_masked_target_outside_the_vocabulary_does_not_poison_the_loss():
    cfg = ModelConfig(vocab_size=40, d_model=32, d_ff=48, n_layers=1, eos_id=0, pad_id=45)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    batch = jnp.asarray([[1, 2, 3, 4, 45, 45]])
    loss, metrics = lm_loss(model, batch)
    logits, _ = model(batch[:, :-1])
    logp = jax.nn.log_softmax(logits[0, :3], axis=-1)
    want = -np.mean([float(logp[i, int(batch[0, i + 1])]) for i in range(3)])
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(metrics["nll"]), want, rtol=1e-5)


EXPECTED_AXES = {
    "embed": ("vocab", "embed"),
    "blocks/attn/q": ("layers", "embed", "heads", "head_dim"),
    "blocks/attn/k": ("layers", "embed", "kv_heads", "head_dim"),
    "blocks/attn/v": ("layers", "embed", "kv_heads", "head_dim"),
    "blocks/attn/o": ("layers", "heads", "head_dim", "embed"),
    "blocks/attn/q_norm": ("layers", "heads", "head_dim"),
    "blocks/attn/k_norm": ("layers", "kv_heads", "head_dim"),
    "blocks/attn_norm": ("layers", "embed"),
    "blocks/ffn/w_gate": ("layers", "expert", "embed", "mlp"),
    "blocks/ffn/w_up": ("layers", "expert", "embed", "mlp"),
    "blocks/ffn/w_down": ("layers", "expert", "mlp", "embed"),
    "blocks/ffn/router": ("layers", "expert", "embed"),
    "blocks/ffn/bias": ("layers", "expert"),
    "blocks/ffn_norm": ("layers", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
}


def test_every_parameter_has_its_declared_axes():
    cfg = ModelConfig(d_model=32, d_ff=48, n_layers=3, n_heads=4, n_kv_heads=2, n_experts=3,
                      top_k=2)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    found = {"/".join(map(str, path)): (v.get_metadata()["axes"], v.shape)
             for path, v in nnx.to_flat_state(nnx.state(model))}
    assert set(found) == set(EXPECTED_AXES)
    for name, (axes, shape) in found.items():
        assert tuple(axes) == EXPECTED_AXES[name], name
        assert len(axes) == len(shape), name


def test_the_names_module_spells_every_parameter_and_build_model_runs_them():
    """moesaic.model.names is the one vocabulary branch_train, merge and interop read tensors
    by; build_model runs a config's model on a flat dict of them."""
    from moesaic.model import checkpoint, names
    from moesaic.model.params import build_model

    spelled = {names.EMBED, names.FINAL_NORM, names.LM_HEAD, names.ATTN_Q, names.ATTN_K,
               names.ATTN_V, names.ATTN_O, names.ATTN_Q_NORM, names.ATTN_K_NORM,
               names.ATTN_NORM, names.FFN_NORM, *names.EXPERT_TENSORS}
    assert spelled == set(EXPECTED_AXES)
    assert all(EXPECTED_AXES[n][names.EXPERT_AXIS] == "expert" for n in names.EXPERT_TENSORS)
    assert names.stat_name("xtx", "code") == "stats/code/xtx"
    assert names.rows_name("code", names.BIAS) == "rows/code/bias"
    cfg = ModelConfig(d_model=32, d_ff=48, n_layers=2, n_experts=3, top_k=2)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    flat = checkpoint.flatten(nnx.state(model))
    batch = jax.random.randint(jax.random.key(0), (2, 9), 0, 256)
    np.testing.assert_array_equal(build_model(cfg, flat)(batch)[0], model(batch)[0])
    with pytest.raises(KeyError, match="blocks/ffn/router"):
        build_model(cfg, {n: a for n, a in flat.items() if n != names.ROUTER})


@pytest.mark.parametrize("changes,field", [
    (dict(n_experts=2, top_k=3), "top_k"),
    (dict(d_model=30, n_heads=4), "d_model"),
    (dict(dispatch="einsum-magic"), "dispatch"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(remat="sometimes"), "remat"),
    (dict(router_input="sentence"), "router_input"),
    (dict(head_dim=-4), "head_dim"),
    (dict(d_model=28, n_heads=4), "head_dim"),  # head size 7: RoPE rotates pairs
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(capacity_factor=float("nan")), "capacity_factor"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(eos_id=5, pad_id=5), "pad_id"),  # every document end would leave the loss
])
def test_bad_config_values_are_named(changes, field):
    with pytest.raises(ValueError, match=f"model.{field}="):
        ModelConfig(**changes)


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match="n_expertz"):
        ModelConfig.from_config({"n_expertz": 2})


SHARDED = """
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from moesaic.configs.common import DEFAULT_RULES
from moesaic.model import Decoder, ModelConfig, lm_loss
from moesaic.model.sharding import activate, make_mesh, state_shardings

results = {}
for dispatch in ("dropless", "capacity"):
    cfg = ModelConfig(d_model=32, d_ff=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4,
                      top_k=2, dispatch=dispatch, capacity_factor=2.0)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    batch = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)

    def loss_fn(state, batch):
        return lm_loss(nnx.merge(graphdef, state), batch)[0]

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    loss1, grads1 = grad_fn(state, batch)
    mesh = make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
    shardings = state_shardings(state, mesh, DEFAULT_RULES)
    sharded = jax.device_put(state, shardings)
    assert "expert" in str(sharded["blocks"]["ffn"]["w_gate"].sharding.spec)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data",)))
    with activate(mesh, DEFAULT_RULES):
        loss8, grads8 = jax.jit(jax.value_and_grad(loss_fn))(
            sharded, jax.device_put(batch, batch_sharding))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)))
    results[dispatch] = dict(loss1=float(loss1), loss8=float(loss8), grad_diff=diff,
                             devices=len(jax.devices()))
print(json.dumps(results))
"""


def test_sharded_forward_backward_equals_single_device():
    results = last_json_line(run_python(SHARDED, devices=8).stdout)
    for path, r in results.items():
        assert r["devices"] == 8
        assert abs(r["loss1"] - r["loss8"]) < 1e-5, path
        assert r["grad_diff"] < 1e-5, path
