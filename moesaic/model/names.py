"""The names of the model's tensors, as every package that reads them by name spells them.

A model's parameters are a flat dict {name: array}; the names are the attribute paths of
`moesaic.model.transformer.Decoder` (`checkpoint.flatten`). Every tensor under "blocks/" is
stacked over the layers (axis 0); the FFN's are also stacked over the experts (axis 1):

    embed (V, D)   final_norm (D,)   lm_head (D, V)
    blocks/attn/{q,k,v} (L, D, H, hd)   blocks/attn/o (L, H, hd, D)
    blocks/attn/{q,k}_norm (L, H, hd)   blocks/attn_norm, blocks/ffn_norm (L, D)
    blocks/ffn/w_gate, w_up (L, E, D, F)   blocks/ffn/w_down (L, E, F, D)
    blocks/ffn/router (L, E, D)   blocks/ffn/bias (L, E)   (MoE only; bias with router_bias)

A merged model with a party gate (`moesaic.model.gate`) also has gate_bigram (buckets, P),
gate_context (V, P) and gate_bias (P,). Beside the parameters, checkpoints of the flow hold
router statistics (`stat_name`), each party's token-bigram counts (`ngram_name`) and, in a
merged model, each party's learned router row and bias (`rows_name`).
"""

from __future__ import annotations

EMBED, FINAL_NORM, LM_HEAD = "embed", "final_norm", "lm_head"
ATTN_Q, ATTN_K, ATTN_V, ATTN_O = ("blocks/attn/q", "blocks/attn/k", "blocks/attn/v",
                                  "blocks/attn/o")
ATTN_Q_NORM, ATTN_K_NORM = "blocks/attn/q_norm", "blocks/attn/k_norm"
ATTN_NORM, FFN_NORM = "blocks/attn_norm", "blocks/ffn_norm"

W_GATE, W_UP, W_DOWN = "blocks/ffn/w_gate", "blocks/ffn/w_up", "blocks/ffn/w_down"
ROUTER, BIAS = "blocks/ffn/router", "blocks/ffn/bias"
FFN_EXPERT = (W_GATE, W_UP, W_DOWN)  # one expert's FFN
EXPERT_TENSORS = (*FFN_EXPERT, ROUTER, BIAS)  # everything with an expert axis
EXPERT_AXIS = 1  # (layers, expert, ...)
# What the model reads only as model.dtype (each cast to it before any use): held in that
# dtype, such a tensor gives the same results bit for bit. Norms, router rows and biases are
# read in float32 (moesaic.branch_train.precision).
COMPUTE_READ = (EMBED, LM_HEAD, ATTN_Q, ATTN_K, ATTN_V, ATTN_O, *FFN_EXPERT)

STATS = "stats/"  # router statistics: stats/<stat>, stats/<source>/<stat> in a merge (`stat_name`)
STAT_NAMES = ("x_sum", "xtx", "mean_hidden")
NGRAM = "ngram/"  # token-bigram counts of a party's data: ngram/<stat>, ngram/<source>/<stat>
NGRAM_NAMES = ("bigram", "context")  # (buckets,) pair counts, (V,) counts of each first token
GATE_BIGRAM, GATE_CONTEXT, GATE_BIAS = "gate_bigram", "gate_context", "gate_bias"  # party gate
ROWS = "rows/"  # a merged model's learned rows: rows/<source>/{router,bias} (`rows_name`)
LAYER_STACKED = ("blocks/", STATS, ROWS)  # tensors whose axis 0 is the layer


def stat_name(stat: str, source: str | None = None) -> str:
    """"stats/x_sum", or "stats/code/x_sum" for a source's statistics kept in a merge."""
    return f"{STATS}{stat}" if source is None else f"{STATS}{source}/{stat}"


def ngram_name(stat: str, source: str | None = None) -> str:
    """"ngram/bigram", or "ngram/code/bigram" for a source's counts kept in a merge."""
    return f"{NGRAM}{stat}" if source is None else f"{NGRAM}{source}/{stat}"


def rows_name(source: str, tensor: str) -> str:
    """"rows/code/router" for ROUTER (or BIAS) of `source` as a merged model keeps it."""
    return f"{ROWS}{source}/{tensor.rsplit('/', 1)[1]}"
