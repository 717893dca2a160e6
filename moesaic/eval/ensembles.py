"""Ensembles of separately trained models at inference: BTM and c-BTM (baselines of FlexOlmo's
Table 1). Each is a scorer (see `moesaic.eval.perplexity`), so the same evaluator gives their
perplexity and bits per byte.

For target t of a sequence (predicting tokens[t+1] from tokens[:t+1]) the ensemble mixes the
experts' next-token distributions in probability space,

    log p(x_{t+1} | x_<=t) = logsumexp_j [ log w_j(t) + log p_j(x_{t+1} | x_<=t) ],

with weights w_j(t) that depend on the context only (never on the token being predicted),
kept for the `top_k` largest and renormalised to sum to 1.

- BTM (Li et al., 2022): w_j(t) = P(D=j | x_<=t) ∝ P(x_1..x_t | x_0, D=j) P(D=j), uniform
  prior: the likelihood each expert gave the sequence's earlier targets (an exclusive cumulative
  sum of its target log-probs). At t = 0 the weights are the prior, kept whole: experts tied
  with the k-th weight are all kept, so top-k never breaks a tie by expert order.
- c-BTM (Gururangan et al., 2023): w_j(t) = softmax_j(-|v(x_<=c) - mu_j|^2 / T), T = 0.1,
  where v is the L2-normalised TF-IDF vector (optionally through TruncatedSVD) of the decoded
  context and mu_j the mean vector of source j's training documents. Decision: the context is
  the causal prefix, refreshed every `stride` targets (c = stride * floor(t / stride)); the
  whole sequence would let the weights see the tokens being scored. A prefix with no TF-IDF
  feature (e.g. one byte) gets uniform weights.

The context of both is the packed sequence (documents joined by eos), the same context the
models themselves see. c-BTM decodes text (the router's training documents, the contexts) with
the data's tokenizer: a manifest names a Hugging Face tokenizer by its hash only, so it is
loaded from the experts' model.tokenizer (`experts_tokenizer`) and checked against the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy.special import logsumexp

from moesaic.data.loader import documents, load_manifest
from moesaic.data.tokenizer import (
    BYTES,
    Tokenizer,
    check_tokenizer,
    load_tokenizer,
    model_tokenizer_identity,
)
from moesaic.eval.perplexity import ModelScorer, load_model, local_mesh
from moesaic.model.transformer import Decoder

WeightFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def top_k_log_weights(log_w_jbt: np.ndarray, top_k: int) -> np.ndarray:
    """Keeps the `top_k` largest weights along axis 0, and every weight tied with the k-th
    (so equal weights, a prior with no evidence yet, stay uniform over all experts rather than
    falling to the first k), renormalised in log space; the others become -inf."""
    n = log_w_jbt.shape[0]
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k={top_k}: must be in [1, {n}] (the number of experts)")
    kth = -np.partition(-log_w_jbt, top_k - 1, axis=0)[top_k - 1]
    kept = np.where(log_w_jbt >= kth, log_w_jbt, -np.inf)
    return kept - logsumexp(kept, axis=0, keepdims=True)


def mix_logprobs(logp_jbt: np.ndarray, log_w_jbt: np.ndarray) -> np.ndarray:
    """log sum_j w_j p_j per target, in log space."""
    return logsumexp(log_w_jbt + logp_jbt, axis=0)


def btm_log_weights(logp_jbt: np.ndarray, log_prior_j: np.ndarray | None = None) -> np.ndarray:
    """Domain posterior log P(D=j | x_<=t) for every target t: prior plus the log-likelihood
    expert j gave targets 0..t-1 of the same sequence, normalised over j."""
    logp = np.asarray(logp_jbt, np.float64)
    n = logp.shape[0]
    prior = np.full(n, -np.log(n)) if log_prior_j is None else np.asarray(log_prior_j, np.float64)
    zero = np.zeros(logp.shape[:-1] + (1,))
    prefix = np.concatenate([zero, np.cumsum(logp, axis=-1)[..., :-1]], axis=-1)  # targets < t
    log_post = prior[:, None, None] + prefix
    return log_post - logsumexp(log_post, axis=0, keepdims=True)


class EnsembleScorer:
    """Mixes the experts' target log-probs with weights from `weight_fn(tokens_bt1, logp_jbt)
    -> log weights (J, B, T)`, cut to `top_k`. Its stats: "ensemble_weight", each expert's
    mean weight over the batch's targets."""

    def __init__(self, experts: Sequence[Callable], names: Sequence[str], weight_fn: WeightFn,
                 *, top_k: int, name: str = "ensemble"):
        if len(experts) != len(names) or not experts:
            raise ValueError(f"ensemble {name!r}: {len(experts)} experts for names {list(names)}")
        top_k_log_weights(np.zeros((len(experts), 1, 1)), top_k)  # validates top_k
        self.scorers, self.experts = list(experts), list(names)
        self.weight_fn, self.top_k, self.name = weight_fn, top_k, name

    def expert_logprobs(self, tokens_bt1: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(s(tokens_bt1)[0], np.float64) for s in self.scorers])

    def log_weights(self, tokens_bt1: np.ndarray, logp_jbt: np.ndarray | None = None
                    ) -> np.ndarray:
        logp = self.expert_logprobs(tokens_bt1) if logp_jbt is None else logp_jbt
        return top_k_log_weights(self.weight_fn(np.asarray(tokens_bt1), logp), self.top_k)

    def weights(self, tokens_bt1: np.ndarray) -> np.ndarray:
        """(J, B, T) mixing weights of every target (0 outside the top-k)."""
        return np.exp(self.log_weights(tokens_bt1))

    def __call__(self, tokens_bt1: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        logp = self.expert_logprobs(tokens_bt1)
        log_w = self.log_weights(tokens_bt1, logp)
        mean_w = np.exp(log_w).reshape(len(self.scorers), -1).mean(axis=1)
        return mix_logprobs(logp, log_w), {"ensemble_weight": mean_w}


def load_experts(experts: Mapping[str, object], *, mesh=None, data_dir=None,
                 sources: Iterable[str] = ()) -> dict[str, Decoder]:
    """{name: Decoder} from {name: Decoder or checkpoint path}; a bad path is an error naming
    `--expert NAME=PATH`. With `data_dir`, every expert is checked against the tokenizer of
    each of `sources` there, as `perplexity.evaluate` checks its one model."""
    mesh = mesh or local_mesh()
    # Each manifest read once (a missing source is named here), then checked per expert.
    manifests = [load_manifest(data_dir, s) for s in sources] if data_dir is not None else []
    models = {}
    for name, model_or_path in experts.items():
        model, _ = load_model(model_or_path, mesh=mesh, flag=f"--expert {name}={model_or_path}")
        for manifest in manifests:
            try:
                check_tokenizer(model.cfg, manifest)
            except ValueError as e:
                raise ValueError(f"--expert {name}: {e}") from None
        models[name] = model
    return models


def experts_tokenizer(models: Mapping[str, Decoder]) -> Tokenizer:
    """The one tokenizer the experts read (their model.tokenizer), loaded: the manifests name
    it by hash only, and c-BTM must decode the data's ids with it."""
    specs = {name: m.cfg.tokenizer or "bytes" for name, m in models.items()}
    loaded = {spec: load_tokenizer(spec) for spec in set(specs.values())}
    identities = {name: loaded[spec].identity for name, spec in specs.items()}
    if len(set(identities.values())) > 1:
        raise ValueError(f"the ensemble's experts read different tokenizers: {identities}")
    return loaded[next(iter(specs.values()))]


def _expert_scorers(experts: Mapping[str, object], mesh) -> list[ModelScorer]:
    mesh = mesh or local_mesh()
    return [ModelScorer(model, mesh=mesh, name=name)
            for name, model in load_experts(experts, mesh=mesh).items()]


def btm(experts: Mapping[str, object], *, top_k: int = 1, mesh=None) -> EnsembleScorer:
    """BTM over {name: Decoder or checkpoint path} (dense experts in the paper; any model
    works) with a uniform prior."""
    return EnsembleScorer(_expert_scorers(experts, mesh), list(experts),
                          lambda tokens, logp: btm_log_weights(logp), top_k=top_k, name="btm")


class TfidfCentroids:
    """The c-BTM router: a TF-IDF space (sublinear tf, then TruncatedSVD to `svd_components`
    dimensions unless None) fitted on all sources' training text together, and one unit-length
    centroid per source (the normalised mean of its documents' normalised vectors, so
    d^2 = 2 - 2 cos). Measured on the embedded corpora (the first 64 held-out sequences of 128 bytes
    per domain, prefixes of 33+ bytes): the own source is the top-1 choice for 82% (code), 83%
    (prose), 94% (law) and 100% (math) of targets with these defaults; without SVD and
    with unnormalised centroids the weights were nearly flat at T = 0.1. `tokenizer` turns
    token ids back into text for `cbtm_log_weights` (from_data: the data's)."""

    def __init__(self, texts_by_source: Mapping[str, Sequence[str]], *,
                 svd_components: int | None = 100, temperature: float = 0.1, seed: int = 0,
                 tokenizer: Tokenizer = BYTES, **vectorizer_kwargs):
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        empty = [s for s, texts in texts_by_source.items() if not texts]
        if not texts_by_source or empty:
            raise ValueError(f"c-BTM: every source needs training text (empty: {empty})")
        if temperature <= 0:
            raise ValueError(f"c-BTM temperature={temperature}: must be positive")
        self.sources, self.temperature = list(texts_by_source), float(temperature)
        self.tokenizer = tokenizer
        corpus = [t for texts in texts_by_source.values() for t in texts]
        self.vectorizer = TfidfVectorizer(sublinear_tf=True, **vectorizer_kwargs).fit(corpus)
        self.svd = None
        if svd_components:
            features = len(self.vectorizer.vocabulary_)
            self.svd = TruncatedSVD(min(svd_components, max(1, features - 1)), random_state=seed)
            self.svd.fit(self.vectorizer.transform(corpus))
        means = np.stack([self.embed(texts).mean(axis=0) for texts in texts_by_source.values()])
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        self.centroids = np.where(norms > 0, means / np.maximum(norms, 1e-12), 0.0)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, F) L2-normalised vectors (rows with no known feature stay 0)."""
        x = self.vectorizer.transform(list(texts))
        x = self.svd.transform(x) if self.svd is not None else x.toarray()
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.where(norms > 0, x / np.maximum(norms, 1e-12), 0.0)

    def log_weights(self, texts: Sequence[str]) -> np.ndarray:
        """(N, J) log softmax(-d^2 / T) over sources; uniform for a text with no feature."""
        v = self.embed(texts)
        d2 = ((v[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        logits = np.where(np.any(v != 0, axis=1, keepdims=True), -d2 / self.temperature, 0.0)
        return logits - logsumexp(logits, axis=1, keepdims=True)

    @classmethod
    def from_data(cls, data_dir: str | os.PathLike, sources: Iterable[str], *,
                  tokenizer: Tokenizer | None = None, max_documents: int | None = 2000,
                  **kwargs) -> TfidfCentroids:
        """Fitted on the first `max_documents` training documents of each prepared source,
        decoded with `tokenizer` (checked against each manifest; default: the byte tokenizer,
        which only byte data accepts: for other data pass `experts_tokenizer(models)`)."""
        sources = list(sources)
        want = (tokenizer or BYTES).identity
        for s in sources:
            have = load_manifest(data_dir, s)["tokenizer"]["identity"]
            if have != want:
                fix = ("pass the data's tokenizer (tokenizer=experts_tokenizer(models))"
                       if tokenizer is None else f"the tokenizer given is {want!r}")
                raise ValueError(f"c-BTM: source {s!r} was tokenized with {have!r}; {fix}")
        tokenizer = tokenizer or BYTES
        texts = {s: [tokenizer.decode(doc) for doc in documents(data_dir, s, "train",
                                                                 max_documents)]
                 for s in sources}
        return cls(texts, tokenizer=tokenizer, **kwargs)


def decode_context(tokens: np.ndarray, tokenizer: Tokenizer) -> str:
    """Text of a token prefix; documents joined by eos become lines."""
    tokens = np.asarray(tokens)
    cuts = np.flatnonzero(tokens == tokenizer.eos_id)
    pieces = np.split(tokens, cuts)
    return "\n".join(tokenizer.decode(p[p != tokenizer.eos_id]) for p in pieces)


def cbtm_log_weights(router: TfidfCentroids, tokens_bt1: np.ndarray, *, stride: int = 16,
                     tokenizer: Tokenizer | None = None) -> np.ndarray:
    """(J, B, T) log weights: target t uses the prefix tokens[:c + 1], c = stride*(t//stride),
    decoded with `tokenizer` (default: the router's)."""
    if stride < 1:
        raise ValueError(f"c-BTM stride={stride}: must be at least 1")
    tokenizer = router.tokenizer if tokenizer is None else tokenizer
    b, width = tokens_bt1.shape
    t = width - 1
    checkpoints = list(range(0, t, stride))
    texts = [decode_context(tokens_bt1[i, :c + 1], tokenizer) for i in range(b)
             for c in checkpoints]
    log_w = router.log_weights(texts).reshape(b, len(checkpoints), -1)  # (B, C, J)
    per_target = np.repeat(log_w, stride, axis=1)[:, :t]  # (B, T, J)
    return np.transpose(per_target, (2, 0, 1))


def cbtm(experts: Mapping[str, object], router: TfidfCentroids, *, top_k: int = 1,
         stride: int = 16, tokenizer: Tokenizer | None = None, mesh=None) -> EnsembleScorer:
    """c-BTM over {source: Decoder or checkpoint path}; the router's sources must be the same
    names (any order). Contexts are decoded with `tokenizer` (default: the router's), which
    every expert must read."""
    missing = [s for s in experts if s not in router.sources]
    if missing:
        raise ValueError(f"c-BTM: experts {missing} have no centroid; the router was fitted on "
                         f"{router.sources}")
    order = [router.sources.index(s) for s in experts]
    tokenizer = router.tokenizer if tokenizer is None else tokenizer
    scorers = _expert_scorers(experts, mesh)
    wrong = {s.name: i for s in scorers
             if (i := model_tokenizer_identity(s.cfg)) != tokenizer.identity}
    if wrong:
        raise ValueError(f"c-BTM: contexts are decoded with {tokenizer.identity!r} but experts "
                         f"read {wrong}; fit the router with TfidfCentroids.from_data(..., "
                         "tokenizer=experts_tokenizer(models))")

    def weight_fn(tokens, logp):
        return cbtm_log_weights(router, tokens, stride=stride, tokenizer=tokenizer)[order]

    return EnsembleScorer(scorers, list(experts), weight_fn, top_k=top_k, name="cbtm")
