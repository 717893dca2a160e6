"""Held-out perplexity and bits per byte per domain, and routing statistics of MoE models.

A *scorer* is anything callable as `scorer(tokens_bt1) -> (logp_bt, stats)`: for a batch of
packed sequences (B, T+1) it gives the log-probability (nats, float) of every target
`tokens[:, 1:]` and a dict of per-batch statistics (arrays, means over the batch's tokens)
that the evaluator averages over batches weighted by their number of targets; a scorer may
define `pooled(stats)` to finish them once pooled. `ModelScorer` is the scorer of one model
(its stats: each expert's share of tokens and of router weight per layer, (L, E)); the
ensembles of `moesaic.eval.ensembles` are scorers too, so one evaluator gives every system's
numbers.

Per domain (the held-out split of one prepared source):
    nll  = -sum(logp) / targets            (nats per token, eos targets included)
    ppl  = exp(nll)
    bpb  = -sum(logp) / ln 2 / bytes       (bytes of text the targets cover; eos covers none)
Bits per byte is comparable across tokenizers; it is exact for the byte tokenizer.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from moesaic.configs.common import DEFAULT_RULES
from moesaic.data.loader import heldout_sequences, load_manifest
from moesaic.data.tokenizer import check_tokenizer
from moesaic.model import checkpoint, expert_parallel
from moesaic.model.params import build_model
from moesaic.model.sharding import Rules, activate, logical_to_spec, make_mesh
from moesaic.model.transformer import Decoder

Scorer = Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]


def local_mesh() -> jax.sharding.Mesh:
    """A data-parallel mesh over this process's devices."""
    return make_mesh({"data": -1}, devices=jax.local_devices())


def load_model(model_or_path: Decoder | str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
               rules: Rules = DEFAULT_RULES, flag: str = "",
               dispatch: str = "dropless") -> tuple[Decoder, dict]:
    """A Decoder as is (meta {}), or a moesaic checkpoint restored onto `mesh` (default: the
    local devices), run with `dropless` dispatch whatever it trained with: under `capacity`
    a token's output could depend on later tokens and on the other rows of the batch, which
    a perplexity must not see; and with its layers scanned (`model.scan_layers`), since an
    unrolled loop only pays in a training step and costs compile time here (the demo's eval:
    87 s unrolled, 71 s scanned). `flag` is how the user gave the path, for the error
    (default: --model). On a mesh with an expert axis the model is expert-parallel, padded to
    a multiple of it (`expert_parallel.shard_merged_model`); `dispatch` may then be
    "all_to_all" (tokens sent explicitly), which is dropless too."""
    if dispatch not in ("dropless", "all_to_all"):
        raise ValueError(f"dispatch {dispatch!r}: evaluation runs dropless or all_to_all")
    mesh = mesh or local_mesh()
    if isinstance(model_or_path, Decoder):
        return _expert_parallel(model_or_path, mesh, rules, dispatch), {}
    path = pathlib.Path(model_or_path)
    if not checkpoint.is_complete(path):
        raise FileNotFoundError(f"{flag or f'--model {str(path)!r}'}: not a moesaic checkpoint "
                                f"(want a folder with {checkpoint.META} and "
                                f"{checkpoint.PARAMS}/, e.g. a "
                                "pretrain, branch `model` or merge output)"
                                f"{checkpoint.inner_checkpoint_hint(path)}")
    meta = checkpoint.read_meta(path)
    if meta.get("kind") == "branch":  # branch_train.artifact.KIND
        raise ValueError(f"{flag or f'--model {str(path)!r}'}: a branch artifact holds only "
                         "the party's expert and router row, not a model; merge it over its "
                         "base to evaluate it (`moesaic merge --base B --branch "
                         f"{path} --router learned-rows --out M`)")
    cfg = checkpoint.model_config(meta).replace(dispatch=dispatch, scan_layers=True)
    expert_parallel.check_expert_axis(cfg.n_experts, mesh.shape["expert"], "the mesh")
    if mesh.shape["expert"] > 1:  # read onto the expert axis, never whole on one device
        cfg, flat = expert_parallel.load_merged(path, cfg, mesh, rules)
        return build_model(cfg, flat), meta
    model, meta = checkpoint.load(path, mesh=mesh, rules=rules, cfg=cfg, meta=meta)
    return _expert_parallel(model, mesh, rules, dispatch), meta


def _expert_parallel(model: Decoder, mesh, rules: Rules, dispatch: str) -> Decoder:
    """`model` with `dispatch`, its experts split over the mesh's expert axis (if any)."""
    if dispatch == "all_to_all" != model.cfg.dispatch:  # a Decoder keeps its own otherwise
        model = build_model(model.cfg.replace(dispatch=dispatch),
                            checkpoint.flatten(nnx.state(model)))
    if mesh.shape["expert"] == 1:
        return model
    return expert_parallel.shard_merged_model(model, mesh, rules)


def expert_names(model: Decoder, meta: Mapping) -> list[str]:
    """Labels of the experts: the merge's source names when the checkpoint has them."""
    experts = meta.get("experts")
    if isinstance(experts, list) and len(experts) == model.cfg.n_experts:
        return [str(e.get("source", i)) if isinstance(e, Mapping) else str(e)
                for i, e in enumerate(experts)]
    return [f"expert{i}" for i in range(model.cfg.n_experts)]


@functools.partial(jax.jit, static_argnums=0)
def _target_logprobs(graphdef, state, tokens_bt1):
    """Compiled once per (model structure, batch shape): models of one config share it. Also
    the greedy token after each input (the downstream tasks' exact match, eval/tasks.py)."""
    model = nnx.merge(graphdef, state)
    logits, aux = model(tokens_bt1[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens_bt1[:, 1:, None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return target_logp, aux["expert_token_share"], aux["expert_weight_per_token"], greedy


class ModelScorer:
    """Target log-probs of one model, jitted; inputs sharded over the mesh's batch axes.
    For an MoE model the stats are `token_share` and `weight_share`, (L, E) each."""

    def __init__(self, model: Decoder, *, mesh: jax.sharding.Mesh | None = None,
                 rules: Rules = DEFAULT_RULES, name: str = "model",
                 experts: Sequence[str] | None = None):
        self.cfg, self.name = model.cfg, name
        self.mesh, self.rules = mesh or local_mesh(), tuple(rules)
        self.experts = list(experts or [f"expert{i}" for i in range(model.cfg.n_experts)])
        self._graphdef, self._state = nnx.split(model)

    def __call__(self, tokens_bt1: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logp, stats, _ = self.with_greedy(tokens_bt1)
        return logp, stats

    def with_greedy(self, tokens_bt1: np.ndarray
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(target log-probs, stats, the argmax token after each input (B, T))."""
        tokens = np.asarray(tokens_bt1, np.int32)
        spec = logical_to_spec(("batch", "length"), self.rules, self.mesh, tokens.shape)
        with activate(self.mesh, self.rules):
            tokens = jax.device_put(tokens, NamedSharding(self.mesh, spec))
            logp, token_share, weight, greedy = _target_logprobs(self._graphdef, self._state,
                                                                 tokens)
        stats = {}
        if self.cfg.is_moe:
            stats = {"token_share": np.asarray(token_share), "weight_share": np.asarray(weight)}
        return np.asarray(logp), stats, np.asarray(greedy)

    @staticmethod
    def pooled(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Router weight per token, pooled over batches, as each expert's share per layer.
        Normalising per batch and then averaging would not be the domain's share: top-k weights
        that are not renormalised (`norm_topk_prob=False`) do not sum to 1 per token."""
        if "weight_share" not in stats:
            return stats
        weight = stats["weight_share"]
        return {**stats, "weight_share": weight / np.maximum(weight.sum(-1, keepdims=True), 1e-12)}


def domain_metrics(sum_logp: float, num_targets: int, num_bytes: int) -> dict[str, float]:
    """nll (nats/token), ppl and bpb from a summed target log-probability."""
    nll = -sum_logp / max(1, num_targets)
    bpb = -sum_logp / math.log(2) / num_bytes if num_bytes > 0 else float("nan")
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "bpb": bpb}


def score_sequences(scorer: Scorer, tokens_nt1: np.ndarray, *, batch_size: int,
                    desc: str = "", progress: bool = True) -> tuple[float, dict[str, np.ndarray]]:
    """(sum of target log-probs, stats averaged over batches weighted by targets). Batches are
    cut in order; the last one may be smaller (one more compile, nothing padded: padding rows
    would distort the routing shares)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    n, width = tokens_nt1.shape
    total, sums, weight = 0.0, {}, 0
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False,
                      dynamic_ncols=True):
        batch = tokens_nt1[start:start + batch_size]
        logp, stats = scorer(batch)
        total += float(np.sum(logp, dtype=np.float64))
        targets = batch.shape[0] * (width - 1)
        weight += targets
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64) * targets
    return total, {key: value / weight for key, value in sums.items()}


def evaluate_scorer(scorer: Scorer, data_dir: str | os.PathLike, sources: Iterable[str], *,
                    seq_len: int, max_sequences: int | None = None, batch_size: int = 8,
                    progress: bool = True, name: str = "") -> dict[str, dict]:
    """{source: {"nll", "ppl", "bpb", "tokens", "bytes", "sequences", "bytes_exact", **stats}}
    on each source's held-out split; stats (e.g. "routing") as the scorer reports them, as
    nested lists."""
    if seq_len < 1:
        raise ValueError(f"sequence length must be at least 1, got {seq_len}")
    out = {}
    for source in sources:
        held = heldout_sequences(data_dir, source, seq_len=seq_len, max_sequences=max_sequences)
        desc = f"{name}:{source}" if name else source
        sum_logp, stats = score_sequences(scorer, held.tokens, batch_size=batch_size, desc=desc,
                                          progress=progress)
        stats = getattr(scorer, "pooled", lambda pooled: pooled)(stats)
        metrics = domain_metrics(sum_logp, held.num_targets, held.num_bytes)
        metrics.update(tokens=held.num_targets, bytes=held.num_bytes,
                       sequences=int(held.tokens.shape[0]), bytes_exact=held.exact)
        if stats:
            metrics["routing"] = {key: value.tolist() for key, value in stats.items()}
            experts = getattr(scorer, "experts", None)
            if experts is not None:
                metrics["routing"]["experts"] = list(experts)
        out[source] = metrics
    return out


def prepared_sources(data_dir: str | os.PathLike) -> list[str]:
    """Every prepared source under DATA_DIR, in name order."""
    found = sorted(p.parent.name for p in pathlib.Path(data_dir).glob("*/manifest.json"))
    if not found:
        raise FileNotFoundError(f"--data {str(data_dir)!r}: no prepared sources; run "
                                "`moesaic data embedded --out DIR` or `moesaic data prepare`")
    return found


def evaluate(model_or_path: Decoder | str | os.PathLike, data_dir: str | os.PathLike,
             sources: Iterable[str] | None = None, *, seq_len: int,
             max_sequences: int | None = None, batch_size: int = 8,
             mesh: jax.sharding.Mesh | None = None, rules: Rules = DEFAULT_RULES,
             progress: bool = True, name: str = "", dispatch: str = "dropless"
             ) -> dict[str, dict]:
    """Per-domain held-out metrics of one model (a Decoder or a checkpoint path); see
    `evaluate_scorer`. For an MoE model each domain has "routing": {"token_share": [[share
    per expert] per layer], "weight_share": same, "experts": [names]}."""
    mesh = mesh or local_mesh()
    rules = expert_parallel.runtime_rules(rules, mesh)  # the batch over the expert axis too
    model, meta = load_model(model_or_path, mesh=mesh, rules=rules, dispatch=dispatch)
    sources = list(sources) if sources is not None else prepared_sources(data_dir)
    for source in sources:
        load_manifest(data_dir, source)
        check_tokenizer(model.cfg, pathlib.Path(data_dir) / source)
    scorer = ModelScorer(model, mesh=mesh, rules=rules, experts=expert_names(model, meta))
    return evaluate_scorer(scorer, data_dir, sources, seq_len=seq_len,
                           max_sequences=max_sequences, batch_size=batch_size,
                           progress=progress, name=name)
