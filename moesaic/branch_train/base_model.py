"""The base a branch job starts from: checked, loaded onto this job's mesh, and the party's
router statistics and own router row computed under it.

A base is a model checkpoint (`moesaic.model.checkpoint`) of kind "public" (or "model"/"merged":
any whole model). Its shape fields must equal the job config's model section; the fields
that only say how to run it (dispatch, dtype, remat, loss weights) come from the job config,
and so does `router_input` (what the branch's router scores) over a dense base; an MoE base
keeps its own.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moesaic.model import checkpoint, damage
from moesaic.model.config import ModelConfig
from moesaic.model.names import ROUTER
from moesaic.model.sharding import Rules
from moesaic.model.transformer import Decoder
from moesaic.routing import stats as router_stats
from moesaic.routing.contrast import contrast_rows

SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "tokenizer", "eos_id", "pad_id", "rope_theta", "norm_eps")
RUNTIME_FIELDS = ("dispatch", "capacity_factor", "z_loss_weight", "lb_loss_weight", "dtype",
                  "remat", "scan_layers", "router_input")
ROUTER_INITS = ("contrast", "mean_hidden", "public_noise", "vector")
BASE_KINDS = ("public", "model")  # not "merged": its branch could never be merged


@dataclasses.dataclass
class Base:
    cfg: ModelConfig
    model: Decoder
    flat: dict[str, jax.Array]
    meta: dict


def read_base(path: str | pathlib.Path, config: ml_collections.ConfigDict) -> dict:
    """The base's meta.json (plus "tensors": its tensor names), after checking that it
    exists, is a whole model and matches the job config's model shape."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"base checkpoint {str(path)!r} does not exist; run "
                                "`moesaic pretrain` first or point --base at its WORKDIR/public")
    meta = checkpoint.read_meta(path)
    if meta.get("kind") not in BASE_KINDS:
        raise ValueError(f"base {str(path)!r} is a {meta.get('kind')!r} checkpoint; a branch "
                         f"starts from a whole model ({', '.join(BASE_KINDS)})")
    base_cfg = checkpoint.model_config(meta)
    wanted = dict(config.model)
    diffs = [f"{f}: base {getattr(base_cfg, f)!r}, config {wanted[f]!r}"
             for f in SHAPE_FIELDS if f in wanted and wanted[f] != getattr(base_cfg, f)]
    if (base_cfg.is_moe and "router_input" in wanted
            and wanted["router_input"] != base_cfg.router_input):
        diffs.append(f"router_input: base {base_cfg.router_input!r} (an MoE whose router rows "
                     f"score that), config {wanted['router_input']!r}")
    if diffs:
        raise ValueError(f"the job config does not match the base {str(path)!r}: "
                         + "; ".join(diffs) + ". Use the config the base was trained with.")
    try:
        stored = checkpoint.tensor_metadata(path)
    except damage.CheckpointDamaged as err:  # named as the base, like verify names it
        raise err.relabel("base") from None
    abstract = checkpoint.flatten(nnx.state(checkpoint.abstract_model(base_cfg)))
    for name, value in abstract.items():
        if name not in stored or stored[name][0] != tuple(value.shape):
            have = stored[name][0] if name in stored else "missing"
            raise ValueError(f"base {str(path)!r}: tensor {name!r} is {have}, its meta.json "
                             f"model needs {tuple(value.shape)}; the checkpoint is damaged "
                             "or was written for another model")
    if "fingerprint" not in meta:
        raise ValueError(f"base {str(path)!r}: meta.json has no fingerprint")
    return {**meta, "tensors": sorted(stored)}


def job_model_config(base_cfg: ModelConfig, config: ml_collections.ConfigDict) -> ModelConfig:
    """The base's shapes with the job config's way of running them."""
    runtime = {f: config.model[f] for f in RUNTIME_FIELDS if f in config.model}
    return base_cfg.replace(**runtime)


def load_base(path: str | pathlib.Path, meta: dict, mesh: Mesh, rules: Rules,
              cfg: ModelConfig | None = None) -> Base:
    """The base on this mesh, run as `cfg` (the base's config with the job's runtime fields;
    default: as stored)."""
    cfg = cfg or checkpoint.model_config(meta)
    model, _ = checkpoint.load(path, mesh=mesh, rules=rules, cfg=cfg)
    return Base(cfg, model, checkpoint.flatten(nnx.state(model)), meta)


def party_stats(base: Base, config: ml_collections.ConfigDict, data_dir: str | pathlib.Path,
                mesh: Mesh, rules: Rules, source: str | None = None) -> router_stats.RouterStats:
    """Router statistics of the party's source under the base, on config.branch.stats_batches
    global batches, with its token-bigram counts (the party gate's input:
    `moesaic.routing.ngram`); of `source` (public data for a contrast row) without them."""
    from moesaic.routing import ngram

    batch = int(config.data.global_batch)
    sequences, n_docs = router_stats.stats_sequences(
        data_dir, source or str(config.branch.source), seq_len=int(config.data.seq_len),
        max_sequences=int(config.branch.stats_batches) * batch, batch_rows=batch)
    collected = router_stats.collect(base.model, sequences, n_docs, batch_rows=batch, mesh=mesh,
                                     rules=rules)
    if source is not None:
        return collected
    return ngram.with_counts(collected, data_dir, str(config.branch.source),
                             width=int(config.data.seq_len), vocab_size=base.cfg.vocab_size,
                             eos_id=base.cfg.eos_id)


def own_router_row(config: ml_collections.ConfigDict, base: Base,
                   stats: router_stats.RouterStats,
                   public: router_stats.RouterStats | None = None
                   ) -> tuple[jax.Array, jax.Array | None]:
    """((L, D) initial router row, (L,) initial bias or None for 0) of the owner's expert, by
    config.branch.router_init:
    contrast     a nearest-centroid boundary between the party's data and public data (which
                 every party may read), `moesaic.routing.contrast.contrast_rows`: an average
                 own token scores +margin against the public expert, an average public token
                 -margin.
    mean_hidden  the unit-normalised mean router input of the party's data
    public_noise the base's public row (expert 0) plus router_noise * N(0, 1); an MoE base only
    vector       a .npy file (config.branch.router_vector) of shape (D,) or (L, D), as given
    """
    kind = str(config.branch.router_init)
    n_layers, d = base.cfg.n_layers, base.cfg.d_model
    if kind == "contrast":
        if public is None:
            raise ValueError("config.branch.router_init='contrast' needs public statistics "
                             f"(config.branch.public_source={str(config.branch.public_source)!r})")
        row, bias = contrast_rows(stats.mean_hidden, public.mean_hidden,
                                  float(config.branch.router_margin))
        return jnp.asarray(row, jnp.float32), jnp.asarray(bias, jnp.float32)
    if kind == "mean_hidden":
        return router_stats.unit_rows(stats.mean_hidden), None
    if kind == "public_noise":
        if not base.cfg.is_moe:
            raise ValueError("config.branch.router_init='public_noise' needs an MoE base: a "
                             "dense base has no public router row; use 'contrast' (the "
                             "default), 'mean_hidden' or 'vector'")
        key = jax.random.fold_in(jax.random.key(int(config.seed)), 0x5EED)
        noise = float(config.branch.router_noise) * jax.random.normal(key, (n_layers, d))
        return base.flat[ROUTER][:, 0].astype(jnp.float32) + noise, None
    if kind == "vector":
        path = str(config.branch.router_vector)
        if not path or not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"config.branch.router_vector={path!r}: no such .npy file "
                                    "(router_init='vector' needs one)")
        vector = np.load(path)
        if vector.shape == (d,):
            vector = np.broadcast_to(vector, (n_layers, d))
        if vector.shape != (n_layers, d):
            raise ValueError(f"router vector {path!r} has shape {vector.shape}; need ({d},) or "
                             f"({n_layers}, {d})")
        return jnp.asarray(vector, jnp.float32), None
    raise ValueError(f"config.branch.router_init={kind!r}: one of {ROUTER_INITS}")
