"""A merged model expert-parallel on an expert axis its experts do not divide (padding that is
never routed), and the explicit all-to-all dispatch against the compiler's, on fake CPU
devices in a subprocess."""

from __future__ import annotations

import pytest

from moesaic.model import ModelConfig
from moesaic.model.expert_parallel import check_expert_axis, padding_for
from tests.support.processes import last_json_line, run_python

_CODE = """
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from moesaic.model import ModelConfig, make_mesh
from moesaic.model.checkpoint import flatten
from moesaic.model.expert_parallel import runtime_rules, shard_merged_model, unpadded
from moesaic.model.params import build_model
from moesaic.model.sharding import activate
from moesaic.model.transformer import Decoder, token_nll
from moesaic.configs.common import DEFAULT_RULES

tokens = jax.random.randint(jax.random.key(1), (8, 13), 0, 40)
out = {}

def model_of(e, trainable=False):
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                      n_experts=e, top_k=2, init_std=0.3, router_trainable=trainable)
    return Decoder(cfg, rngs=nnx.Rngs(e))

def forward(model, mesh=None):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    if mesh is None:
        return fn(state, tokens)
    with activate(mesh, runtime_rules(DEFAULT_RULES, mesh)):
        return fn(state, tokens)

def diff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))

for e in (5, 7):
    model = model_of(e)
    logits, aux = forward(model)
    for n in (4, 8):
        mesh = make_mesh({"data": 1, "expert": n}, devices=jax.devices()[:n])
        sharded = shard_merged_model(model, mesh)
        w = sharded.blocks.ffn.w_gate[...]
        got, got_aux = forward(sharded, mesh)
        out[f"{e}_on_{n}"] = dict(
            slots=int(w.shape[1]), per_device=int(w.addressable_shards[0].data.shape[1]),
            logits=diff(got, logits),
            share=diff(got_aux["expert_weight_per_token"], aux["expert_weight_per_token"]),
            unpadded=all(bool(jnp.array_equal(a, flatten(nnx.state(model))[k]))
                         for k, a in unpadded(sharded.cfg, flatten(nnx.state(sharded))).items()))

# the explicit all-to-all dispatch and the sharded ragged_dot path against the compiler's
mesh = make_mesh({"data": 2, "expert": 4})
rules = runtime_rules(DEFAULT_RULES, mesh)
base = shard_merged_model(model_of(7, trainable=True), mesh)
flat = flatten(nnx.state(base))

def loss_and_grad(dispatch):
    cfg = base.cfg.replace(dispatch=dispatch)

    def loss(p):  # the logits ride along as the auxiliary output: one program a dispatch
        logits, aux = build_model(cfg, p)(tokens[:, :-1])
        nll = jnp.mean(token_nll(logits, tokens[:, 1:]))
        return nll + cfg.z_loss_weight * aux["z_loss"], logits

    with activate(mesh, rules):
        (value, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(flat)
    return logits, (value, grad)

ref_logits, (ref_loss, ref_grad) = loss_and_grad("dropless")
for dispatch in ("all_to_all", "dropless_ragged"):
    logits, (loss, grad) = loss_and_grad(dispatch)
    scale = {k: 1e-6 + float(jnp.max(jnp.abs(g))) for k, g in ref_grad.items()}
    out[dispatch] = dict(logits=diff(logits, ref_logits), loss=diff(loss, ref_loss),
                         grad=max(diff(grad[k], ref_grad[k]) / scale[k] for k in ref_grad))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    return last_json_line(run_python(_CODE, devices=8, timeout=600).stdout)


@pytest.mark.parametrize("experts", [5, 7])
@pytest.mark.parametrize("axis", [4, 8])
def test_any_expert_count_shards_and_gives_the_single_device_logits(results, experts, axis):
    r = results[f"{experts}_on_{axis}"]
    assert r["slots"] == experts + padding_for(experts, axis)
    assert r["per_device"] == r["slots"] // axis  # split over the expert axis, not replicated
    assert r["logits"] < 1e-4, r
    assert r["share"] < 1e-5, r  # the routing statistics of the real experts only
    assert r["unpadded"]  # cutting the padding gives the model back bit for bit


@pytest.mark.parametrize("dispatch", ["all_to_all", "dropless_ragged"])
def test_explicit_dispatch_equals_the_compilers_in_outputs_and_gradients(results, dispatch):
    r = results[dispatch]
    assert r["logits"] < 1e-4, r
    assert r["loss"] < 1e-5, r
    assert r["grad"] < 1e-4, r  # relative to each tensor's largest gradient


def test_an_expert_axis_that_cannot_split_the_experts_is_refused():
    check_expert_axis(7, 8)
    check_expert_axis(5, 8)
    with pytest.raises(ValueError, match="expert=8 is larger than the model's 4 experts"):
        check_expert_axis(4, 8)
    with pytest.raises(ValueError, match="dense model"):
        check_expert_axis(1, 2)
    with pytest.raises(ValueError, match="expert_padding"):
        ModelConfig(n_experts=3, expert_padding=-1)
