"""What a finished training job writes, one writer per job kind (`kinds.JobKind.write`).

    pretrain  WORKDIR/public    the public model, a model checkpoint of kind "public"
    branch    WORKDIR/artifact  a branch artifact (`moesaic.branch_train.artifact`): the
                                owner's expert, router row and bias, its data's statistics
    dense     WORKDIR/artifact  a whole model of kind "dense_branch", with its data's router
                                statistics under the base when it has them (for BTX)
    ffn       WORKDIR/model     the dense model whose FFN trained in place, and
              WORKDIR/artifact  a branch artifact whose expert is that FFN

Each writer reads a `Trained`: the job's parameters at its last step and what it fixed at the
start (its statistics, its base's meta, an ffn job's `FfnHandover`). The parameters are written
as the job holds them, sharded: each process writes its own shards and no tensor is gathered
whole onto a host (`checkpoint.save`), so a job larger than one host's memory finishes.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections

from moesaic.branch_train import artifact, upcycle
from moesaic.model import checkpoint
from moesaic.model.names import EXPERT_TENSORS, FFN_EXPERT, W_GATE
from moesaic.routing import stats as router_stats


@dataclasses.dataclass(frozen=True)
class FfnHandover:
    """What an `ffn` job hands to the merge beside its FFNs, fixed at the start: the router row
    and bias a coordinated branch would have started from (config.branch.router_init; they
    never train here), and the hashes of the base FFN it trained in place, which the merged
    model keeps as its public expert."""
    router: dict[str, jax.Array]  # the owner's row (L, 1, D) and bias (L, 1) slices
    public_hashes: dict[str, str]


def ffn_handover(layout: upcycle.ParamLayout, own_row, own_bias,
                 base_flat: dict[str, jax.Array]) -> FfnHandover:
    """The handover of an ffn job that starts from `base_flat` with this router row and bias."""
    return FfnHandover(
        router=upcycle.own_router_slices(own_row, own_bias, layout.dtypes[W_GATE]),
        public_hashes={n: checkpoint.tensor_hash(base_flat[n]) for n in FFN_EXPERT})


@dataclasses.dataclass(frozen=True)
class Trained:
    """A finished job, as its writer reads it."""
    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    mixture: str  # what the job read (`kinds.job_mixture`), not config.branch.public_mix
    layout: upcycle.ParamLayout
    trainable: dict
    frozen: dict
    stats: router_stats.RouterStats | None
    meta: dict  # the job's checkpoint meta at its last step
    base_meta: dict | None
    handover: FfnHandover | None = None
    # hashes of frozen tensors as the base stores them, for those held otherwise (quantized)
    stored_hashes: dict[str, str] = dataclasses.field(default_factory=dict)

    def common_meta(self) -> dict:
        # the mixture the job read, not config.branch.public_mix: only a coordinated branch
        # replays public data, so a dense or ffn job's config may name a share it never used
        return {"config": self.meta["config"], "tokens_seen": self.meta["tokens_seen"],
                "steps": self.meta["step"], "mixture": self.mixture}

    def dense_meta(self) -> dict:
        return {**self.common_meta(), "kind": artifact.DENSE_KIND,
                "source": str(self.config.branch.source), "model": self.layout.cfg.to_dict(),
                "base_fingerprint": self.base_meta["fingerprint"]}

    def full(self) -> dict:
        """The full parameters, sharded as the job holds them (`checkpoint.save` writes each
        process's shards and hashes a slab at a time)."""
        return self.layout.assemble(self.trainable, self.frozen)


def write_public(t: Trained) -> pathlib.Path:
    path = t.workdir / "public"
    checkpoint.save(path, t.full(), {**t.common_meta(), "kind": "public",
                                     "model": t.layout.cfg.to_dict()}, overwrite=True)
    return path


def write_dense(t: Trained) -> pathlib.Path:
    """With its data's router statistics under the base, for BTX."""
    path = t.workdir / "artifact"
    stats = t.stats
    extra = {} if stats is None else {"stats_tokens": stats.n_tokens,
                                      "stats_documents": stats.n_documents}
    checkpoint.save(path, {**t.full(), **(stats.tensors() if stats else {})},
                    {**t.dense_meta(), **extra}, overwrite=True)
    return path


def write_ffn(t: Trained) -> pathlib.Path:
    """The dense model it trained, then the trained FFN as the expert beside the base's (kept
    whole)."""
    checkpoint.save(t.workdir / "model", t.full(), t.dense_meta(), overwrite=True)
    own = {n: t.trainable[n] for n in FFN_EXPERT}
    own.update(t.handover.router)
    model = upcycle.branch_config(t.layout.cfg, int(t.config.branch.train_top_k))
    return _write_artifact(t, own, t.handover.public_hashes, model, t.layout.cfg.n_experts)


def write_branch(t: Trained) -> pathlib.Path:
    own = {n: t.trainable[n] for n in EXPERT_TENSORS}
    return _write_artifact(t, own, {}, t.layout.cfg, t.layout.base_experts)


def _write_artifact(t: Trained, own: dict, public_hashes: dict, model, base_experts: int,
                    extra_meta: dict | None = None) -> pathlib.Path:
    path = t.workdir / "artifact"
    base_names = set(t.base_meta["tensors"])
    frozen_hashes = {n: t.stored_hashes.get(n) or checkpoint.tensor_hash(a)
                     for n, a in t.frozen.items() if n in base_names}
    frozen_hashes.update(public_hashes)
    artifact.save(path, own, t.stats.tensors(), {
        **t.common_meta(), "source": str(t.config.branch.source),
        "base_fingerprint": t.base_meta["fingerprint"], "frozen_hashes": frozen_hashes,
        "base_experts": base_experts, "model": model.to_dict(),
        "stats_tokens": t.stats.n_tokens, "stats_documents": t.stats.n_documents,
        **(extra_meta or {})},
        overwrite=True)
    return path
