"""The one decoder for every expert count (OLMo-2 / FlexOlmo block, post-norm, no input norm):

    h   = x + RMSNorm(Attn(x))
    out = h + RMSNorm(FFN(h))          FFN = MoE over E SwiGLU experts (E = 1: dense)

then a final RMSNorm and an untied lm_head. The blocks' parameters are stacked over layers and
the decoder scans one block over them (one compiled block whatever the depth), or with
`scan_layers=False` loops over them (one copy per layer; XLA:CPU trains it faster at a few).

Parameter paths (what freeze patterns, merges and exports name):
    embed (V, D) | blocks/attn/{q,k,v,o,q_norm,k_norm} | blocks/attn_norm (L, D)
    blocks/ffn/{w_gate,w_up,w_down,router,bias} | blocks/ffn_norm (L, D) | final_norm | lm_head
    blocks/lora/<target>_{a,b} (low-rank experts: moesaic.model.lora)
    gate_bigram, gate_context, gate_bias (the party gate of a merged model: moesaic.model.gate)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moesaic.model import gate, lora, quantized
from moesaic.model.config import ModelConfig
from moesaic.model.layers import Attention, dense, rms_norm, stacked_param
from moesaic.model.moe import MoE, RouterState, router_inputs
from moesaic.model.sharding import constrain

_REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn = Attention(cfg, rngs=rngs)
        self.attn_norm = stacked_param(None, cfg, (cfg.d_model,), ("embed",), init="ones")
        self.ffn = MoE(cfg, rngs=rngs)
        self.ffn_norm = stacked_param(None, cfg, (cfg.d_model,), ("embed",), init="ones")
        if cfg.lora_experts:
            self.lora = lora.LowRank(cfg, rngs=rngs)

    def __call__(self, x_btd, positions_bt, collect_stats: bool = False, gate_tp=None):
        eps = self.cfg.norm_eps
        low_rank = self.cfg.lora_experts > 0
        delta = lora.attention_delta(self.ffn, self.lora, x_btd, gate_tp) if low_rank else None
        h = x_btd + rms_norm(self.attn(x_btd, positions_bt, delta), self.attn_norm[...], eps)
        h = constrain(h, ("batch", "length", "embed"))
        y, aux = (lora.mixed_ffn(self.ffn, self.lora, h, gate_tp) if low_rank
                  else self.ffn(h, gate_tp))
        if collect_stats:  # sums of the router inputs, no per-token data
            h32 = router_inputs(h, self.cfg.router_input).reshape(-1, h.shape[-1])
            aux["x_sum"] = jnp.sum(h32, axis=0)
            # full float32 products (TPU defaults to one bfloat16 pass): ridge rows solve
            # with this matrix, and three significant digits would not do
            aux["xtx"] = jnp.matmul(h32.T, h32, precision=jax.lax.Precision.HIGHEST)
        out = h + rms_norm(y, self.ffn_norm[...], eps)
        return constrain(out, ("batch", "length", "embed")), aux


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.param_dtype)
        v, d = cfg.vocab_size, cfg.d_model
        self.embed = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (v, d), dtype),
                               axes=("vocab", "embed"))
        self.blocks = Block(cfg, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((d,), dtype), axes=("embed",))
        self.lm_head = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (d, v), dtype),
                                 axes=("embed", "vocab"))
        if cfg.gate_parties:  # the party gate's tables (moesaic.model.gate), never trained
            p = cfg.gate_parties
            self.gate_bigram = RouterState(jnp.zeros((cfg.gate_buckets, p)), axes=(None, None))
            self.gate_context = RouterState(jnp.zeros((v, p)), axes=(None, None))
            self.gate_bias = RouterState(jnp.zeros((p,)), axes=(None,))

    def party_gate(self, tokens_bt: jax.Array) -> jax.Array | None:
        """(B*T, P) the party gate of every position, or None without one."""
        if not self.cfg.gate_parties:
            return None
        z = gate.scores(self.gate_bigram[...], self.gate_context[...], tokens_bt, self.cfg.eos_id)
        g = gate.probs(z, self.gate_bias[...])
        return g.reshape(-1, g.shape[-1])

    def hidden(self, tokens_bt: jax.Array, collect_stats: bool = False):
        """Final hidden states (B, T, D) before the final norm, and per-layer aux (L, ...)."""
        cfg = self.cfg
        x = self.embed[...].astype(cfg.compute_dtype)[tokens_bt]
        x = constrain(x, ("batch", "length", "embed"))
        positions = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        graphdef, layers = nnx.split(self.blocks)
        gate_tp = self.party_gate(tokens_bt)

        def body(x, layer):  # a frozen base held quantized: this layer's slice dequantized
            layer = quantized.dequantize_layer(layer, cfg.compute_dtype)
            return nnx.merge(graphdef, layer)(x, positions, collect_stats, gate_tp)

        if _REMAT[cfg.remat] is not None:
            body = jax.checkpoint(body, policy=_REMAT[cfg.remat])
        if cfg.scan_layers:
            return jax.lax.scan(body, x, layers)
        # unrolled: one copy of the block per layer in the program. XLA:CPU zero-fills the
        # scan's stacked activation buffers every step; the unrolled program has none
        per_layer = []
        for i in range(cfg.n_layers):
            x, aux = body(x, jax.tree.map(lambda a, i=i: a[i], layers))
            per_layer.append(aux)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

    def __call__(self, tokens_bt: jax.Array, collect_stats: bool = False):
        """Logits (B, T, V) in float32 and aux: z_loss, lb_loss, dropped (means over layers),
        expert_token_share / expert_weight_share / expert_weight_per_token (L, E), and with
        `collect_stats` the per-layer router-input sums x_sum (L, D), xtx (L, D, D) and
        n_tokens."""
        x, per_layer = self.hidden(tokens_bt, collect_stats)
        x = rms_norm(x, self.final_norm[...], self.cfg.norm_eps)
        logits = dense(x, self.lm_head[...].astype(x.dtype))
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        aux = {
            "z_loss": jnp.mean(per_layer["z_loss"]),
            "lb_loss": jnp.mean(per_layer["lb_loss"]),
            "dropped": jnp.mean(per_layer["dropped"]),
            "expert_token_share": per_layer["token_share"],
            "expert_weight_share": per_layer["weight_share"],
            "expert_weight_per_token": per_layer["weight_per_token"],
        }
        if collect_stats:
            aux.update(x_sum=per_layer["x_sum"], xtx=per_layer["xtx"],
                       n_tokens=jnp.asarray(tokens_bt.size, jnp.float32))
        return logits, aux


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]


def lm_loss(model: Decoder, batch_bt1: jax.Array) -> tuple[jax.Array, dict]:
    """Training objective on a packed batch (B, T+1): mean next-token NLL over non-pad targets
    plus the configured z-loss and load-balancing terms. Returns (loss, metrics)."""
    cfg = model.cfg
    inputs, targets = batch_bt1[:, :-1], batch_bt1[:, 1:]
    logits, aux = model(inputs)
    keep = targets != cfg.pad_id
    nll = (jnp.sum(jnp.where(keep, token_nll(logits, targets), 0.0))  # a masked nan stays out
           / jnp.maximum(jnp.sum(keep.astype(jnp.float32)), 1.0))
    loss = nll + cfg.z_loss_weight * aux["z_loss"] + cfg.lb_loss_weight * aux["lb_loss"]
    return loss, dict(nll=nll, z_loss=aux["z_loss"], lb_loss=aux["lb_loss"],
                      dropped=aux["dropped"])
