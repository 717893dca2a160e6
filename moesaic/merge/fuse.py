"""The merge: verify, build the router, then write the merged MoE tensor by tensor.

Merged checkpoint (a model checkpoint, loadable with `checkpoint.load`):
    every shared tensor of the base, as it is
    blocks/ffn/{w_gate,w_up,w_down}  (L, E, ...) experts [base experts..., P1, P2, ...]
    blocks/ffn/{router,bias}         built by the router kind (RouterState: never optimized)
    rows/<source>/{router,bias}      each party's learned row and bias (and rows/public/ for
                                     an MoE base's router), so any kind can be rebuilt
    stats/<source>/{x_sum,xtx,mean_hidden}  each party's router statistics (stats/public/ if
                                     public statistics were given)
meta.json: kind "merged", model (n_experts = base experts + parties, router_trainable False),
experts [{"source", "fingerprint", "branch_meta"}], base_fingerprint, router {kind, top_k,
options, inputs}, merge {base_model, base_tensors, public_stats, public_stats_fingerprint...},
routing_report. `remove` and `add` check every recorded fingerprint again.

Memory: a few pieces at a time (streaming.save_streaming pulls them; a stacked expert
tensor's piece is one layer of one expert), whatever the number of parties. Each input is
read once: the tensors written as they are are verified by the write's read (`merge`).

`remove` and `add` read the base and the parties back out of a merged checkpoint and run
this same merge, so they give exactly the parameters of a merge made at once.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np

from moesaic.merge import calibrate, fine_grained, low_rank
from moesaic.merge import sources as src
from moesaic.merge.sources import PUBLIC, Base, MergeRefused, Party, PublicStats
from moesaic.merge.verify import router_dtype, router_input, verify
from moesaic.model import checkpoint, streaming
from moesaic.model.names import (
    BIAS,
    EXPERT_TENSORS,
    FFN_EXPERT,
    ROUTER,
    STAT_NAMES,
    ngram_name,
    rows_name,
    stat_name,
)
from moesaic.routing import registry, report


def router_inputs(base: Base, parties: list[Party], public: PublicStats | None,
                  options: dict) -> registry.RouterInputs:
    cfg = base.cfg
    base_rows = base.tensors[ROUTER].read().astype(np.float32) if ROUTER in base.tensors else None
    base_bias = base.tensors[BIAS].read().astype(np.float32) if BIAS in base.tensors else None

    def public_stat(stat: str, layer: int) -> np.ndarray:
        return public.stats[stat].rows(layer, layer + 1)[0]

    return registry.RouterInputs(
        n_layers=cfg.n_layers, d_model=cfg.d_model,
        sources=base.expert_names() + [p.source for p in parties],
        base_experts=base.n_experts, base_rows=base_rows, base_bias=base_bias,
        party_rows=lambda i: parties[i].own[ROUTER].read()[:, 0, :],
        party_bias=lambda i: parties[i].own[BIAS].read()[:, 0],
        party_stat=lambda i, stat, layer: parties[i].stats[stat].rows(layer, layer + 1)[0],
        party_tokens=[p.stats_tokens for p in parties],
        public_stat=public_stat if public is not None else None,
        public_tokens=public.tokens if public is not None else 0,
        options=dict(options),
        party_update=lambda i, layer: low_rank.update_blocks(base, parties[i], layer))


def _in_memory(array: np.ndarray) -> streaming.TensorSource:
    return streaming.TensorSource(array.shape, array.dtype, lambda: [array])


def _streamed_views(base: Base, parties: list[Party], public: PublicStats | None,
                    plain: bool) -> list[tuple[src.View, str]]:
    """(view, hash algorithm) of the inputs the write streams out as they are (the base's
    tensors but its router and bias, the FFN parties' experts), marked `deferred`: they are
    verified by the write's own read of them (`View.tap`) before the output is committed.
    None when the merge reads them in other ways first (`plain` False: fine-grained,
    low-rank, calibration); every view's recorded scans are cleared, so each merge reads
    its inputs afresh."""
    views = [*base.tensors.values(),
             *(v for p in parties for v in (*p.own.values(), *p.stats.values(),
                                            *(p.ngram or {}).values())),
             *(public.stats.values() if public is not None else ())]
    for view in views:
        view.scans.clear()
        view.deferred = False
    if not plain:
        return []
    streamed = [(view, base.hash) for name, view in base.tensors.items()
                if name not in (ROUTER, BIAS)]
    for party in parties:
        if party.low_rank:
            continue
        try:
            algorithm = checkpoint.hash_algorithm(party.meta)
        except ValueError:
            continue  # refused by verify, which names it
        streamed += [(party.own[name], algorithm) for name in FFN_EXPERT]
    for view, _ in streamed:
        view.deferred = True
    return streamed


def merge(base: Base, parties: list[Party], *, router: str, top_k: int,
          out: str | pathlib.Path, public: PublicStats | None = None,
          options: dict | None = None, overwrite: bool = False, low_rank_to: int | None = None,
          log: Callable[[str], None] = print,
          calibration: calibrate.Request | None = None,
          fine_grained_to: int | None = None, fine_grained_scale: float = 0.0) -> dict:
    """Verifies, builds the router, writes the merged checkpoint at `out`; returns its meta.
    Raises MergeRefused (nothing written) when an input fails verification. `calibration`:
    the party gate, its temperature chosen on proxy rows (moesaic.merge.calibrate).
    `fine_grained_to` M: every expert as M sub-experts of width d_ff / M, top-k times M
    (moesaic.merge.fine_grained; `fine_grained_scale` weighs their own router parts)."""
    out = pathlib.Path(out)
    parties = low_rank.ordered(parties)  # slots: the FFN parties, then the low-rank ones
    inputs_paths = {base.path.resolve(), *(p.path.resolve() for p in parties)}
    if out.resolve() in inputs_paths:
        raise MergeRefused(f"output {out} is one of the inputs; write to a new path")
    try:
        checkpoint.output_path(out, overwrite)
    except (ValueError, FileExistsError) as err:
        raise MergeRefused(f"output: {err}") from None
    options = dict(options or {})
    try:
        build = registry.get(router)
        registry.check_options(router, options)
    except ValueError as err:
        raise MergeRefused(str(err)) from None
    n_experts = base.n_experts + len(parties)
    if not 1 <= top_k <= n_experts:
        raise MergeRefused(f"--top-k {top_k}: the merged model has {n_experts} experts "
                           f"({base.n_experts} base + {len(parties)} parties)")
    if fine_grained_to is not None:
        fine_grained.check(base, parties, fine_grained_to, low_rank_to=low_rank_to,
                           calibration=calibration)
    streamed = _streamed_views(base, parties, public, plain=(
        fine_grained_to in (None, 1) and low_rank_to is None and calibration is None))
    public_fingerprint = verify(base, parties, public)  # all but the streamed tensors' hashes
    checked = list(parties)

    def verify_streamed() -> None:  # they are hashed and scanned as the write reads them
        for view, _ in streamed:
            view.deferred = False
        verify(base, checked, public)

    parties = low_rank.converted(base, parties, low_rank_to)  # --low-rank R (FlexMoRE)
    try:
        built = build(router_inputs(base, parties, public, options))
    except ValueError as err:
        verify_streamed()  # a refused input is named first, as when verified up front
        raise MergeRefused(str(err)) from None
    names = base.expert_names() + [p.source for p in parties]
    reports, warnings = report.routing_report(built.rows, names)
    log(report.format_report(reports, names))
    for warning in warnings:
        log(f"WARNING: {warning}")

    row_dtype = router_dtype(base, parties)
    tensors: dict[str, streaming.TensorSource] = {}
    for name, view in base.tensors.items():
        if name not in EXPERT_TENSORS:
            tensors[name] = view.source()
    for name in FFN_EXPERT:
        tensors[name] = src.stack_experts([base.tensors[name],
                                           *(p.own[name] for p in parties if not p.low_rank)])
    tensors.update(low_rank.stacked(parties))
    rows, bias = built.rows, built.bias
    split = (fine_grained.Units(base, parties, fine_grained_to, fine_grained_scale)
             if fine_grained_to not in (None, 1) else None)
    if split is not None:  # each expert as m sub-experts; the units' rows for each
        tensors.update(split.tensors())
        rows, bias = split.rows(rows, bias)
    tensors[ROUTER] = _in_memory(rows.astype(row_dtype))
    tensors[BIAS] = _in_memory(bias.astype(row_dtype))
    for name in (ROUTER, BIAS):
        if name in base.tensors:
            tensors[rows_name(PUBLIC, name)] = base.tensors[name].source()
        for p in parties:
            tensors[rows_name(p.source, name)] = p.own[name].source()
    for p in parties:
        for stat in STAT_NAMES:
            tensors[stat_name(stat, p.source)] = p.stats[stat].source()
        for stat, view in (p.ngram or {}).items():
            tensors[ngram_name(stat, p.source)] = view.source()
    if public is not None:
        for stat in STAT_NAMES:
            tensors[stat_name(stat, PUBLIC)] = public.stats[stat].source()

    cfg = base.cfg.replace(n_experts=n_experts, top_k=top_k, router_trainable=False,
                           router_bias=True, router_input=router_input(base, parties, public))
    cfg = low_rank.merged_config(cfg, parties)
    if split is not None:
        cfg = split.config(cfg)
    calibrated = None
    if calibration is not None:  # the party gate over every party (moesaic.merge.calibrate)
        cfg = calibrate.gated_config(cfg, len(parties))
        calibrated = calibrate.into(tensors, cfg, names, base.n_experts, calibration, log)
    experts = [{"source": s, "fingerprint": base.fingerprint} for s in base.expert_names()]
    experts += [{"source": p.source, "fingerprint": p.meta["fingerprint"],
                 "branch_meta": p.meta} for p in parties]
    if split is not None:
        experts = split.experts(experts)
    meta = {
        "kind": "merged",
        "model": cfg.to_dict(),
        "experts": experts,
        "base_fingerprint": base.fingerprint,
        "router": {"kind": router, "top_k": top_k, "options": options,
                   "inputs": built.inputs, "trainable": False},
        "merge": {"base_model": base.cfg.to_dict(), "base_tensors": sorted(base.tensors),
                  "base_hash": base.hash,
                  **({"public_stats_hash": public.hash} if public is not None else {}),
                  "public_stats": public is not None,
                  "public_stats_tokens": public.tokens if public is not None else 0,
                  "public_stats_fingerprint": public_fingerprint,
                  **({"low_rank": low_rank_to} if low_rank_to else {}),
                  **(split.record() if split is not None else {})},
        "routing_report": [{k: v for k, v in r.items()} for r in reports],
        "routing_warnings": warnings,
        **src.seq_len_record([p.meta for p in parties]),
        **({"calibration": calibrated} if calibrated is not None else {}),
    }
    for view, algorithm in streamed:
        view.tap(algorithm)
    streaming.save_streaming(out, tensors, meta, overwrite=overwrite,
                             before_commit=verify_streamed)
    log(f"merged {n_experts} experts ({', '.join(names)}) with router {router!r}, top-{top_k} "
        f"-> {out}")
    return checkpoint.read_meta(out)


def merge_paths(base_path, branch_paths, *, public_stats=None, **kw) -> dict:
    """`merge` from paths: a base checkpoint and branch artifacts."""
    base = src.open_base(base_path)
    parties = [src.open_branch(p) for p in branch_paths]
    public = src.open_public_stats(public_stats) if public_stats else None
    return merge(base, parties, public=public, **kw)


def _again(merged_path, parties_change, *, out, top_k=None, overwrite=False, log=print):
    base, parties, meta = fine_grained.parties_of_merged(merged_path)
    public = src.public_stats_of_merged(merged_path, meta)
    parties = parties_change(parties)
    router = meta["router"]
    n_experts = base.n_experts + len(parties)
    if top_k is None and router["top_k"] > n_experts:
        raise MergeRefused(f"the merged model's top_k {router['top_k']} exceeds the {n_experts} "
                           f"experts left ({base.n_experts} base + {len(parties)} parties); "
                           f"pass --top-k")
    return merge(base, parties, router=router["kind"],
                 top_k=router["top_k"] if top_k is None else top_k,
                 out=out, public=public, options=router["options"], overwrite=overwrite,
                 low_rank_to=meta["merge"].get("low_rank"),
                 log=log, calibration=calibrate.request_of_merged(merged_path, meta),
                 **fine_grained.options_of_merged(meta))


def remove(merged_path, source: str, *, out, **kw) -> dict:
    """The merged model without `source`'s expert: exactly a merge that never had it."""
    def without(parties):
        kept = [p for p in parties if p.source != source]
        if len(kept) == len(parties):
            raise MergeRefused(f"{merged_path} has no party {source!r}; its parties: "
                               f"{[p.source for p in parties]}")
        return kept
    return _again(merged_path, without, out=out, **kw)


def add(merged_path, branch_paths, *, out, **kw) -> dict:
    """The merged model with more parties: exactly a merge of all of them at once."""
    new = [src.open_branch(p) for p in branch_paths]

    def joined(parties: list[Party]) -> list[Party]:
        present = {p.source for p in parties}
        for branch in new:
            if branch.source in present:
                raise MergeRefused(f"{branch.path}: source {branch.source!r} is already a party "
                                   f"of {merged_path}; to replace its expert, `merge remove` "
                                   f"it first, then add the new branch")
        return parties + new
    return _again(merged_path, joined, out=out, **kw)
