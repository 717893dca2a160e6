"""Screening a merged model's experts on public proxy data: does each expert earn its tokens?

Per party expert, from forward passes over proxy rows (public text; `calibrate.proxy_tokens`):
  share        the mean router weight it takes per token, averaged over layers (its share of
               all the experts' weight)
  loo          leave-one-out: the proxy loss (nats per token) of the merge without it, exactly
               as `merge remove` makes it (calibration refitted; a merge of top-k all its
               experts, top-k all that are left), minus the merged model's.
               Negative: the model is better without it
  gain         how much it lowers the loss on the tokens it takes against the public expert:
               the loss of the public model minus that of the party merged alone with it
               (its own row against the public one), weighted by the party's router weight in
               the merged model (nats per token)
  row_norm     its router row's norm over the median of the parties', worst layer
  logit_range  the spread (99th minus 1st percentile) of its router logits on the proxy
               tokens over the median of the parties', worst layer
  skew         how far it pushes the next-token distribution towards a few tokens: the
               largest log ratio, over the vocabulary, of the mean predicted probability of
               the party alone to the public model's (a payload it was trained to emit leaks
               as such a token), over the median of the parties'; `skew_nats` is the raw value
Each signal becomes a score in [0, 1] (1: nothing unusual; `LIMITS` sets where each reaches
0.5), and the trust score is the smallest; `flagged_by` names the signals under 0.5.

A backdoor that stays silent on text without its trigger changes none of these: screening on
proxy data finds experts that harm or hijack that data, not every hidden behaviour.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from moesaic.merge import calibrate, fuse
from moesaic.merge.sources import PUBLIC, MergeRefused
from moesaic.model import checkpoint, gate
from moesaic.model.moe import effective_bias
from moesaic.model.names import BIAS, ROUTER, rows_name
from moesaic.model.params import build_model, variables

# signal -> the value at which its score is 0.5 (and how it falls off)
LIMITS = {"loo": -0.01, "gain": -0.02, "row_norm": 5.0, "logit_range": 5.0, "skew": 5.0}
POLICIES = ("warn", "down-weight", "refuse")
DEFAULT_THRESHOLD = 0.5


def check_threshold(value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0) or math.isnan(value):
        raise MergeRefused(f"--refuse-below {value}: a trust threshold in [0, 1]")
    return float(value)


def _load(path: pathlib.Path) -> tuple[dict, dict]:
    meta = checkpoint.read_meta(path)
    cfg = checkpoint.model_config(meta)
    names = list(variables(cfg))
    flat = checkpoint.load_tensors(path, names)
    return meta, {n: jnp.asarray(v) for n, v in flat.items()}


def _nll(cfg, flat, tokens, batch_rows=16):
    nll_fn, _ = calibrate._compiled(cfg)
    outs = [nll_fn(flat, jnp.asarray(tokens[i:i + batch_rows]))
            for i in range(0, len(tokens), batch_rows)]
    return jnp.concatenate([o[0] for o in outs]), jnp.concatenate([o[1] for o in outs])


def _mean_probs(cfg, flat, tokens_bt1):
    logits, _ = build_model(cfg, flat)(tokens_bt1[:, :-1])
    return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(0, 1))


@functools.lru_cache(maxsize=8)
def _mean_probs_fn(cfg):
    return jax.jit(functools.partial(_mean_probs, cfg))


def _prediction(cfg, flat, tokens, batch_rows=16) -> np.ndarray:
    """The mean next-token distribution (V,) over the proxy rows."""
    fn = _mean_probs_fn(cfg)
    means = [fn(flat, jnp.asarray(tokens[i:i + batch_rows]))
             for i in range(0, len(tokens), batch_rows)]
    return np.asarray(jnp.mean(jnp.stack(means), axis=0), np.float64)


@functools.lru_cache(maxsize=8)
def _gate_fn(cfg):
    return jax.jit(lambda flat, tokens_bt1: build_model(cfg, flat).party_gate(tokens_bt1[:, :-1]))


def _weights(cfg, flat, tokens, batch_rows=16):
    """Router weights (L, N*T, E) of the merged model (top-k of the softmax) and the logits."""
    _, seen_fn = calibrate._compiled(cfg)
    seen = jnp.concatenate([seen_fn(flat, jnp.asarray(tokens[i:i + batch_rows]))
                            for i in range(0, len(tokens), batch_rows)], axis=1)
    logits = jnp.einsum("lnd,led->lne", seen, flat[ROUTER].astype(jnp.float32))
    logits = logits + jax.vmap(effective_bias)(flat[BIAS])[:, None, :]
    if cfg.gate_parties:  # the party gate's mixture (moesaic.model.gate)
        gate_fn = _gate_fn(cfg)
        g = jnp.concatenate([gate_fn(flat, jnp.asarray(tokens[i:i + batch_rows]))
                             for i in range(0, len(tokens), batch_rows)])
        probs = jax.vmap(gate.mix, in_axes=(0, None))(logits, g)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
    kth = jax.lax.top_k(probs, cfg.top_k)[0][..., -1:]
    return jnp.where(probs >= kth, probs, 0.0), logits


def _score(signal: str, value: float) -> float:
    limit = LIMITS[signal]
    if signal in ("loo", "gain"):  # 1 at >= 0, 0.5 at the limit, towards 0 below
        return 1.0 if value >= 0 else float(1.0 / (1.0 + (value / limit) ** 2))
    return 1.0 if value <= 1.0 else float(1.0 / (1.0 + ((value - 1) / (limit - 1)) ** 2))


def screen(merged: str | pathlib.Path, tokens: np.ndarray, *, log=print) -> dict:
    """The screening report of merged checkpoint `merged` on proxy rows `tokens`."""
    merged = pathlib.Path(merged)
    meta, flat = _load(merged)
    cfg = checkpoint.model_config(meta)
    sources = [e["source"] for e in meta["experts"]]
    base = sum(s.startswith(PUBLIC) for s in sources)
    parties = sources[base:]
    if not parties:
        raise MergeRefused(f"{merged}: no party expert to screen")
    nll, keep = _nll(cfg, flat, tokens)
    n_tok = float(jnp.sum(keep))
    loss = float(jnp.sum(nll)) / n_tok
    weights, logits = _weights(cfg, flat, tokens)
    keep_n = keep.reshape(-1).astype(jnp.float32)
    share = np.asarray(jnp.sum(weights * keep_n[None, :, None], axis=(0, 1)))
    share = share / share.sum()
    own_rows = checkpoint.load_tensors(merged, [rows_name(p, ROUTER) for p in parties])
    norms = np.stack([np.linalg.norm(own_rows[rows_name(p, ROUTER)][:, 0], axis=-1)
                      for p in parties])  # (P, L)
    lo, hi = np.percentile(np.asarray(logits[:, :, base:]), [1, 99], axis=1)  # (L, P)
    spread = (hi - lo).T  # (P, L)
    masked = np.asarray(flat[BIAS]).copy()
    masked[:, base:] = calibrate.MASKED
    public_flat = {**flat, BIAS: jnp.asarray(masked)}
    nll_pub, _ = _nll(cfg, public_flat, tokens)
    pred_pub = _prediction(cfg, public_flat, tokens)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".screen-", dir=merged.parent))
    rows, skews = [], []
    try:
        for j, party in enumerate(parties):
            one = masked.copy()
            one[:, base + j] = np.asarray(flat[BIAS])[:, base + j]
            alone = {**flat, BIAS: jnp.asarray(one)}
            nll_alone, _ = _nll(cfg, alone, tokens)
            taken = jnp.mean(weights[:, :, base + j], axis=0) * keep_n
            gain = float(jnp.sum(taken * (nll_pub - nll_alone).reshape(-1))
                         / jnp.maximum(jnp.sum(taken), 1e-9))
            skews.append(float(np.max(np.log(np.maximum(_prediction(cfg, alone, tokens), 1e-30)
                                       / np.maximum(pred_pub, 1e-30)))))
            loo = float("nan")
            if len(parties) > 1:
                without = scratch / party
                fuse.remove(merged, party, out=without, log=lambda s: None,  # top-all stays
                            top_k=min(cfg.top_k, cfg.n_experts - 1))
                _, flat_without = _load(without)
                cfg_without = checkpoint.model_config(checkpoint.read_meta(without))
                nll_w, _ = _nll(cfg_without, flat_without, tokens)
                loo = float(jnp.sum(nll_w)) / n_tok - loss
                shutil.rmtree(without)
            values = {"loo": loo, "gain": gain,
                      "row_norm": float(np.max(norms[j] / np.median(norms, axis=0))),
                      "logit_range": float(np.max(spread[j] / np.median(spread, axis=0))),
                      "skew_nats": skews[-1]}
            rows.append({"source": party, "share": float(share[base + j]), **values})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    middle = max(float(np.median(skews)), 1e-6)
    for row in rows:
        row["skew"] = max(row["skew_nats"], 0.0) / middle
        scores = {k: (1.0 if math.isnan(row[k]) else _score(k, row[k])) for k in LIMITS}
        row.update(scores=scores, trust=min(scores.values()),
                   flagged_by=[k for k, v in scores.items() if v < 0.5])
    report = {"model": str(merged), "proxy_rows": int(tokens.shape[0]),
              "proxy_tokens": int(n_tok), "proxy_loss": loss,
              "public_share": float(share[:base].sum()), "limits": LIMITS, "experts": rows}
    log(format_summary(report))
    return report


def format_summary(report: dict, threshold: float = DEFAULT_THRESHOLD) -> str:
    lines = [f"screening of {report['model']} on {report['proxy_tokens']} proxy tokens "
             f"(loss {report['proxy_loss']:.4f} nats; the public expert's share "
             f"{report['public_share']:.3f})",
             f"{'expert':>12} {'share':>6} {'loo':>8} {'gain':>8} {'norm x':>7} "
             f"{'range x':>7} {'skew':>6} {'trust':>6}  flagged by"]
    for r in report["experts"]:
        mark = ", ".join(r["flagged_by"]) or "-"
        if r["trust"] < threshold:
            mark += f"  (below {threshold:g})"
        lines.append(f"{r['source']:>12} {r['share']:6.3f} {r['loo']:+8.4f} {r['gain']:+8.4f} "
                     f"{r['row_norm']:7.2f} {r['logit_range']:7.2f} {r['skew']:6.2f} "
                     f"{r['trust']:6.3f}  {mark}")
    return "\n".join(lines)


def below(report: dict, threshold: float) -> list[str]:
    return [r["source"] for r in report["experts"] if r["trust"] < threshold]


def write_report(report: dict, model: str | pathlib.Path) -> pathlib.Path:
    """The report beside the model: MODEL.screening.json (replaced atomically)."""
    model = pathlib.Path(model)
    path = model.with_name(model.name + ".screening.json")
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=1, sort_keys=True))
    partial.replace(path)
    return path


def screened_merge(base: str | pathlib.Path, branches: list, *, out: str | pathlib.Path,
                   tokens: np.ndarray, policy: str = "warn",
                   threshold: float = DEFAULT_THRESHOLD,
                   calibration: calibrate.Request | None = None, log=print, **merge_kw) -> dict:
    """`fuse.merge_paths` with screening: the merge is made aside, screened on `tokens`, and
    the parties whose trust is below `threshold` are, by `policy`: reported (warn), told
    to the calibration as never helping (down-weight: the merge is calibrated again with
    them), or left out (refuse: the merge of the others). The report is written beside
    `out`; a refusal of every party writes nothing. A refusal that leaves fewer experts than
    the merge's top-k merges the others at top-k of all that are left (`report["top_k"]`)."""
    from moesaic.merge.sources import open_branch

    threshold = check_threshold(threshold)
    if policy not in POLICIES:
        raise MergeRefused(f"screening policy {policy!r}: one of {list(POLICIES)}")
    out = pathlib.Path(out)
    try:
        checkpoint.output_path(out)
    except (ValueError, FileExistsError) as err:
        raise MergeRefused(f"output: {err}") from None
    sources = [open_branch(b).source for b in branches]
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".screen-merge-", dir=out.parent))
    try:
        first = scratch / "merged"
        fuse.merge_paths(base, branches, out=first, calibration=calibration, log=log,
                         **merge_kw)
        report = screen(first, tokens, log=log)
        flagged = below(report, threshold)
        report.update(model=str(out), policy=policy, threshold=threshold, flagged=flagged)
        for source in flagged:
            log(f"WARNING: party {source!r}: trust {_trust(report, source):.3f} below "
                f"{threshold:g} (flagged by {', '.join(_flags(report, source))})")
        if flagged and policy == "refuse":
            kept = [b for b, s in zip(branches, sources) if s not in flagged]
            if not kept:
                raise MergeRefused(f"every party's trust is below {threshold:g} "
                                   f"({', '.join(flagged)}): nothing to merge")
            log(f"refused: {', '.join(flagged)}; merging the others")
            left = checkpoint.model_config(checkpoint.read_meta(first)).n_experts - len(flagged)
            if merge_kw.get("top_k", 0) > left:  # top-k of the experts that are left
                log(f"top-k {merge_kw['top_k']} lowered to the {left} experts left")
                merge_kw = {**merge_kw, "top_k": left}
                report.update(top_k=left)
            fuse.merge_paths(base, kept, out=out, calibration=calibration, log=log,
                             **merge_kw)
        elif flagged and policy == "down-weight":
            request = calibration or calibrate.Request(
                tokens, {}, {"source": calibrate.PROXY_SOURCE, "rows": int(len(tokens))})
            request = dataclasses.replace(request, down_weight=tuple(flagged))
            log(f"down-weighted through the calibration: {', '.join(flagged)}")
            fuse.merge_paths(base, branches, out=out, calibration=request, log=log,
                             **merge_kw)
        else:
            first.rename(out)
        log(f"screening report: {write_report(report, out)}")
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _trust(report: dict, source: str) -> float:
    return next(r["trust"] for r in report["experts"] if r["source"] == source)


def _flags(report: dict, source: str) -> list[str]:
    return next(r["flagged_by"] for r in report["experts"] if r["source"] == source)
