"""The pieces every config shares: the sections, their defaults and the sharding rules.

A config file picks the shapes and calls `build(...)`. Sections:
  model   the transformer (moesaic.model.config.ModelConfig reads it)
  mesh    device mesh sizes; -1 fills the remaining devices
  rules   logical axis -> mesh axes (None = replicated)
  data    where the prepared sources live and how batches are cut
  train   optimizer, schedule, steps, checkpoints, microbatches (gradient accumulation),
          precision (master and frozen dtypes: moesaic.branch_train.precision), profiling
          and MFU (moesaic.branch_train.profiling)
  branch  the branch job: which source, how the own router row starts, what is frozen
"""

from __future__ import annotations

import ml_collections

# Logical axes named in model code, mapped onto the mesh ('data', 'fsdp', 'expert', 'tensor').
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
)

# What a coordinated branch job never trains: regexes over parameter paths ("blocks/attn/q").
# The base experts and base router rows are frozen by index, see moesaic.branch_train.
DEFAULT_FROZEN = (
    r"^embed$",
    r"^lm_head$",
    r"^final_norm$",
    r"^blocks/attn/",
    r"^blocks/attn_norm$",
    r"^blocks/ffn_norm$",
)


# What a low-rank branch adapts by default: every projection of the block.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`"source=code,preset=smoke"` -> ConfigDict, typed by the defaults."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected one of {sorted(defaults)}=value")
        default = defaults[key]
        out[key] = type(default)(value) if default is not None else value
    return out


def build(*, model: dict, seq_len: int, global_batch: int, steps: int, lr: float,
          source: str = "", data_dir: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=264, eos_id=256, pad_id=257, tokenizer="bytes",
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=0, d_ff=512,
        n_experts=1, top_k=1, norm_topk_prob=False, router_bias=True, router_input="token",
        rope_theta=10_000.0, norm_eps=1e-6, init_std=0.02,
        dispatch="dropless", capacity_factor=1.25,
        z_loss_weight=1e-5, lb_loss_weight=0.0,
        dtype="float32", param_dtype="float32", remat="none", scan_layers=True,
    ))
    c.model.update(model)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    c.rules = DEFAULT_RULES
    c.data = ml_collections.ConfigDict(dict(
        dir=data_dir, mixture="public", seq_len=seq_len, global_batch=global_batch,
        eval_batches=8,
        prefetch=2,  # threads reading batches ahead of the step, 0: in the loop (docs/data.md)
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=steps, lr=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1,
        b1=0.9, b2=0.95, weight_decay=0.0, clip=1.0,
        log_every=10, ckpt_every=max(1, steps // 4), keep=2,
        microbatches=1,  # the batch split into this many, one update (docs/training.md)
        # trainable parameters and optimizer state in master_dtype; frozen matmul weights in
        # model.dtype ("compute") or as stored ("stored"); model.dtype computes (docs/scale.md)
        master_dtype="float32", frozen_dtype="compute",
        profile_steps="",  # "FIRST,LAST": a jax.profiler trace of those steps in WORKDIR/profile
        peak_tflops=0.0,  # one device's peak for the logged MFU; 0: by its device kind
    ))
    c.branch = ml_collections.ConfigDict(dict(
        source=source, mode="coordinated", router_init="contrast", router_margin=2.0,
        public_source="public", public_mix=0.0, router_noise=0.02,
        router_vector="", negative_bias=True, train_top_k=0, frozen=DEFAULT_FROZEN,
        stats_batches=8,
        # mode=lora: the low-rank expert (moesaic.branch_train.lora, docs/low-rank.md)
        lora=ml_collections.ConfigDict(dict(rank=8, alpha=0.0, targets=LORA_TARGETS,
                                           quantize="none")),  # none, int8, nf4 (QLoRA)
        # private training, DP-SGD (moesaic.branch_train.dp): clip_norm 0 is off
        dp=ml_collections.ConfigDict(dict(clip_norm=0.0, noise_multiplier=0.0, delta=1e-5)),
    ))
    return c


def olmo2(arg: str | None, *, d_model: int, n_layers: int, n_heads: int, d_ff: int,
          microbatches: int = 1) -> ml_collections.ConfigDict:
    """An OLMo-2 shape (dolma2 tokenizer, RoPE theta 5e5, bf16 compute over float32 master
    parameters, full remat, fsdp 8), its batch of 512 in `microbatches` accumulated steps.
    Arguments: `source=S,experts=n` (the branch of n experts over this base by default 2)."""
    args = parse_arg(arg, source="", experts=2)
    config = build(
        model=dict(vocab_size=100352, eos_id=100257, pad_id=100277, tokenizer="tokenizer.json",
                   d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                   d_ff=d_ff, rope_theta=500_000.0, n_experts=args.experts,
                   top_k=args.experts, dtype="bfloat16", remat="full"),
        seq_len=4096, global_batch=512, steps=10_000, lr=9e-4, source=args.source,
    )
    config.mesh.update(data=-1, fsdp=8)
    config.train.microbatches = microbatches
    return config
