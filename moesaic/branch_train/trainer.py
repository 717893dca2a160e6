"""The trainer of every job: public pretraining, a coordinated branch, a dense branch.

    result = train(config, Job(kind="branch", workdir=..., data_dir=..., base=...))

It reads top to bottom in fixed phases: mesh -> data -> abstract init -> shardings -> step
-> restore -> loop -> outputs. The parameters live in two flat pytrees (see `upcycle`):
`trainable`, the only thing the optimizer sees, and `frozen`, base tensors the step reads
but never differentiates. The step assembles the full parameters, runs the model
functionally and updates the trainable tree; `frozen` is an input, never an output, so it
cannot change.

Restore precedence: this workdir's latest checkpoint (resume); else the base (a branch);
else a fresh initialisation (pretraining). Batches are a pure function of (seed, step),
so a resumed run recomputes exactly the batches an uninterrupted one would have seen, as
long as the settings that decide them and the optimizer's path are those the checkpoint
was trained with (`RESUME_KEYS`, and the data's content hashes): a resume that changes any
of them is refused, naming each, since its output would claim data it partly never saw.
Outputs: pretraining writes WORKDIR/public (a model checkpoint, kind "public"); a
coordinated branch WORKDIR/artifact (`moesaic.branch_train.artifact`); a dense branch
WORKDIR/artifact as a whole model checkpoint (kind "dense_branch"); an ffn job (a dense base
whose FFN alone trains, in place) both: WORKDIR/artifact, a branch artifact whose expert is
that FFN, and WORKDIR/model, the dense model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moesaic.branch_train import artifact, base_model, upcycle
from moesaic.branch_train.checkpointing import JobCheckpoints, StopSignal, abstract_like, nested
from moesaic.branch_train.optimizer import make_optimizer, schedule
from moesaic.branch_train.progress import MetricsLog, parameter_overview
from moesaic.data.loader import TokenBatches, load_manifest, parse_mixture
from moesaic.data.tokenizer import check_tokenizer
from moesaic.model import checkpoint
from moesaic.model.config import ModelConfig
from moesaic.model.sharding import activate, logical_to_spec, make_mesh
from moesaic.model.transformer import Decoder, lm_loss
from moesaic.routing import stats as router_stats

KINDS = ("pretrain", "branch", "dense", "ffn")

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
# Keys added after checkpoints recorded their config, with the value every earlier run had.
_BEFORE_RECORDED = {"branch.negative_bias": True}
RESUME_KEYS = {
    "pretrain": (*_COMMON_KEYS, "data.mixture"),
    "dense": (*_COMMON_KEYS, "branch.source", "branch.stats_batches"),
    "branch": (*_COMMON_KEYS, *_HANDOVER_KEYS, "branch.public_mix"),
    "ffn": (*_COMMON_KEYS, *_HANDOVER_KEYS),  # no replay
}


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str  # "pretrain" | "branch" (coordinated) | "dense" (continued pretraining) | "ffn"
    workdir: pathlib.Path
    data_dir: pathlib.Path
    base: pathlib.Path | None = None
    show_progress: bool = True
    write_output: bool = True


@dataclasses.dataclass
class Result:
    step: int  # the step the job reached
    losses: dict[int, float]  # loss after each logged step of this run
    stopped: bool  # ended early by SIGTERM (saved)
    output: pathlib.Path | None
    layout: upcycle.ParamLayout
    trainable: dict
    frozen: dict
    opt_state: object


@dataclasses.dataclass(frozen=True)
class FfnHandover:
    """What an `ffn` job hands to the merge beside its FFNs, fixed at the start: the router row
    and bias a coordinated branch would have started from (config.branch.router_init; they
    never train here), and the hashes of the base FFN it trained in place, which the merged
    model keeps as its public expert."""
    router: dict[str, jax.Array]  # the owner's row (L, 1, D) and bias (L, 1) slices
    public_hashes: dict[str, str]


def job_mixture(config: ml_collections.ConfigDict, kind: str) -> str:
    """What a job trains on: pretraining the configured mixture; a branch its party's source,
    with config.branch.public_mix of public data replayed beside it (public data is every
    party's to use; replay keeps the owner's expert from forgetting general text, which is
    what a misrouted token meets after the merge); a dense branch its source."""
    if kind == "pretrain":
        return str(config.data.mixture)
    source = str(config.branch.source)
    replay = float(config.branch.get("public_mix", 0.0))
    if kind != "branch" or replay == 0:
        return source
    if not 0 < replay < 1:
        raise ValueError(f"config.branch.public_mix={replay}: must be in [0, 1)")
    return f"{source}:{1 - replay},{config.branch.public_source}:{replay}"


class _Missing:
    def __repr__(self) -> str:
        return "not recorded"


_MISSING = _Missing()


def _config_value(config: dict, key: str) -> object:
    """config["a"]["b"] for "a.b", JSON-normalised (tuples as lists, as a checkpoint holds
    them); `_MISSING` when absent."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return _MISSING
        config = config[part]
    return json.loads(json.dumps(config))


def resume_mismatches(saved: dict, config: ml_collections.ConfigDict, kind: str,
                      data_hashes: dict[str, str]) -> list[str]:
    """What differs between the checkpoint's recorded config / data and this job's, one
    "key: checkpoint X, config Y" per difference (`RESUME_KEYS`)."""
    recorded, current = saved.get("config") or {}, config.to_dict()
    diffs = []
    for key in RESUME_KEYS[kind]:
        was, now = _config_value(recorded, key), _config_value(current, key)
        if was is _MISSING and key in _BEFORE_RECORDED:
            was = _BEFORE_RECORDED[key]
        if was != now:
            note = (" (the learning rate decays over train.steps, so a run cannot be extended "
                    "or shortened in place)" if key == "train.steps" else "")
            diffs.append(f"{key}: checkpoint {was!r}, config {now!r}{note}")
    saved_data = saved.get("data") or {}  # which sources is decided by the keys above
    for name in sorted(set(saved_data) & set(data_hashes)):
        if saved_data[name] != data_hashes[name]:
            diffs.append(f"data source {name!r}: content hash {saved_data[name][:16]} at the "
                         f"checkpoint, {data_hashes[name][:16]} in this job's data folder")
    return diffs


def check_sizes(config: ml_collections.ConfigDict) -> None:
    """The counts a job divides or loops by, refused with the field's name before anything
    runs (a 0 would otherwise surface as a ZeroDivisionError deep in the loader)."""
    for key, low in (("data.seq_len", 1), ("data.global_batch", 1), ("train.steps", 1),
                     ("train.warmup_steps", 0)):
        value = _config_value(config.to_dict(), key)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"config.{key}={value!r}: must be a whole number >= {low}")


def check_finite(step: int, metrics: dict, last_checkpoint: int | None) -> None:
    """Stops a diverged run before its state is saved or handed on: a non-finite loss or
    gradient norm at `step` (the update of that step used that gradient)."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if np.isfinite(loss) and np.isfinite(grad_norm):
        return
    kept = (f"the last checkpoint (step {last_checkpoint}) holds the last finite state"
            if last_checkpoint else "no checkpoint was written")
    raise ValueError(f"step {step}: loss {loss}, gradient norm {grad_norm}: training diverged; "
                     f"nothing of this step was saved and no output written ({kept}). Use a "
                     "fresh --workdir with a lower train.lr or more train.warmup_steps")


def train(config: ml_collections.ConfigDict, job: Job) -> Result:
    if job.kind not in KINDS:
        raise ValueError(f"job kind {job.kind!r}: one of {KINDS}")
    check_sizes(config)
    if job.kind != "pretrain" and job.base is None:
        raise ValueError(f"a {job.kind} job needs --base (the public checkpoint)")
    workdir = pathlib.Path(job.workdir)
    seed, steps = int(config.seed), int(config.train.steps)

    # ---- mesh ------------------------------------------------------------------------
    mesh = make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    # ---- data ------------------------------------------------------------------------
    source = str(config.branch.source)
    if job.kind != "pretrain" and not source:
        raise ValueError("a branch job needs the party's source: config.branch.source "
                         "(e.g. --config moesaic/configs/tiny.py:source=code)")
    mixture = job_mixture(config, job.kind)
    seq_len, global_batch = int(config.data.seq_len), int(config.data.global_batch)
    batches = TokenBatches(job.data_dir, mixture, seq_len=seq_len, global_batch=global_batch,
                           seed=seed, process_index=jax.process_index(),
                           process_count=jax.process_count())
    data_hashes = {n: m["content_hash"] for n, m in batches.manifests.items()}
    manifests = list(batches.manifests.values())
    if job.kind in ("branch", "ffn") and config.branch.router_init == "contrast":
        # The public data the router row is set from: checked and recorded like the batches'.
        public_source = str(config.branch.public_source)
        manifests.append(load_manifest(job.data_dir, public_source))
        data_hashes.setdefault(public_source, manifests[-1]["content_hash"])
    if job.kind in ("branch", "ffn") and config.branch.router_init == "vector":
        vector = pathlib.Path(str(config.branch.router_vector))
        if vector.is_file():  # else the row setup says what is missing
            data_hashes["branch.router_vector"] = hashlib.sha256(vector.read_bytes()).hexdigest()
    batch_shape = (global_batch, seq_len + 1)
    batch_sharding = NamedSharding(
        mesh, logical_to_spec(("batch", "length"), rules, mesh, batch_shape))

    # ---- abstract init: the model this job runs and which of its parameters train -----
    base_meta = None
    if job.kind == "pretrain":
        model_cfg = ModelConfig.from_config(config.model)
        layout = upcycle.make_layout(model_cfg)
    else:
        base_meta = base_model.read_base(job.base, config)
        base_cfg = base_model.job_model_config(checkpoint.model_config(base_meta), config)
        if job.kind == "branch":
            model_cfg = upcycle.branch_config(base_cfg, int(config.branch.train_top_k))
            layout = upcycle.make_layout(model_cfg, frozen_patterns=tuple(config.branch.frozen),
                                         base_experts=base_cfg.n_experts,
                                         bias_at_zero=not config.branch.negative_bias)
        elif job.kind == "ffn":
            model_cfg = base_cfg
            layout = upcycle.ffn_layout(model_cfg, tuple(config.branch.frozen))
        else:
            model_cfg = base_cfg
            layout = upcycle.make_layout(model_cfg)
    for manifest in manifests:
        check_tokenizer(model_cfg, manifest)

    # ---- shardings -------------------------------------------------------------------
    abstract_trainable, abstract_frozen = layout.trainable_shapes(), layout.frozen_shapes()
    trainable_shardings = layout.shardings(abstract_trainable, mesh, rules)
    frozen_shardings = layout.shardings(abstract_frozen, mesh, rules)
    tx = make_optimizer(config.train)
    lr_at = schedule(config.train)
    abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, trainable_shardings,
                                          transform_non_params=lambda _: replicated)
    if jax.process_index() == 0:
        print(parameter_overview(layout, trainable_shardings, frozen_shardings), flush=True)

    # ---- step ------------------------------------------------------------------------
    step_fn = make_train_step(layout, tx, lr_at, mesh, rules, trainable_shardings,
                              opt_shardings, frozen_shardings, batch_sharding)

    # ---- restore: resume this workdir; else start from the base; else initialise -------
    stats, handover = None, None
    if job.kind == "pretrain":
        fresh = jax.jit(lambda: upcycle.split_full(layout, checkpoint.flatten(nnx.state(
            Decoder(model_cfg, rngs=nnx.Rngs(seed))))),
            out_shardings=(trainable_shardings, frozen_shardings))
        frozen = fresh()[1] if layout.frozen else {}  # e.g. rows that are not nnx.Param
        make_trainable = lambda: fresh()[0]  # noqa: E731
    else:
        base = base_model.load_base(job.base, base_meta, mesh, rules, base_cfg)
        # the party's router statistics under the base: a branch's router row is set from
        # them and the merge's routers read them; a dense branch of one source keeps them for
        # BTX routers (one trained on a mixture has no single domain to route to), unless
        # config.branch.stats_batches is 0
        n_stats = int(config.branch.stats_batches)
        if job.kind != "dense" and n_stats < 1:
            raise ValueError(f"config.branch.stats_batches={n_stats}: a {job.kind} job needs "
                             "its data's router statistics (its router row and the merge's "
                             "routers are set from them); at least 1")
        if job.kind != "dense" or (n_stats > 0
                                   and len(parse_mixture(str(config.branch.source))) == 1):
            stats = base_model.party_stats(base, config, job.data_dir, mesh, rules)
        if job.kind in ("branch", "ffn"):
            public = (base_model.party_stats(base, config, job.data_dir, mesh, rules,
                                             source=str(config.branch.public_source))
                      if config.branch.router_init == "contrast" else None)
            own_row, own_bias = base_model.own_router_row(config, base, stats, public)
            if not config.branch.negative_bias:
                own_bias = None  # held at 0 (the layout's projection keeps it there)
        if job.kind == "branch":
            trainable0, frozen = upcycle.upcycle(layout, base.flat, base.cfg, own_row,
                                                 own_bias)
        else:
            trainable0, frozen = upcycle.split_full(layout, base.flat)
        if job.kind == "ffn":  # what it hands to the merge beside the FFNs it trains
            handover = FfnHandover(
                router=upcycle.own_router_slices(own_row, own_bias,
                                                 layout.dtypes["blocks/ffn/w_gate"]),
                public_hashes={n: checkpoint.tensor_hash(_host(base.flat[n]))
                               for n in upcycle.FFN_TENSORS})
        frozen = jax.device_put(frozen, frozen_shardings)
        # Own copies: the step donates the trainable buffers, and an own expert sliced from a
        # dense base can share its buffer with the frozen public expert.
        held = [trainable0]  # handed over once, then dropped: no second copy for the run
        del trainable0
        make_trainable = lambda: jax.device_put(  # noqa: E731
            jax.tree.map(lambda a: jnp.array(a, copy=True), held.pop()), trainable_shardings)
        del base

    checkpoints = JobCheckpoints(workdir, every=int(config.train.ckpt_every),
                                 keep=int(config.train.keep))
    start = checkpoints.latest_step()
    if start is not None:
        meta = checkpoints.read_meta(start)
        if meta.get("kind") != job.kind or meta.get("model") != model_cfg.to_dict():
            raise ValueError(f"{checkpoints.directory} holds a {meta.get('kind')!r} job of "
                             "another model; use a fresh --workdir for this job")
        if base_meta and meta.get("base_fingerprint") != base_meta["fingerprint"]:
            raise ValueError(f"{checkpoints.directory} was trained from another base than "
                             f"{job.base} (fingerprints differ); use a fresh --workdir")
        diffs = resume_mismatches(meta, config, job.kind, data_hashes)
        if diffs:
            raise ValueError(f"{checkpoints.directory} (step {start}) was trained with other "
                             "data or optimizer settings: " + "; ".join(diffs) + ". Resume "
                             "with its settings, or use a fresh --workdir")
        target = {"params": nested(abstract_like(abstract_trainable, trainable_shardings)),
                  "opt": abstract_like(abstract_opt, opt_shardings)}
        state, _ = checkpoints.restore(start, target)
        trainable, opt_state = checkpoint.flatten(state["params"]), state["opt"]
    else:
        start = 0
        trainable = make_trainable()
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
    del make_trainable  # and with it the base's trainable slices (`plan` does not count them)

    # ---- loop ------------------------------------------------------------------------
    tokens_per_step = global_batch * seq_len
    base_fingerprint = base_meta["fingerprint"] if base_meta else None

    def job_meta(step: int) -> dict:
        return {"kind": job.kind, "step": step, "tokens_seen": step * tokens_per_step,
                "model": model_cfg.to_dict(), "base_fingerprint": base_fingerprint,
                "config": config.to_dict(), "data": data_hashes}

    log = MetricsLog(workdir, start_step=start, total_steps=steps,
                     tokens_per_step=tokens_per_step, show_progress=job.show_progress)
    stop = StopSignal()
    losses, step, stopped = {}, start, False
    log_every = max(1, int(config.train.log_every))
    try:
        while step < steps:
            batch = jax.make_array_from_process_local_data(
                batch_sharding, batches.get(step), batch_shape)
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                                    jnp.asarray(step, jnp.int32))
            step += 1
            stopped = stop.agreed()
            logged = step % log_every == 0 or step == steps
            if logged:
                record = log.log(step, jax.device_get(metrics))
                losses[step] = record["loss"]
            if logged or stopped or step % checkpoints.every == 0:  # before anything is saved
                check_finite(step, jax.device_get(metrics), checkpoints.latest_step())
            checkpoints.save(step, {"params": nested(trainable), "opt": opt_state},
                             job_meta(step), force=stopped or step == steps)
            if stopped:
                break
    finally:
        stop.restore()
        log.close()
        checkpoints.close()

    # ---- outputs -----------------------------------------------------------------------
    output = None
    if job.write_output and not stopped:
        output = write_output(job, config, layout, trainable, frozen, stats, job_meta(step),
                              base_meta, handover)
    return Result(step, losses, stopped, output, layout, trainable, frozen, opt_state)


def make_train_step(layout: upcycle.ParamLayout, tx: optax.GradientTransformation,
                    lr_at: optax.Schedule, mesh, rules, trainable_shardings, opt_shardings,
                    frozen_shardings, batch_sharding):
    """jit(step)(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics):
    the full parameters assembled from both trees, the model run functionally, gradients
    and updates for the trainable tree only, a trained router bias projected back onto <= 0
    (or onto 0: `ParamLayout.project`); trainable and optimizer state donated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def train_step(trainable, opt_state, frozen, batch, step):
        def loss_fn(params):
            with activate(mesh, rules):
                return lm_loss(layout.model(params, frozen), batch)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = layout.project(optax.apply_updates(trainable, updates))
        metrics = dict(loss=loss, nll=aux["nll"], z_loss=aux["z_loss"],
                       grad_norm=optax.tree.norm(grads), lr=lr_at(step))
        return trainable, opt_state, metrics

    return jax.jit(
        train_step, donate_argnums=(0, 1),
        in_shardings=(trainable_shardings, opt_shardings, frozen_shardings, batch_sharding,
                      replicated),
        out_shardings=(trainable_shardings, opt_shardings, replicated))


def _host(array) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array as one numpy array on every host."""
    if isinstance(array, jax.Array) and not array.is_fully_replicated:
        full = NamedSharding(array.sharding.mesh, PartitionSpec())
        array = jax.jit(lambda x: x, out_shardings=full)(array)
    return np.asarray(array)


def _savable(flat: dict) -> dict:
    """Arrays checkpoint.save can hash: as they are in one process, host copies across processes."""
    if jax.process_count() == 1:
        return flat
    return {n: _host(a) for n, a in flat.items()}


def write_output(job: Job, config, layout: upcycle.ParamLayout, trainable: dict, frozen: dict,
                 stats: router_stats.RouterStats | None, meta: dict,
                 base_meta: dict | None, handover: FfnHandover | None = None) -> pathlib.Path:
    """WORKDIR/public (pretraining) or WORKDIR/artifact (a branch); an ffn job also writes the
    dense model it trained, WORKDIR/model."""
    workdir = pathlib.Path(job.workdir)
    full = layout.assemble(trainable, frozen)
    # the mixture the job read, not config.branch.public_mix: only a coordinated branch
    # replays public data, so a dense or ffn job's config may name a share it never used
    common = {"config": meta["config"], "tokens_seen": meta["tokens_seen"],
              "steps": meta["step"], "mixture": job_mixture(config, job.kind)}
    if job.kind == "pretrain":
        path = workdir / "public"
        checkpoint.save(path, _savable(full), {**common, "kind": "public", "model": layout.cfg.to_dict()},
                overwrite=True)
        return path
    path = workdir / "artifact"
    source = str(config.branch.source)
    if job.kind in ("dense", "ffn"):
        dense_meta = {**common, "kind": artifact.DENSE_KIND, "source": source,
                      "model": layout.cfg.to_dict(), "base_fingerprint": base_meta["fingerprint"]}
        if job.kind == "dense":  # with its data's router statistics under the base, for BTX
            extra = {} if stats is None else {"stats_tokens": stats.n_tokens,
                                              "stats_documents": stats.n_documents}
            checkpoint.save(path, {**_savable(full), **(stats.tensors() if stats else {})},
                    {**dense_meta, **extra}, overwrite=True)
            return path
        checkpoint.save(workdir / "model", _savable(full), dense_meta, overwrite=True)
    base_names = set(base_meta["tensors"])
    frozen_hashes = {n: checkpoint.tensor_hash(_host(a)) for n, a in frozen.items() if n in base_names}
    if job.kind == "ffn":  # the trained FFN becomes the expert beside the base's, kept whole
        own = {n: _host(trainable[n]) for n in upcycle.FFN_TENSORS}
        own.update({n: _host(a) for n, a in handover.router.items()})
        frozen_hashes.update(handover.public_hashes)
        model = upcycle.branch_config(layout.cfg, int(config.branch.train_top_k))
        base_experts = layout.cfg.n_experts
    else:
        own = {n: _host(trainable[n]) for n in upcycle.EXPERT_TENSORS}
        model, base_experts = layout.cfg, layout.base_experts
    artifact.save(path, own, stats.tensors(), {
        **common, "source": source, "base_fingerprint": base_meta["fingerprint"],
        "frozen_hashes": frozen_hashes, "base_experts": base_experts,
        "model": model.to_dict(), "stats_tokens": stats.n_tokens,
        "stats_documents": stats.n_documents}, overwrite=True)
    return path
