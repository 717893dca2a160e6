"""The trainer of every job: public pretraining, a coordinated branch, a dense branch, an ffn
job (the kinds and what each trains, reads and writes: `moesaic.branch_train.kinds`).

    result = train(config, Job(kind="branch", workdir=..., data_dir=..., base=...))

It reads top to bottom in fixed phases: mesh -> data -> abstract init, shardings and step
(`moesaic.branch_train.setup`) -> restore -> loop -> outputs. The parameters live in two flat
pytrees (see `upcycle`): `trainable`, the only thing the optimizer sees, and `frozen`, base
tensors the step reads but never differentiates.

Restore precedence: this workdir's latest checkpoint (resume); else the base (a branch);
else a fresh initialisation (pretraining). Batches are a pure function of (seed, step),
so a resumed run recomputes exactly the batches an uninterrupted one would have seen, as
long as the settings that decide them and the optimizer's path are those the checkpoint
was trained with (the kind's `resume_keys`, and the data's content hashes): a resume that
changes any of them is refused, naming each, since its output would claim data it partly
never saw. Outputs: `moesaic.branch_train.outputs`, by the kind.
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
from flax import nnx

from moesaic.branch_train import (
    base_model,
    dp,
    kinds,
    lora,
    outputs,
    quantized_base,
    setup,
    upcycle,
)
from moesaic.branch_train.checkpointing import (
    JobCheckpoints,
    StopSignal,
    Terminated,
    abstract_like,
    nested,
)
from moesaic.branch_train.profiling import StepProfiler, mfu_terms
from moesaic.branch_train.progress import MetricsLog, parameter_overview
from moesaic.branch_train.workdir_lock import WorkdirLock
from moesaic.configs import validate
from moesaic.data.loader import TokenBatches, load_manifest, parse_mixture
from moesaic.data.prefetch import ReadAhead
from moesaic.data.tokenizer import check_tokenizer
from moesaic.model import checkpoint
from moesaic.model.config import ModelConfig
from moesaic.model.sharding import make_mesh
from moesaic.model.transformer import Decoder

# Keys added after checkpoints recorded their config, with the value every earlier run had.
_BEFORE_RECORDED = {"branch.negative_bias": True,
                    "branch.dp": {"clip_norm": 0.0, "noise_multiplier": 0.0, "delta": 1e-5}}


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str  # "pretrain" | "branch" (coordinated) | "dense" (continued pretraining) | "ffn"
    workdir: pathlib.Path
    data_dir: pathlib.Path
    base: pathlib.Path | None = None
    show_progress: bool = True
    write_output: bool = True
    # read the whole base once against its fingerprint first, and a resumed state for NaN/Inf
    verify: bool = True


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
    "key: checkpoint X, config Y" per difference (the kind's `resume_keys`)."""
    recorded, current = saved.get("config") or {}, config.to_dict()
    diffs = []
    for key in kinds.kind_of(kind).resume_keys:
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
    """Runs `job`; one job at a time per workdir (`WorkdirLock`, taken before the job first
    writes there and given back however it ends). SIGTERM outside the training loop (which
    saves and stops) raises `Terminated`: nothing half-written is left."""
    lock = WorkdirLock(job.workdir)
    try:
        with Terminated.on_sigterm():
            return _train(config, job, lock)
    finally:
        lock.release()


def _train(config: ml_collections.ConfigDict, job: Job, lock: WorkdirLock) -> Result:
    kind = kinds.kind_of(job.kind)
    validate.check(config)  # every numeric field in its range, before anything runs
    profiler = StepProfiler(job.workdir, config.train.get("profile_steps", ""))
    if kind.from_base and job.base is None:
        raise ValueError(f"a {job.kind} job needs --base (the public checkpoint)")
    workdir = pathlib.Path(job.workdir)
    seed, steps = int(config.seed), int(config.train.steps)

    # ---- mesh ------------------------------------------------------------------------
    mesh = make_mesh(dict(config.mesh))

    # ---- data ------------------------------------------------------------------------
    batches, manifests, data_hashes = _job_data(config, job, kind)

    # ---- abstract init: the model this job runs and which of its parameters train -----
    base_meta = base_cfg = None
    if kind.from_base:
        base_meta = base_model.read_base(job.base, config)
        # a QLoRA start verifies as it reads the base to quantize it (`quantized_base`)
        if job.verify and lora.quantize_setting(config, job.kind) == "none":
            checkpoint.verify(job.base, "base")
        base_cfg = base_model.job_model_config(checkpoint.model_config(base_meta), config)

    # ---- shardings and step ------------------------------------------------------------
    sc, step_fn = setup.set_up(config, job.kind, mesh, base_cfg)
    layout, model_cfg = sc.layout, sc.layout.cfg
    for manifest in manifests:
        check_tokenizer(model_cfg, manifest)
    if jax.process_index() == 0:
        print(parameter_overview(layout, sc.trainable_shardings, sc.frozen_shardings),
              flush=True)

    # ---- restore: resume this workdir; else start from the base; else initialise -------
    if kind.from_base:
        make_trainable, frozen, stats, handover = _start_from_base(
            config, job, kind, sc, base_meta, base_cfg)
    else:
        make_trainable, frozen, stats, handover = _start_fresh(sc, seed)

    lock.acquire()  # before the first write to the workdir
    checkpoints = JobCheckpoints(workdir, every=int(config.train.ckpt_every),
                                 keep=int(config.train.keep))
    start = checkpoints.latest_step()
    if start is not None:
        meta = checkpoints.read_meta(start)
        as_saved = json.loads(json.dumps(model_cfg.to_dict()))  # tuples as JSON lists
        if meta.get("kind") != job.kind or meta.get("model") != as_saved:
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
        target = {"params": nested(abstract_like(sc.trainable_shapes, sc.trainable_shardings)),
                  "opt": abstract_like(sc.opt_shapes, sc.opt_shardings)}
        state, _ = checkpoints.restore(start, target, check_finite=job.verify)
        trainable, opt_state = checkpoint.flatten(state["params"]), state["opt"]
        if jax.process_index() == 0:
            print(f"resumed from step {start} ({checkpoints.directory / str(start)})",
                  flush=True)
    else:
        start = 0
        trainable = make_trainable()
        opt_state = jax.jit(sc.optimizer.init, out_shardings=sc.opt_shardings)(trainable)
    del make_trainable  # and with it the base's trainable slices (`plan` does not count them)

    # ---- loop ------------------------------------------------------------------------
    tokens_per_step = int(config.data.global_batch) * int(config.data.seq_len)
    base_fingerprint = base_meta["fingerprint"] if base_meta else None

    def job_meta(step: int) -> dict:
        return {"kind": job.kind, "step": step, "tokens_seen": step * tokens_per_step,
                "model": model_cfg.to_dict(), "base_fingerprint": base_fingerprint,
                "config": config.to_dict(), "data": data_hashes}

    log = MetricsLog(workdir, start_step=start, total_steps=steps,
                     tokens_per_step=tokens_per_step, show_progress=job.show_progress,
                     **mfu_terms(layout, int(config.data.seq_len), sc.mesh,
                                 float(config.train.get("peak_tflops", 0.0))))
    stop = StopSignal()
    losses, step, stopped = {}, start, False
    log_every = max(1, int(config.train.log_every))
    private = dp.DpSettings.of(config) if job.kind != "pretrain" else None
    accountant = private and dp.Accountant.of(private, batches, str(config.branch.source),
                                              int(config.data.global_batch))
    reader = ReadAhead(batches, start=start, stop=steps,
                       threads=config.data.get("prefetch", 0))  # batches.get(step), read ahead
    try:
        while step < steps:
            batch = jax.make_array_from_process_local_data(
                sc.batch_sharding, reader.next(), sc.batch_shape)
            profiler.before(step + 1)
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                                    jnp.asarray(step, jnp.int32))
            step += 1
            profiler.after(step, metrics)
            stopped = stop.agreed()
            logged = step % log_every == 0 or step == steps
            if logged:
                record = log.log(step, {**jax.device_get(metrics),
                                        "data_wait": reader.wait_share(),
                                        **({"epsilon": accountant.epsilon(step)}
                                           if accountant else {})})
                losses[step] = record["loss"]
            if logged or stopped or step % checkpoints.every == 0:  # before anything is saved
                check_finite(step, jax.device_get(metrics), checkpoints.latest_step())
            checkpoints.save(step, {"params": nested(trainable), "opt": opt_state},
                             job_meta(step), force=stopped or step == steps)
            if stopped:
                break
    finally:
        profiler.close()
        reader.close()
        stop.restore()
        log.close()
        checkpoints.close()

    # ---- outputs -----------------------------------------------------------------------
    output = None
    if job.write_output and not stopped:
        # in the stored dtypes: the master copy cast back, frozen tensors held in the
        # compute dtype read again from the base (`moesaic.branch_train.precision`)
        stored_frozen, stored_hashes = _stored_frozen(job, sc, frozen)
        output = kind.write(outputs.Trained(
            workdir, config, kinds.job_mixture(config, job.kind), layout,
            sc.precision.stored(trainable, layout.dtypes), stored_frozen,
            stats, job_meta(step), base_meta, handover, stored_hashes))
    return Result(step, losses, stopped, output, layout, trainable, frozen, opt_state)


def _job_data(config: ml_collections.ConfigDict, job: Job, kind: kinds.JobKind
              ) -> tuple[TokenBatches, list[dict], dict[str, str]]:
    """(the job's batches, the manifests its tokenizer must match, the content hash of each
    source it reads, recorded in its checkpoints)."""
    if kind.from_base and not str(config.branch.source):
        raise ValueError("a branch job needs the party's source: config.branch.source "
                         "(e.g. --config moesaic/configs/tiny.py:source=code)")
    batches = TokenBatches(job.data_dir, kinds.job_mixture(config, job.kind),
                           seq_len=int(config.data.seq_len),
                           global_batch=int(config.data.global_batch), seed=int(config.seed),
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    data_hashes = {n: m["content_hash"] for n, m in batches.manifests.items()}
    manifests = list(batches.manifests.values())
    if kind.router_row and config.branch.router_init == "contrast":
        # The public data the router row is set from: checked and recorded like the batches'.
        public_source = str(config.branch.public_source)
        manifests.append(load_manifest(job.data_dir, public_source))
        data_hashes.setdefault(public_source, manifests[-1]["content_hash"])
    if kind.router_row and config.branch.router_init == "vector":
        vector = pathlib.Path(str(config.branch.router_vector))
        if vector.is_file():  # else the row setup says what is missing
            data_hashes["branch.router_vector"] = hashlib.sha256(vector.read_bytes()).hexdigest()
    return batches, manifests, data_hashes


def _start_fresh(sc: setup.StepConfig, seed: int):
    """(make_trainable, frozen, stats, handover) of a fresh model (pretraining)."""
    layout = sc.layout

    def init():
        trainable, frozen = upcycle.split_full(layout, checkpoint.flatten(nnx.state(
            Decoder(layout.cfg, rngs=nnx.Rngs(seed)))))
        return sc.precision.hold_trainable(trainable), sc.precision.hold_frozen(frozen)

    fresh = jax.jit(init, out_shardings=(sc.trainable_shardings, sc.frozen_shardings))
    frozen = fresh()[1] if layout.frozen else {}  # e.g. rows that are not nnx.Param
    return (lambda: fresh()[0]), frozen, None, None


def _start_from_base(config: ml_collections.ConfigDict, job: Job, kind: kinds.JobKind,
                     sc: setup.StepConfig, base_meta: dict, base_cfg: ModelConfig):
    """(make_trainable, frozen, stats, handover) of a job that starts from its base: the base
    loaded, its data's router statistics and the owner's router row as the kind needs them,
    the trainable and frozen trees cut from it (upcycled for a branch)."""
    layout, mesh, rules = sc.layout, sc.mesh, sc.rules
    if sc.precision.quantize != "none":  # never the unquantized base on a device
        base, _ = quantized_base.load(job.base, base_meta, sc, base_cfg, verify=job.verify)
    else:
        base = base_model.load_base(job.base, base_meta, mesh, rules, base_cfg)
    # the party's router statistics under the base: a branch's router row is set from
    # them and the merge's routers read them; a dense branch of one source keeps them for
    # BTX routers (one trained on a mixture has no single domain to route to), unless
    # config.branch.stats_batches is 0
    n_stats = int(config.branch.stats_batches)
    if kind.stats == "required" and n_stats < 1:
        raise ValueError(f"config.branch.stats_batches={n_stats}: a {job.kind} job needs "
                         "its data's router statistics (its router row and the merge's "
                         "routers are set from them); at least 1")
    stats = handover = own_row = own_bias = None
    if kind.stats == "required" or (kind.stats == "one source" and n_stats > 0 and len(
            parse_mixture(str(config.branch.source))) == 1):
        stats = base_model.party_stats(base, config, job.data_dir, mesh, rules)
    if kind.router_row:
        public = (base_model.party_stats(base, config, job.data_dir, mesh, rules,
                                         source=str(config.branch.public_source))
                  if config.branch.router_init == "contrast" else None)
        own_row, own_bias = base_model.own_router_row(config, base, stats, public)
        if not config.branch.negative_bias:
            own_bias = None  # held at 0 (the layout's projection keeps it there)
    if kind.start == "upcycle":
        trainable0, frozen = upcycle.upcycle(layout, base.flat, base.cfg, own_row, own_bias)
    elif kind.start == "low_rank":
        trainable0, frozen = lora.start(layout, base.flat, base.cfg, own_row, own_bias,
                                        int(config.seed))
    else:
        trainable0, frozen = upcycle.split_full(layout, base.flat)
    if kind.hands_over:  # what it hands to the merge beside the FFNs it trains
        handover = outputs.ffn_handover(layout, own_row, own_bias, base.flat)
    frozen = jax.device_put(sc.precision.hold_frozen(frozen), sc.frozen_shardings)
    # Own copies in the master dtype: the step donates the trainable buffers, and an own
    # expert sliced from a dense base can share its buffer with the frozen public expert.
    held = [trainable0]  # handed over once, then dropped: no second copy for the run
    del trainable0, base

    def make_trainable():
        return jax.device_put(sc.precision.hold_trainable(held.pop()), sc.trainable_shardings)

    return make_trainable, frozen, stats, handover


def _stored_frozen(job: Job, sc: setup.StepConfig, frozen: dict) -> tuple[dict, dict]:
    """(`frozen` as the base stores it, {name: hash} of the tensors held quantized): the
    tensors held in the compute dtype for the step (`Precision.held_in_compute`) read again
    from --base, which they are by construction; a tensor held quantized is only hashed as
    stored, a layer at a time on the host (never whole, and never again on a device)."""
    names = sc.precision.held_in_compute(sc.layout.frozen_shapes())
    if not names:
        return frozen, {}
    stored = sc.layout.shardings(sc.layout.frozen_shapes(), sc.mesh, sc.rules)
    cast = [n for n in names if not sc.precision.quantizes(n)]
    hashes = {n: checkpoint.TensorReader(job.base, n).hash() for n in names
              if sc.precision.quantizes(n)}
    if cast:
        frozen = {**frozen, **checkpoint.load_tensors(job.base, cast,
                                                      {n: stored[n] for n in cast})}
    return frozen, hashes
