"""The kinds of training job, as a table: what each trains, what it reads, what it needs from
a base and what it writes. The trainer reads a job's record; it does not branch on the kind.

    kind      trains (layout)                      data                  starts from
    pretrain  every parameter of config.model      config.data.mixture   a fresh model
    branch    the owner's expert, row and bias     the source (+ replay) the base, upcycled
    dense     every parameter of the base          the source            the base
    ffn       the base's one FFN, in place         the source            the base
    lora      the owner's low-rank expert, row     the source (+ replay) the base, plus a
              and bias (`moesaic.branch_train.lora`)                     fresh low-rank expert

`moesaic branch` picks branch, dense or ffn by config.branch.mode (`BRANCH_MODES`). A
branch and an ffn job set the owner's router row (config.branch.router_init) and need their
data's router statistics under the base; a dense job keeps them when it has one source. The
outputs are in `moesaic.branch_train.outputs`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import ml_collections

from moesaic.branch_train import lora, outputs, upcycle
from moesaic.model.config import ModelConfig

# The config keys a resume must not change, by job kind: what decides the batches (data
# order) and the optimizer's path. train.steps is among them: the learning rate decays by a
# cosine over train.steps (and warmup is capped by it), so a run extended or shortened in
# place would not follow the schedule it claims.
_COMMON_KEYS = ("seed", "data.seq_len", "data.global_batch", "train.steps", "train.lr",
                "train.warmup_steps", "train.min_lr_ratio", "train.b1", "train.b2",
                "train.weight_decay", "train.clip")
# What decides a branch artifact's frozen set, initial router row and statistics.
_HANDOVER_KEYS = ("branch.source", "branch.public_source", "branch.frozen", "branch.router_init",
                  "branch.router_margin", "branch.router_noise", "branch.router_vector",
                  "branch.negative_bias", "branch.stats_batches")

Layout = Callable[[ml_collections.ConfigDict, ModelConfig | None], upcycle.ParamLayout]


@dataclasses.dataclass(frozen=True)
class JobKind:
    """One kind of job.

    layout      what it trains: (config, the base's model config or None) -> ParamLayout
    data        "mixture" (config.data.mixture), "source" (config.branch.source) or
                "source+replay" (the source with config.branch.public_mix of public data)
    from_base   starts from --base and reads the party's config.branch.source
    start       "init" (a fresh model), "upcycle" (the base plus the owner's expert) or
                "base" (the base as it is)
    router_row  sets the owner's router row by config.branch.router_init
    stats       its data's router statistics under the base: "required", "one source" (when
                its data is one source and config.branch.stats_batches > 0) or "none"
    hands_over  fixes at the start what it hands to the merge beside its FFN (FfnHandover)
    write       its outputs (`moesaic.branch_train.outputs`)
    resume_keys the config keys a resume must not change
    """
    name: str
    layout: Layout
    data: str
    from_base: bool
    start: str
    router_row: bool
    stats: str
    hands_over: bool
    write: Callable[[outputs.Trained], pathlib.Path]
    resume_keys: tuple[str, ...]


def _pretrain_layout(config, base_cfg):
    return upcycle.make_layout(ModelConfig.from_config(config.model))


def _branch_layout(config, base_cfg):
    model_cfg = upcycle.branch_config(base_cfg, int(config.branch.train_top_k))
    return upcycle.make_layout(model_cfg, frozen_patterns=tuple(config.branch.frozen),
                               base_experts=base_cfg.n_experts,
                               bias_at_zero=not config.branch.negative_bias)


def _dense_layout(config, base_cfg):
    return upcycle.make_layout(base_cfg)


def _ffn_layout(config, base_cfg):
    return upcycle.ffn_layout(base_cfg, tuple(config.branch.frozen))


KINDS = {k.name: k for k in (
    JobKind("pretrain", _pretrain_layout, data="mixture", from_base=False, start="init",
            router_row=False, stats="none", hands_over=False, write=outputs.write_public,
            resume_keys=(*_COMMON_KEYS, "data.mixture")),
    JobKind("branch", _branch_layout, data="source+replay", from_base=True, start="upcycle",
            router_row=True, stats="required", hands_over=False, write=outputs.write_branch,
            resume_keys=(*_COMMON_KEYS, *_HANDOVER_KEYS, "branch.public_mix", "branch.dp")),
    JobKind("dense", _dense_layout, data="source", from_base=True, start="base",
            router_row=False, stats="one source", hands_over=False, write=outputs.write_dense,
            resume_keys=(*_COMMON_KEYS, "branch.source", "branch.stats_batches", "branch.dp")),
    JobKind("ffn", _ffn_layout, data="source", from_base=True, start="base",
            router_row=True, stats="required", hands_over=True, write=outputs.write_ffn,
            resume_keys=(*_COMMON_KEYS, *_HANDOVER_KEYS, "branch.dp")),  # no replay
    JobKind("lora", lora.lora_layout, data="source+replay", from_base=True, start="low_rank",
            router_row=True, stats="required", hands_over=False, write=lora.write_lora,
            resume_keys=(*_COMMON_KEYS, *_HANDOVER_KEYS, "branch.public_mix", "branch.lora",
                         "branch.dp")),
)}
BRANCH_MODES = {"coordinated": "branch", "dense": "dense", "ffn": "ffn",
                "lora": "lora"}  # branch.mode -> kind


def kind_of(name: str) -> JobKind:
    if name not in KINDS:
        raise ValueError(f"job kind {name!r}: one of {tuple(KINDS)}")
    return KINDS[name]


def job_mixture(config: ml_collections.ConfigDict, kind: str) -> str:
    """What a job trains on: pretraining the configured mixture; a branch its party's source,
    with config.branch.public_mix of public data replayed beside it (public data is every
    party's to use; replay keeps the owner's expert from forgetting general text, which is
    what a misrouted token meets after the merge); a dense branch its source."""
    data = kind_of(kind).data
    if data == "mixture":
        return str(config.data.mixture)
    source = str(config.branch.source)
    replay = float(config.branch.get("public_mix", 0.0))
    if data != "source+replay" or replay == 0:
        return source
    if not 0 < replay < 1:
        raise ValueError(f"config.branch.public_mix={replay}: must be in [0, 1)")
    return f"{source}:{1 - replay},{config.branch.public_source}:{replay}"
