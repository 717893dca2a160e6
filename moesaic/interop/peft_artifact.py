"""`moesaic import-peft` and `moesaic export-peft`: a PEFT LoRA adapter <-> a low-rank branch
artifact (docs/interop.md).

import_peft turns an adapter trained with transformers + PEFT on the base's Hugging Face form
(an OLMo-2 model the base was imported from with `moesaic import-hf`) into the branch artifact
a low-rank branch job writes (`moesaic.branch_train.lora`, contract 3): the expert's
blocks/lora/<target>_{a,b} (L, 1, ...) (`peft_format`), its router row and bias, and its
data's router statistics under the base. The adapter was trained without a router, so the
party supplies what the merge routes by from its own data (--data, its source prepared with
`moesaic data prepare`), exactly as a branch job sets them before its first step: the
statistics of its source under the base (`routing.stats`), and the row a branch job starts
from (`router_init`: 'contrast', the branch default, against the public source's statistics,
or 'mean_hidden'). The row is not trained; the arrow router (`merge --router arrow`) sets
every low-rank party's row from its weights instead.

export_peft writes a low-rank branch artifact (a branch job's or an imported one) back as a
PEFT adapter folder; the router row and statistics have no place in PEFT and are left out.
Both write under OUT.partial, renamed when complete; every refusal comes before any write.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable

import numpy as np

from moesaic.branch_train import artifact, upcycle
from moesaic.data.loader import load_manifest
from moesaic.data.tokenizer import check_tokenizer
from moesaic.interop import peft_format
from moesaic.model import checkpoint, lora
from moesaic.model.config import ModelConfig
from moesaic.model.names import BIAS, ROUTER
from moesaic.routing import ngram

ROUTER_INITS = ("contrast", "mean_hidden")


def _dense_base(path: pathlib.Path) -> tuple[dict, ModelConfig]:
    meta = checkpoint.read_meta(path)
    cfg = checkpoint.model_config(meta)
    if cfg.is_moe or cfg.lora_experts:
        raise ValueError(f"--base {path}: a model with {cfg.n_experts} experts; import-peft "
                         "reads adapters of a dense OLMo-2 base (the public model, as "
                         "`moesaic import-hf` wrote it)")
    return meta, cfg


def _output(out: pathlib.Path, overwrite: bool, inputs: list[pathlib.Path]) -> None:
    try:
        checkpoint.output_path(out, overwrite)
    except FileExistsError:
        raise FileExistsError(f"{out} exists; choose another output or pass --overwrite"
                              ) from None
    if out in inputs:
        raise ValueError(f"--out {out} is one of the inputs; write elsewhere")


def router_row(init: str, own_mean, public_mean, margin: float):
    """((L, D) row, (L,) bias) as a branch job with config.branch.router_init=`init` sets them
    (`branch_train.base_model.own_router_row`)."""
    from moesaic.routing import stats as router_stats
    from moesaic.routing.contrast import contrast_rows

    if init == "contrast":
        return contrast_rows(own_mean, public_mean, margin)
    row = np.asarray(router_stats.unit_rows(own_mean), np.float32)
    return row, np.zeros(row.shape[0], np.float32)


def import_peft(adapter_dir: str | pathlib.Path, base: str | pathlib.Path, source: str,
                out: str | pathlib.Path, data_dir: str | pathlib.Path, *,
                public_source: str = "public", router_init: str = "contrast",
                margin: float = 2.0, seq_len: int = 128, stats_sequences: int = 64,
                overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Writes the low-rank branch artifact of the adapter at `out`; returns its meta."""
    adapter_dir = pathlib.Path(adapter_dir).resolve()
    base, out = pathlib.Path(base).resolve(), pathlib.Path(out).resolve()
    _output(out, overwrite, [adapter_dir, base])
    if not source:
        raise ValueError("--source: the party's source name is empty")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"--router-init {router_init!r}: one of {ROUTER_INITS}")
    if not margin > 0:
        raise ValueError(f"--router-margin {margin}: must be > 0")
    base_meta, base_cfg = _dense_base(base)
    adapter = peft_format.read_adapter(adapter_dir, base_cfg)
    try:
        branch_cfg = upcycle.branch_config(base_cfg).replace(
            lora_experts=1, lora_rank=adapter.rank, lora_alpha=adapter.alpha,
            lora_targets=adapter.targets)
    except ValueError as err:
        raise ValueError(f"{adapter_dir}: {err}") from None
    sources = [source] + ([public_source] if router_init == "contrast" else [])
    manifests = {s: load_manifest(data_dir, s) for s in sources}
    for manifest in manifests.values():
        check_tokenizer(base_cfg, manifest)
    log(f"import-peft: {adapter_dir.name}: rank {adapter.rank}, alpha {adapter.alpha:g}, "
        f"targets {list(adapter.targets)}" + "".join(
            f"; {t} in layers {layers} only (no update elsewhere)"
            for t, layers in adapter.layers.items() if len(layers) < base_cfg.n_layers))
    hashes, stats = _base_stats(base, base_meta, data_dir, sources, seq_len, stats_sequences)
    row, bias = router_row(router_init, stats[source].mean_hidden,
                           stats[public_source].mean_hidden if router_init == "contrast"
                           else None, margin)
    dtype = np.dtype(base_cfg.param_dtype)
    own = {name: value.astype(dtype) for name, value in adapter.tensors.items()}
    own[ROUTER] = np.asarray(row, dtype).reshape(base_cfg.n_layers, 1, base_cfg.d_model)
    own[BIAS] = np.asarray(bias, dtype).reshape(base_cfg.n_layers, 1)
    party = ngram.with_counts(stats[source], data_dir, source, width=seq_len,
                              vocab_size=base_cfg.vocab_size, eos_id=base_cfg.eos_id)
    meta = {
        "source": source, "base_fingerprint": base_meta["fingerprint"],
        "frozen_hashes": hashes, "base_experts": base_cfg.n_experts,
        "model": branch_cfg.to_dict(), "config": {}, "tokens_seen": None, "steps": None,
        "stats_tokens": party.n_tokens, "stats_documents": party.n_documents,
        "peft": {"adapter": str(adapter_dir), "adapter_config": adapter.config,
                 "layers": adapter.layers, "router_init": router_init,
                 "router_margin": margin if router_init == "contrast" else None,
                 "stats": {"seq_len": seq_len, "max_sequences": stats_sequences},
                 "data": {s: m["content_hash"] for s, m in manifests.items()}},
    }
    artifact.save(out, own, party.tensors(), meta, overwrite=overwrite)
    meta = checkpoint.read_meta(out)
    log(f"import-peft: wrote {out} (source {source!r}, router row by {router_init} from "
        f"{party.n_tokens} tokens; fingerprint {meta['fingerprint'][:12]})")
    return meta


def _base_stats(base: pathlib.Path, base_meta: dict, data_dir, sources: list[str],
                seq_len: int, max_sequences: int):
    """({tensor: hash} of the base, checked against its fingerprint, and {source: RouterStats}
    of each source under it)."""
    from flax import nnx

    from moesaic.model.sharding import make_mesh
    from moesaic.routing import stats as router_stats

    model, _ = checkpoint.load(base, meta=base_meta)
    flat = checkpoint.flatten(nnx.state(model))
    recorded = checkpoint.hash_algorithm(base_meta)
    hashes = {n: checkpoint.tensor_hash(v, recorded) for n, v in flat.items()}
    if checkpoint.fingerprint_of_hashes(hashes) != base_meta["fingerprint"]:
        raise ValueError(f"base {str(base)!r} is damaged: its tensors do not match the "
                         "fingerprint its meta.json records")
    if recorded != checkpoint.HASH:  # the artifact's frozen_hashes are in its own algorithm
        hashes = {n: checkpoint.tensor_hash(v) for n, v in flat.items()}
    out = {}
    for s in sources:
        batch = min(8, max_sequences)
        sequences, n_docs = router_stats.stats_sequences(
            data_dir, s, seq_len=seq_len, max_sequences=max_sequences, batch_rows=batch)
        rows = min(batch, len(sequences))
        out[s] = router_stats.collect(model, sequences, n_docs, batch_rows=rows,
                                      mesh=make_mesh())
    return hashes, out


def export_peft(path: str | pathlib.Path, out: str | pathlib.Path, *,
                base_model: str | None = None, overwrite: bool = False,
                log: Callable[[str], None] = print) -> dict:
    """Writes the low-rank branch artifact at `path` as a PEFT adapter folder; returns its
    adapter_config.json. `base_model`: its base_model_name_or_path (default: the imported
    adapter's, else none)."""
    path, out = pathlib.Path(path).resolve(), pathlib.Path(out).resolve()
    meta = artifact.read_meta(path)
    model = meta["model"]
    if not model.get("lora_experts"):
        raise ValueError(f"{path} is the branch artifact of an FFN expert; export-peft writes "
                         "low-rank branches (--config.branch.mode=lora, or import-peft)")
    if int(meta["base_experts"]) != 1:
        raise ValueError(f"{path}: its base has {meta['base_experts']} experts; a PEFT "
                         "adapter of an OLMo-2 model needs a dense base")
    _output(out, overwrite, [path])
    targets = tuple(model["lora_targets"])
    tensors = checkpoint.load_tensors(path, lora.tensor_names(targets))
    if base_model is None:
        base_model = ((meta.get("peft") or {}).get("adapter_config") or {}).get(
            "base_model_name_or_path")
    partial = out.with_name(out.name + checkpoint.PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        config = peft_format.write_adapter(
            partial, tensors, rank=int(model["lora_rank"]), alpha=float(model["lora_alpha"]),
            targets=targets, base_model=base_model)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    checkpoint.commit(partial, out)
    log(f"export-peft: wrote {out}: rank {config['r']}, lora_alpha {config['lora_alpha']}, "
        f"targets {config['target_modules']} (the router row and statistics have no place in "
        "a PEFT adapter and are left out)")
    return config
