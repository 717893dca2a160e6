"""Calibration at merge: a temperature and a bias per party expert and layer, fitted on the
merger's public proxy data so the router's weights agree with which expert lowers the loss.

Each party's row was learned against the public row alone, so rows are not calibrated against
each other: on code text a prose row may score higher than the code row. Calibration asks the
model instead. Over proxy rows (public text, which every party may read), it runs forward
passes of the merged model:
  - with every party masked (the public model), and with all parties but one masked (that
    party merged alone with the public model, its own row against the public one): per token
    the loss of each, so the gain g_p = loss(public) - loss(p alone);
  - the gains averaged over the row's prefix when the router scores the prefix mean (what the
    router can see), and a target over experts per token: q = sum_k pi_k alone_k, where pi is
    a softmax of the gains over {public only, each party} (temperature `target_temperature`
    nats) and alone_k the weights the merged router would give with every other party masked;
  - per layer, in order, a fit of logit_p = a_p (x . row_p) + c_p (a_p > 0, c_p <= 0: the model
    clamps a party's bias at 0) minimising the cross-entropy of softmax(logits) to q, plus a
    small pull of log a_p and c_p towards the merged values; the inputs x of a layer are those
    of the model with the layers before it calibrated.
The fit has 2 P numbers per layer; nothing trains the model. The result is folded into the
router: rows a_p row_p, biases c_p, so the calibrated model loads and runs like any merged one.
The merged checkpoint keeps the proxy rows (`calib/tokens`) and the fitted `calib/scale`,
`calib/bias` (L, E; 1 and the merged bias for base experts), and `remove`/`add` fit again on
the same rows: a remove equals a fresh merge without that party, calibration included.

Cost: (P + 2) + L forward passes over the proxy rows and L small fits (the demo: seconds).
Memory: the merged model is held whole while it is calibrated (the merge itself streams).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moesaic.merge.sources import MergeRefused
from moesaic.model.config import ModelConfig
from moesaic.model.layers import rms_norm
from moesaic.model.moe import effective_bias, router_inputs
from moesaic.model.names import BIAS, ROUTER
from moesaic.model.params import build_model
from moesaic.model.transformer import token_nll

TOKENS, SCALE, SHIFT, DELTA = "calib/tokens", "calib/scale", "calib/bias", "calib/rows"
MASKED = -1e9  # a masked party's bias: its weight underflows to exactly 0
DEFAULTS = {"target_temperature": 0.05, "prior": 1e-3, "steps": 200, "balance": 1.0,
            "rows": 0.0, "lr": 0.1}
PROXY_SOURCE = "public"


@dataclasses.dataclass
class Fit:
    scale: np.ndarray  # (L, E) float32: multiplies each expert's row
    bias: np.ndarray  # (L, E) float32: each expert's bias (base experts: as merged)
    rows: np.ndarray  # (L, E, D) float32: added to each scaled row (0 unless option rows)
    record: dict  # what meta.json keeps under "calibration"


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
    seen = []
    for i in range(cfg.n_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], layers))
        h = x + rms_norm(block.attn(x, positions), block.attn_norm[...], cfg.norm_eps)
        seen.append(router_inputs(h, cfg.router_input).reshape(-1, h.shape[-1]))
        x, _ = block(x, positions)
    return jnp.stack(seen)


def _gains_to_weights(nll_public, nll_alone, keep, prefix: bool, temperature: float):
    """pi (B*T, P+1): softmax over {public only, party 1..P} of each one's loss gain over the
    public model, averaged over the prefix when the router sees the prefix mean."""
    gains = jnp.concatenate([jnp.zeros_like(nll_public)[None], nll_public[None] - nll_alone])
    gains = jnp.where(keep[None], gains, 0.0)  # (P+1, B, T)
    if prefix:
        counts = jnp.cumsum(keep.astype(jnp.float32), axis=1)[None]
        gains = jnp.cumsum(gains, axis=2) / jnp.maximum(counts, 1.0)
    pi = jax.nn.softmax(gains / temperature, axis=0)
    return pi.reshape(pi.shape[0], -1).T


def _layer_fit(x_nd, rows_ed, bias_e, pi_nk, keep_n, base: int, prior: float, steps: int,
               with_rows: bool, rows_prior: float, lr: float):
    """(scale, bias, row correction) of the parties in one layer: softmax(a s + c + x.v)
    fitted to the target (v = 0 unless `with_rows`), and the fit loss before and after."""
    scores = x_nd @ rows_ed.T  # (N, E) raw scores
    eff = effective_bias(bias_e)
    n_exp = rows_ed.shape[0]
    # alone_k: the merged router's weights with every party but k masked (k = 0: all masked)
    masks = jnp.full((n_exp - base + 1, n_exp), MASKED).at[:, :base].set(0.0)
    masks = masks.at[jnp.arange(1, n_exp - base + 1), jnp.arange(base, n_exp)].set(0.0)
    alone = jax.nn.softmax((scores + eff)[:, None, :] + masks[None], axis=-1)  # (N, K, E)
    target = jnp.einsum("nk,nke->ne", pi_nk, alone)
    weight = keep_n / jnp.maximum(jnp.sum(keep_n), 1.0)
    c0 = jnp.minimum(bias_e[base:], 0.0)

    n_par, d = n_exp - base, x_nd.shape[1]
    rms = jnp.sqrt(jnp.mean(x_nd * x_nd)) + 1e-12  # the correction reads x / rms: unit scale

    def unpack(theta):
        log_a, c = theta[:n_par], theta[n_par:2 * n_par]
        v = theta[2 * n_par:].reshape(n_par, d) if with_rows else jnp.zeros((n_par, d))
        return log_a, -jax.nn.softplus(c), v

    def loss(theta):
        log_a, c, v = unpack(theta)
        party = jnp.exp(log_a) * scores[:, base:] + c
        if with_rows:
            party = party + (x_nd / rms) @ v.T
        logits = jnp.concatenate([scores[:, :base] + eff[:base], party], axis=1)
        # the cross-entropy less the target's entropy: the KL divergence, 0 at a perfect fit
        ce = jnp.sum(weight * jnp.sum(jax.scipy.special.xlogy(target, target)
                                      - target * jax.nn.log_softmax(logits, -1), -1))
        return (ce + prior * (jnp.sum(log_a ** 2) + jnp.sum((c - c0) ** 2))
                + rows_prior * jnp.sum(v ** 2))

    # softplus^-1 of -c0, kept finite for c0 = 0
    start = jnp.concatenate([jnp.zeros(n_par), jnp.log(jnp.expm1(jnp.maximum(-c0, 1e-3))),
                             jnp.zeros(n_par * d if with_rows else 0)])
    grad = jax.grad(loss)

    def step(carry, _):  # Adam, fixed steps: deterministic, no line search
        theta, m, v, t = carry
        g = grad(theta)
        m, v, t = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g, t + 1
        mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        return (theta - lr * mhat / (jnp.sqrt(vhat) + 1e-8), m, v, t), None

    zeros = jnp.zeros_like(start)
    (theta, _, _, _), _ = jax.lax.scan(step, (start, zeros, zeros, 0.0), None, length=steps)
    log_a, c, v = unpack(theta)
    return jnp.exp(log_a), c, v / rms, loss(start), loss(theta)


_fit_layer = jax.jit(_layer_fit, static_argnums=(5, 7, 8))


@functools.lru_cache(maxsize=8)
def _compiled(cfg: ModelConfig):
    """The jitted passes of one model config, made once per process."""
    return (jax.jit(functools.partial(_nll, cfg)),
            jax.jit(functools.partial(_router_inputs, cfg)))


def fit(cfg: ModelConfig, flat: dict[str, np.ndarray], tokens: np.ndarray, *, base_experts: int,
        options: dict | None = None, batch_rows: int = 16,
        distrusted: list[int] | tuple[int, ...] = ()) -> Fit:
    """The calibration of the merged model `flat` (config `cfg`) on proxy rows `tokens`.
    `distrusted` parties (positions among the parties) are never a target: the fit gives
    them as little weight as its bounds allow."""
    opts = {**DEFAULTS, **(options or {})}
    unknown = sorted(set(opts) - set(DEFAULTS))
    if unknown:
        raise MergeRefused(f"calibration options {unknown}: known {sorted(DEFAULTS)}")
    if (not opts["target_temperature"] > 0 or opts["prior"] < 0 or int(opts["steps"]) < 1
            or opts["rows"] < 0 or not opts["lr"] > 0):
        raise MergeRefused(f"calibration options {opts}: target_temperature > 0, prior >= 0, "
                           f"steps >= 1")
    n_exp, n_par = cfg.n_experts, cfg.n_experts - base_experts
    params = {k: jnp.asarray(v) for k, v in flat.items()}
    rows0 = np.asarray(flat[ROUTER], np.float32)
    bias0 = np.asarray(flat[BIAS], np.float32)
    nll_fn, seen_fn = _compiled(cfg)

    def batches(fn, bias, rows=None):  # fn over all proxy rows, batch_rows at a time
        p = {**params, BIAS: jnp.asarray(bias),
             ROUTER: jnp.asarray(rows0 if rows is None else rows)}
        return [fn(p, jnp.asarray(tokens[i:i + batch_rows]))
                for i in range(0, len(tokens), batch_rows)]

    def run(bias):  # nll (N, T) and the mask of real targets
        outs = batches(nll_fn, bias)
        return jnp.concatenate([o[0] for o in outs]), jnp.concatenate([o[1] for o in outs])

    masked = bias0.copy()
    masked[:, base_experts:] = MASKED
    nll_public, keep = run(masked)
    alone = []
    for j in range(n_par):
        one = masked.copy()
        one[:, base_experts + j] = bias0[:, base_experts + j]
        alone.append(run(one)[0])
    pi = _gains_to_weights(nll_public, jnp.stack(alone), keep,
                           cfg.router_input == "prefix_mean", float(opts["target_temperature"]))
    if len(distrusted):
        columns = 1 + np.asarray(distrusted)  # their share goes to the public expert alone
        pi = pi.at[:, 0].add(jnp.sum(pi[:, columns], axis=1)).at[:, columns].set(0.0)
    keep_n = keep.reshape(-1).astype(jnp.float32)
    if opts["balance"]:  # each target (public only, each party) weighs the same in the fit
        best = jax.nn.one_hot(jnp.argmax(pi, axis=1), pi.shape[1]) * keep_n[:, None]
        counts = jnp.sum(best, axis=0)
        keep_n = keep_n * (best @ jnp.where(counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0))
    scale = np.ones((cfg.n_layers, n_exp), np.float32)
    delta = np.zeros_like(rows0)
    bias = bias0.copy()
    losses = []
    for layer in range(cfg.n_layers):
        seen = jnp.concatenate(batches(seen_fn, bias, rows0 * scale[:, :, None] + delta),
                               axis=1)
        a, c, v, before, after = _fit_layer(
            seen[layer], jnp.asarray(rows0[layer]), jnp.asarray(bias0[layer]), pi, keep_n,
            base_experts, float(opts["prior"]), int(opts["steps"]), bool(opts["rows"] > 0),
            float(opts["rows"]), float(opts["lr"]))
        scale[layer, base_experts:] = np.asarray(a)
        bias[layer, base_experts:] = np.asarray(c)
        delta[layer, base_experts:] = np.asarray(v)
        losses.append([round(float(before), 6), round(float(after), 6)])
    gains = (nll_public[None] - jnp.stack(alone)) * keep[None]
    record = {"proxy_rows": int(tokens.shape[0]), "seq_len": int(tokens.shape[1] - 1),
              "options": opts, "fit_loss": losses,
              "party_gain_nats": [round(float(jnp.sum(g) / jnp.sum(keep)), 6) for g in gains]}
    return Fit(scale, bias, delta, record)


def apply(rows: np.ndarray, fitted: Fit) -> tuple[np.ndarray, np.ndarray]:
    """(rows, bias) of the calibrated router: each row times its scale, the fitted biases."""
    return rows * fitted.scale[:, :, None] + fitted.rows, fitted.bias


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
    """Calibrates the merged model whose tensors `tensors` (name -> streaming.TensorSource)
    are about to be written: replaces its router and bias with the calibrated ones, adds the
    calib/ tensors, and returns the record for meta.json."""
    from moesaic.model import streaming
    from moesaic.model.params import variables

    flat = {name: _materialise(tensors[name]) for name in variables(cfg)}
    down_weight = [s for s in request.down_weight
                   if s in names[base_experts:] or not request.carried]
    unknown = sorted(set(down_weight) - set(names[base_experts:]))
    if unknown:
        raise MergeRefused(f"calibration: down-weighted parties {unknown} are not among the "
                           f"parties {names[base_experts:]}")
    distrusted = [names.index(s) - base_experts for s in down_weight]
    fitted = fit(cfg, flat, request.tokens, base_experts=base_experts, options=request.options,
                 distrusted=distrusted)
    rows, bias = apply(np.asarray(flat[ROUTER], np.float32), fitted)
    dtype = tensors[ROUTER].dtype
    for name, value in ((ROUTER, rows.astype(dtype)), (BIAS, bias.astype(dtype)),
                        (TOKENS, request.tokens.astype(np.int32)),
                        (SCALE, fitted.scale), (SHIFT, fitted.bias), (DELTA, fitted.rows)):
        tensors[name] = streaming.TensorSource(value.shape, value.dtype,
                                               lambda v=value: [v])
    for layer, (before, after) in enumerate(fitted.record["fit_loss"]):
        scales = ", ".join(f"{v:.2f}" for v in fitted.scale[layer, base_experts:])
        biases = ", ".join(f"{v:.2f}" for v in fitted.bias[layer, base_experts:])
        log(f"calibration layer {layer}: fit loss {before:.4f} -> {after:.4f}; party scales "
            f"{scales}; biases {biases}")
    down = {"down_weighted": sorted(down_weight)} if down_weight else {}
    return {**fitted.record, "data": request.data, **down}


def _materialise(source) -> np.ndarray:
    pieces = list(source.pieces())
    if not source.shape:
        return np.asarray(pieces[0], source.dtype)
    return np.concatenate([np.asarray(p) for p in pieces], axis=0).reshape(source.shape)
