"""The explicit mapping between a Hugging Face config.json (Olmo2 / FlexOlmo) and `ModelConfig`.

Every config.json key is in exactly one of three tables: MAPPED (becomes a ModelConfig field),
REQUIRED (must hold one value moesaic can represent, else refused by name) or IGNORED (no
effect on the logits; the reason is given). A key in none of them is refused unless its value
is null or false (an option switched off). Export writes the reverse mapping.
"""

from __future__ import annotations

from typing import Any

from moesaic.model.config import ModelConfig

MODEL_TYPES = {"olmo2": "Olmo2ForCausalLM", "flex_olmo": "FlexOlmoForCausalLM"}

# config.json key -> ModelConfig field
MAPPED = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "intermediate_size": "d_ff",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "norm_eps",
    "initializer_range": "init_std",
    "num_experts": "n_experts",
    "num_local_experts": "n_experts",
    "num_experts_per_tok": "top_k",
    "norm_topk_prob": "norm_topk_prob",
    "eos_token_id": "eos_id",
    "pad_token_id": "pad_id",
    # rope_theta / rope_parameters are read by `_rope_theta`
}

# config.json key -> the only value(s) moesaic computes the same way
REQUIRED: dict[str, tuple] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "tie_word_embeddings": (False,),
    "rope_scaling": (None,),
    "sliding_window": (None,),
    "use_sliding_window": (False, None),
    "clip_qkv": (None,),
    "mlp_bias": (False, None),
    "is_encoder_decoder": (False,),
}

# keys that change the logits and that moesaic will not guess when config.json lacks them
# (transformers fills them from class defaults that differ between versions and classes)
NEEDED = {
    "olmo2": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "rms_norm_eps"),
    "flex_olmo": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "rms_norm_eps", "num_experts", "num_experts_per_tok",
                  "norm_topk_prob"),
}

IGNORED = {
    "architectures": "checked through model_type",
    "model_type": "checked: olmo2 or flex_olmo",
    "rope_theta": "read as the RoPE base",
    "rope_parameters": "read as the RoPE base; only rope_type 'default' is accepted",
    "bos_token_id": "moesaic prepends no BOS; kept in meta['hf'] and written back on export",
    "max_position_embeddings": "RoPE 'default' has no length limit in moesaic",
    "attention_dropout": "training-only (moesaic has no dropout); logits unchanged",
    "router_aux_loss_coef": "training option; moesaic's is model.lb_loss_weight",
    "output_router_logits": "Hugging Face output option",
    "use_cache": "Hugging Face generation option",
    "dtype": "parameter dtype comes from the tensors (or --param-dtype)",
    "torch_dtype": "parameter dtype comes from the tensors (or --param-dtype)",
    "transformers_version": "bookkeeping",
    "_name_or_path": "bookkeeping",
    "layer_types": "accepted when every layer is 'full_attention'",
    "return_dict": "Hugging Face output option",
    "output_hidden_states": "Hugging Face output option",
    "output_attentions": "Hugging Face output option",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
    "chunk_size_feed_forward": "chunking computes the same values",
    "is_encoder_decoder": "accepted when false (REQUIRED would name it otherwise)",
}


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters")
    if params:
        extra = sorted(set(params) - {"rope_type", "rope_theta"})
        if params.get("rope_type", "default") != "default" or extra:
            raise ValueError(f"config.json rope_parameters={params!r}: only rope_type 'default' "
                             "(plain RoPE with rope_theta) is supported; moesaic has no RoPE "
                             "scaling")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    raise ValueError("config.json has neither rope_theta nor rope_parameters.rope_theta")


def _single_id(hf: dict, key: str, default: int) -> int:
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"config.json {key}={value!r}: moesaic has one {key}; keep one id")
        value = value[0]
    return int(value)


def model_fields_from_hf(hf: dict) -> dict[str, Any]:
    """ModelConfig fields for a config.json dict; raises ValueError naming the first key that
    moesaic cannot represent."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json model_type={model_type!r}: only {sorted(MODEL_TYPES)} "
                         "(Olmo2ForCausalLM, FlexOlmoForCausalLM) can be imported")
    for key, allowed in REQUIRED.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported: moesaic "
                             f"computes the model as if {key}={allowed[0]!r}")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"config.json layer_types={sorted(set(layer_types))!r}: moesaic has "
                         "full causal attention in every layer")
    missing = [key for key in NEEDED[model_type] if hf.get(key) is None]
    if missing:
        raise ValueError(f"config.json has no value for {missing}: they change the model, "
                         "so the importer does not guess them; add them")
    for key, value in hf.items():
        switched_off = value is None or value is False
        if key not in MAPPED and key not in REQUIRED and key not in IGNORED and not switched_off:
            raise ValueError(f"config.json {key}={value!r} is not understood by the importer; "
                             "it may change the model, so it is refused (remove it only if you "
                             "know it does not)")
    fields: dict[str, Any] = {}
    for key, field in MAPPED.items():
        if key in hf and hf[key] is not None and field not in ("eos_id", "pad_id"):
            fields[field] = hf[key]
    fields.setdefault("n_kv_heads", fields["n_heads"])
    fields["rope_theta"] = _rope_theta(hf)
    fields["eos_id"] = _single_id(hf, "eos_token_id", -1)
    fields["pad_id"] = _single_id(hf, "pad_token_id", -1)  # -1: no padding id, nothing masked
    if fields["pad_id"] == fields["eos_id"]:  # pad = eos would mask every document end
        fields["pad_id"] = -1  # moesaic packs documents and never pads
    if model_type == "olmo2":
        for key in ("num_experts", "num_local_experts", "num_experts_per_tok"):
            fields.pop(MAPPED[key], None)
        fields.update(n_experts=1, top_k=1)
    else:
        fields["router_bias"] = False  # FlexOlmoForCausalLM has no router bias
    if fields.get("head_dim") == fields["d_model"] // fields["n_heads"]:
        fields["head_dim"] = 0  # moesaic's "derived" value; same shapes
    return fields


def hf_config_from_model(cfg: ModelConfig, *, dtype: str, bos_token_id: int | None = None,
                         max_position_embeddings: int = 4096) -> dict[str, Any]:
    """config.json of a FlexOlmoForCausalLM computing what `cfg` computes (router bias aside:
    the caller decides about it)."""
    def token_id(value: int) -> int | None:
        return value if 0 <= value < cfg.vocab_size else None

    hf = {
        "architectures": ["FlexOlmoForCausalLM"],
        "model_type": "flex_olmo",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # what transformers 4.x reads
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.norm_topk_prob,
        "initializer_range": cfg.init_std,
        "eos_token_id": token_id(cfg.eos_id),
        "pad_token_id": token_id(cfg.pad_id),
        "bos_token_id": bos_token_id,
        "dtype": dtype,
        "use_cache": True,
    }
    return hf
