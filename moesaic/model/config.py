"""The model's hyperparameters, checked once when a config becomes a `ModelConfig`."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import ml_collections

DISPATCHES = ("dropless", "dropless_ragged", "dropless_blocked", "dropless_gather", "capacity",
              "all_to_all")
REMATS = ("none", "full", "dots")
ROUTER_INPUTS = ("token", "prefix_mean")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 264
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 512
    n_experts: int = 1
    # stacked expert slots beyond n_experts that no token is ever routed to, so that the
    # stacked experts divide an expert axis (model/expert_parallel.py); 0 in every checkpoint
    expert_padding: int = 0
    top_k: int = 1
    norm_topk_prob: bool = False
    router_bias: bool = True
    router_trainable: bool = True  # False: router rows are RouterState, never optimized
    router_input: str = "token"  # what the router scores: see moesaic.model.moe.router_inputs
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    z_loss_weight: float = 1e-5
    lb_loss_weight: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True  # False: a Python loop over the layers (faster on CPU, see Decoder)
    eos_id: int = 256
    pad_id: int = 257
    tokenizer: str = "bytes"
    # low-rank experts (moesaic.model.lora): the last lora_experts of n_experts adapt the
    # public model's lora_targets by rank-lora_rank updates scaled by lora_alpha / lora_rank
    lora_experts: int = 0
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: the rank (scale 1)
    lora_targets: tuple[str, ...] = ()
    # fine-grained experts (moesaic.merge.fine_grained): every expert is stored as expert_split
    # sub-experts of width d_ff, in consecutive slots; their top-k router weights are multiplied
    # by expert_split, so m sub-experts sharing one row weigh what their unsplit expert did
    expert_split: int = 1
    # the party gate (moesaic.model.gate): the last gate_parties experts are parties whose
    # router weight a bigram posterior of the prefix splits, over gate_buckets pair buckets
    gate_parties: int = 0
    gate_buckets: int = 0

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives a list
        def bad(field, why):
            raise ValueError(f"model.{field}={getattr(self, field)!r}: {why}")

        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                      "n_experts", "top_k"):
            if getattr(self, field) < 1:
                bad(field, "must be at least 1")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            bad("d_model", f"not divisible by n_heads={self.n_heads}; set model.head_dim")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.top_k > self.n_experts:
            bad("top_k", f"exceeds n_experts={self.n_experts}")
        if self.dispatch not in DISPATCHES:
            bad("dispatch", f"unknown dispatch; one of {DISPATCHES}")
        if self.router_input not in ROUTER_INPUTS:
            bad("router_input", f"unknown router input; one of {ROUTER_INPUTS}")
        if self.remat not in REMATS:
            bad("remat", f"unknown remat policy; one of {REMATS}")
        if self.expert_split < 1 or self.n_experts % self.expert_split:
            bad("expert_split", f"must be at least 1 and divide n_experts={self.n_experts}")
        if self.gate_parties:
            if not 1 <= self.gate_parties < self.n_experts:
                bad("gate_parties", f"must leave at least one base expert of "
                                    f"n_experts={self.n_experts}")
            if self.gate_buckets < 1 or self.expert_split > 1:
                bad("gate_parties", "needs gate_buckets >= 1 and no fine-grained split")
        if self.expert_split > 1 and self.lora_experts:
            bad("expert_split", "fine-grained experts do not hold low-rank experts")
        if self.expert_padding < 0:
            bad("expert_padding", "must be 0 or positive")
        if self.head_dim < 0:
            bad("head_dim", "must be 0 (d_model // n_heads) or positive")
        if self.head_size % 2:
            bad("head_dim", f"the head size {self.head_size} must be even (RoPE rotates pairs)")
        for field in ("rope_theta", "capacity_factor"):
            if not math.isfinite(getattr(self, field)) or getattr(self, field) <= 0:
                bad(field, "must be a finite positive number")
        if not math.isfinite(self.norm_eps) or self.norm_eps < 0:
            bad("norm_eps", "must be a finite number >= 0")
        for field in ("dtype", "param_dtype"):
            try:
                floating = jnp.issubdtype(jnp.dtype(getattr(self, field)), jnp.floating)
            except TypeError:
                bad(field, "not a dtype name")
            if not floating:
                bad(field, "must be a floating dtype (float32, bfloat16, ...)")
        from moesaic.model import lora  # lora imports this module
        lora.check(self)
        if self.pad_id == self.eos_id != -1:
            bad("pad_id", "equals eos_id: every end-of-document target would be masked out of "
                          "the loss; use -1 (moesaic packs documents and never pads)")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | dict) -> ModelConfig:
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as JSON holds them (lora_targets a list), so a dict read back from a
        checkpoint's meta compares equal."""
        return {**dataclasses.asdict(self), "lora_targets": list(self.lora_targets)}

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def stacked_experts(self) -> int:
        """The expert slots stacked in the FFN's tensors: n_experts plus the padding."""
        return self.n_experts + self.expert_padding

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)
