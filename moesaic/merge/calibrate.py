"""Calibration at merge: the party gate (`moesaic.model.gate`), built from the parties' token
bigram counts, its temperature chosen on the merger's public proxy data.

Each party's row was learned against the public row alone, so rows are not calibrated against
each other: on code text a prose row may score higher than the code row, and a party that joins
later finds its tokens taken by the rows already there. Calibration gives the merged model what
the rows lack, a posterior over the parties of the text read so far: each party's bigram model
(its counts, which the branch job writes beside its router statistics) scores the prefix, and the
router mixes each party's model alone by that posterior. With the posterior on one party the
model computes exactly that party merged alone with the base.

The gate has one number to choose, the temperature that divides the bigram log-likelihoods (naive
Bayes is overconfident: bigrams are not independent). Over proxy rows (public text, which every
party may read) the merged model is run once per temperature of `temperatures`, and the one with
the lowest proxy loss is kept. Nothing trains the model.

The merged checkpoint keeps the proxy rows (`calib/tokens`), each party's counts
(`ngram/<source>/{bigram,context}`) and the gate (gate_bigram, gate_context, gate_bias), and
`remove`/`add` build it again from the same rows: a remove equals a fresh calibrated merge
without that party, an add the merge of all of them at once.

A party to down-weight (screening's `--policy down-weight`) gets the log prior
`DOWN_WEIGHT_PRIOR` in the gate: it takes tokens only where its bigram evidence outweighs that.

Cost: one forward pass over the proxy rows per temperature (the demo: seconds). Memory: the merged
model is held whole while it is calibrated (the merge itself streams).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moesaic.merge.sources import MergeRefused
from moesaic.model import gate
from moesaic.model.config import ModelConfig
from moesaic.model.layers import rms_norm
from moesaic.model.moe import router_inputs
from moesaic.model.names import GATE_BIAS, GATE_BIGRAM, GATE_CONTEXT, NGRAM_NAMES, ngram_name
from moesaic.model.params import build_model
from moesaic.model.transformer import token_nll

TOKENS = "calib/tokens"
MASKED = -1e9  # a masked party's bias: its weight underflows to exactly 0
DEFAULTS = {"temperatures": (0.5, 1.0, 2.0, 4.0), "alpha": 1.0}
DOWN_WEIGHT_PRIOR = -20.0  # a down-weighted party's log prior in the gate
PROXY_SOURCE = "public"


def proxy_tokens(data_dir: str | pathlib.Path, cfg: ModelConfig, *, seq_len: int,
                 rows: int = 64, source: str = PROXY_SOURCE) -> np.ndarray:
    """int32 (N, seq_len + 1) rows of `source`'s training split, evenly spaced over it; a
    folder without that source, or tokenized for another model, is refused."""
    from moesaic.data.loader import packed_rows
    from moesaic.data.tokenizer import check_tokenizer

    folder = pathlib.Path(data_dir) / source
    if not (folder / "manifest.json").is_file():
        raise MergeRefused(f"calibration data {data_dir}: no {source!r} source (public text "
                           f"every party may read); prepare one with `moesaic data prepare "
                           f"--source {source}=PATH --out {data_dir}`")
    try:
        check_tokenizer(cfg, folder)
        tokens, _, _ = packed_rows(data_dir, source, "train", width=seq_len + 1,
                                   max_rows=rows)
    except (ValueError, FileNotFoundError) as err:
        raise MergeRefused(f"calibration data {data_dir}: {err}") from None
    if int(tokens.max(initial=0)) >= cfg.vocab_size:
        raise MergeRefused(f"calibration data {data_dir}: token {int(tokens.max())} outside "
                           f"the model's vocabulary of {cfg.vocab_size}")
    return tokens


def _nll(cfg: ModelConfig, flat: dict, tokens_bt1: jax.Array):
    """Per-token nll (B, T), 0 at padding, and the mask of real targets: the model's own."""
    inputs, targets = tokens_bt1[:, :-1], tokens_bt1[:, 1:]
    logits, _ = build_model(cfg, flat)(inputs)
    keep = targets != cfg.pad_id
    return jnp.where(keep, token_nll(logits, targets), 0.0), keep


def _router_inputs(cfg: ModelConfig, flat: dict, tokens_bt1: jax.Array) -> jax.Array:
    """Each layer's router input (L, B*T, D): the decoder's own blocks one after another, and
    what each block's router scores (its input after attention, as `Block` computes it)."""
    model = build_model(cfg, flat)
    inputs = tokens_bt1[:, :-1]
    x = model.embed[...].astype(cfg.compute_dtype)[inputs]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    graphdef, layers = nnx.split(model.blocks)
    gate_tp = model.party_gate(inputs)
    seen = []
    for i in range(cfg.n_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], layers))
        h = x + rms_norm(block.attn(x, positions), block.attn_norm[...], cfg.norm_eps)
        seen.append(router_inputs(h, cfg.router_input).reshape(-1, h.shape[-1]))
        x, _ = block(x, positions, False, gate_tp)
    return jnp.stack(seen)


@functools.lru_cache(maxsize=8)
def _compiled(cfg: ModelConfig):
    """The jitted passes of one model config, made once per process."""
    return (jax.jit(functools.partial(_nll, cfg)),
            jax.jit(functools.partial(_router_inputs, cfg)))


def gated_config(cfg: ModelConfig, n_parties: int) -> ModelConfig:
    """`cfg` with a party gate over its last `n_parties` experts."""
    return cfg.replace(gate_parties=n_parties, gate_buckets=gate.buckets_for(cfg.vocab_size))


def _options(options: dict | None) -> dict:
    opts = {**DEFAULTS, **(options or {})}
    unknown = sorted(set(opts) - set(DEFAULTS))
    if unknown:
        raise MergeRefused(f"calibration options {unknown}: known {sorted(DEFAULTS)}")
    temps = opts["temperatures"]
    temps = (temps,) if isinstance(temps, (int, float)) else tuple(temps)
    def positive(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    if not temps or not all(positive(t) for t in temps):
        raise MergeRefused(f"calibration option temperatures={opts['temperatures']!r}: one or "
                           f"more finite numbers > 0")
    if not positive(opts["alpha"]):
        raise MergeRefused(f"calibration option alpha={opts['alpha']!r}: a finite number > 0")
    return {"temperatures": [float(t) for t in temps], "alpha": float(opts["alpha"])}


def fit(cfg: ModelConfig, flat: dict, tokens: np.ndarray, counts: list[dict], *,
        options: dict | None = None, distrusted=(), batch_rows: int = 16
        ) -> tuple[dict[str, np.ndarray], dict]:
    """The party gate of the merged model `flat` (a gated `cfg`) from each party's bigram
    counts ({"bigram", "context"}, in slot order): (its three tensors, the record meta.json
    keeps). `distrusted` parties (positions among the parties) get `DOWN_WEIGHT_PRIOR`."""
    opts = _options(options)
    prior = np.zeros((cfg.gate_parties,), np.float32)
    prior[list(distrusted)] = DOWN_WEIGHT_PRIOR
    nll_fn, _ = _compiled(cfg)
    params = {k: jnp.asarray(v) for k, v in flat.items()}
    losses, best = {}, None
    for temp in opts["temperatures"]:
        big, ctx = gate.tables([c["bigram"] for c in counts], [c["context"] for c in counts],
                               temperature=temp, alpha=opts["alpha"])
        tables = {GATE_BIGRAM: big, GATE_CONTEXT: ctx, GATE_BIAS: prior}
        p = {**params, **{k: jnp.asarray(v) for k, v in tables.items()}}
        total = count = 0.0
        for i in range(0, len(tokens), batch_rows):
            nll, keep = nll_fn(p, jnp.asarray(tokens[i:i + batch_rows]))
            total, count = total + float(jnp.sum(nll)), count + float(jnp.sum(keep))
        losses[temp] = total / max(count, 1.0)
        if best is None or losses[temp] < losses[best[0]]:
            best = (temp, tables)
    record = {"proxy_rows": int(tokens.shape[0]), "seq_len": int(tokens.shape[1] - 1),
              "options": opts, "gate": "bigram", "temperature": best[0],
              "proxy_nll": {str(t): round(v, 6) for t, v in losses.items()}}
    return best[1], record


@dataclasses.dataclass
class Request:
    """Calibrate a merge on `tokens` (proxy rows) with `options`; `data` says where the rows
    came from (kept in meta.json)."""

    tokens: np.ndarray
    options: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    down_weight: tuple[str, ...] = ()  # parties the fit is told never help (screening)
    carried: bool = False  # from a merged checkpoint: a down-weighted party may be gone


def request_from_data(data_dir: str | pathlib.Path, base_cfg: ModelConfig, *, seq_len: int,
                      rows: int = 64, options: dict | None = None) -> Request:
    tokens = proxy_tokens(data_dir, base_cfg, seq_len=seq_len, rows=rows)
    return Request(tokens, dict(options or {}),
                   {"dir": str(data_dir), "source": PROXY_SOURCE, "rows": int(len(tokens))})


def request_of_merged(path: str | pathlib.Path, meta: dict) -> Request | None:
    """The calibration a merged checkpoint was made with (its stored proxy rows), or None."""
    from moesaic.model import checkpoint

    record = meta.get("calibration")
    if not record:
        return None
    tokens = checkpoint.load_tensors(path, [TOKENS])[TOKENS]
    return Request(np.asarray(tokens, np.int32), dict(record["options"]),
                   dict(record.get("data", {})), tuple(record.get("down_weighted", ())),
                   carried=True)


def into(tensors: dict, cfg: ModelConfig, names: list[str], base_experts: int,
         request: Request, log=print) -> dict:
    """Calibrates the merged model (gated `cfg`) whose tensors `tensors` (name ->
    streaming.TensorSource) are about to be written: adds the party gate and the calib/
    tensors, and returns the record for meta.json. A party without bigram counts (an artifact
    made before the branch job wrote them) is refused by name."""
    from moesaic.model import streaming
    from moesaic.model.params import variables

    parties = names[base_experts:]
    missing = [s for s in parties if ngram_name("bigram", s) not in tensors]
    if missing:
        raise MergeRefused(f"--calibrate: parties {missing} have no token-bigram counts "
                           f"(ngram/bigram, which branch jobs and import-peft write since the "
                           f"party gate); make those artifacts again, or merge without "
                           f"--calibrate")
    down_weight = [s for s in request.down_weight if s in parties or not request.carried]
    unknown = sorted(set(down_weight) - set(parties))
    if unknown:
        raise MergeRefused(f"calibration: down-weighted parties {unknown} are not among the "
                           f"parties {parties}")
    gate_names = (GATE_BIGRAM, GATE_CONTEXT, GATE_BIAS)
    flat = {name: _materialise(tensors[name]) for name in variables(cfg)
            if name not in gate_names}
    counts = [{stat: _materialise(tensors[ngram_name(stat, s)]) for stat in NGRAM_NAMES}
              for s in parties]
    tables, record = fit(cfg, flat, request.tokens, counts, options=request.options,
                         distrusted=[parties.index(s) for s in down_weight])
    for name, value in [*tables.items(), (TOKENS, request.tokens.astype(np.int32))]:
        tensors[name] = streaming.TensorSource(value.shape, value.dtype, lambda v=value: [v])
    nlls = ", ".join(f"{t}: {v:.4f}" for t, v in record["proxy_nll"].items())
    log(f"calibration: party gate over {len(parties)} parties, temperature "
        f"{record['temperature']} (proxy loss by temperature {nlls})")
    down = {"down_weighted": sorted(down_weight)} if down_weight else {}
    return {**record, "data": request.data, **down}


def _materialise(source) -> np.ndarray:
    pieces = list(source.pieces())
    if not source.shape:
        return np.asarray(pieces[0], source.dtype)
    return np.concatenate([np.asarray(p) for p in pieces], axis=0).reshape(source.shape)
