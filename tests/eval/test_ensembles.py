"""The BTM and c-BTM ensembles: their weights on constructed cases, the mixture in
probability space, and `moesaic eval --ensemble` on data of a Hugging Face tokenizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moesaic.data.loader import heldout_sequences
from moesaic.eval import ensembles, perplexity
from moesaic.model import checkpoint
from tests.support.evaluation import SEQ, tiny, uniform_model
from tests.support.training import make_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("ensemble_data"))


# --- BTM ---------------------------------------------------------------------------------------

def test_btm_posterior_follows_the_prefix_likelihood():
    t = 6
    logp = np.stack([np.full((1, t), -0.1), np.full((1, t), -5.0), np.full((1, t), -3.0)])
    w = np.exp(ensembles.btm_log_weights(logp))
    np.testing.assert_allclose(w[:, 0, 0], 1 / 3)  # no prefix yet: the uniform prior
    # at target t the prefix holds t targets: posterior ∝ exp(t * logp_j)
    for step in range(t):
        want = np.exp(step * logp[:, 0, 0]) / np.exp(step * logp[:, 0, 0]).sum()
        np.testing.assert_allclose(w[:, 0, step], want, rtol=1e-9)
    assert w[0, 0, -1] > 0.999999
    kept = np.exp(ensembles.top_k_log_weights(ensembles.btm_log_weights(logp), 2))
    assert np.all(kept[1, :, 1:] == 0.0)  # the worst expert is cut from top-2 ...
    np.testing.assert_allclose(kept.sum(axis=0), 1.0)  # ... and the rest renormalised
    # at t = 0 the prior ties all three: top-k keeps every expert tied with the k-th, so the
    # first target is scored by all of them alike, not by whichever come first in the list
    np.testing.assert_allclose(kept[:, 0, 0], 1 / 3)
    top1 = np.exp(ensembles.top_k_log_weights(ensembles.btm_log_weights(logp), 1))
    np.testing.assert_allclose(top1[:, 0, 0], 1 / 3)
    np.testing.assert_array_equal(top1[0, :, 1:], 1.0)
    # a tie below the top is cut like any other weight; one at the cut keeps both
    w = np.log(np.array([0.5, 0.2, 0.2, 0.1]))[:, None, None]
    np.testing.assert_allclose(np.exp(ensembles.top_k_log_weights(w, 1))[:, 0, 0], [1, 0, 0, 0])
    np.testing.assert_allclose(np.exp(ensembles.top_k_log_weights(w, 2))[:, 0, 0],
                               [5 / 9, 2 / 9, 2 / 9, 0])


def test_ensemble_mixes_in_probability_space():
    tokens = np.zeros((2, 5), np.int32)
    experts = [lambda x: (np.full((2, 4), math.log(0.5)), {}),
               lambda x: (np.full((2, 4), math.log(0.1)), {})]

    def fixed_weights(tokens, logp):
        return np.log(np.broadcast_to(np.array([0.25, 0.75])[:, None, None], logp.shape))

    scorer = ensembles.EnsembleScorer(experts, ["a", "b"], fixed_weights, top_k=2)
    logp, stats = scorer(tokens)
    np.testing.assert_allclose(logp, math.log(0.25 * 0.5 + 0.75 * 0.1))
    np.testing.assert_allclose(stats["ensemble_weight"], [0.25, 0.75])
    top1 = ensembles.EnsembleScorer(experts, ["a", "b"], fixed_weights, top_k=1)
    np.testing.assert_allclose(top1(tokens)[0], math.log(0.1))
    with pytest.raises(ValueError, match="top_k=3"):
        ensembles.EnsembleScorer(experts, ["a", "b"], fixed_weights, top_k=3)


def test_btm_of_identical_models_equals_the_model(data_dir):
    model = tiny(seed=2)
    alone = perplexity.evaluate(model, data_dir, ["code"], seq_len=SEQ, max_sequences=8,
                                batch_size=4, progress=False)["code"]
    btm = ensembles.btm({"x": model, "y": model}, top_k=2)
    tokens = heldout_sequences(data_dir, "code", seq_len=SEQ, max_sequences=4).tokens
    np.testing.assert_allclose(btm.weights(tokens), 0.5, rtol=1e-6)
    m = perplexity.evaluate_scorer(btm, data_dir, ["code"], seq_len=SEQ, max_sequences=8,
                                   batch_size=4, progress=False)["code"]
    assert m["nll"] == pytest.approx(alone["nll"], rel=1e-6)
    assert m["routing"]["experts"] == ["x", "y"]


def test_btm_prefers_the_expert_that_explains_the_prefix(data_dir):
    """Expert 'good' is the uniform model; 'bad' is confidently wrong almost everywhere."""
    bad = tiny(seed=8)
    bad.lm_head[...] = bad.lm_head[...] * 250.0  # random, very peaked next-token guesses
    btm = ensembles.btm({"bad": bad, "good": uniform_model()}, top_k=1)
    tokens = heldout_sequences(data_dir, "code", seq_len=SEQ, max_sequences=4).tokens
    w = btm.weights(tokens)
    np.testing.assert_allclose(w[:, :, 0], 0.5)  # no prefix yet: the prior, tied, kept whole
    assert set(np.unique(w[:, :, 1:])) == {0.0, 1.0}  # top-1
    assert w[1, :, 1:].mean() > 0.95  # once the prefix has a target: 'good'
    m = perplexity.evaluate_scorer(btm, data_dir, ["code"], seq_len=SEQ, max_sequences=4,
                                   batch_size=4, progress=False)["code"]
    assert m["routing"]["ensemble_weight"][1] > 0.9


# --- c-BTM -------------------------------------------------------------------------------------

TEXTS = {
    "code": ["def load(path):\n    return open(path).read()", "for item in items:\n    print(item)",
             "class Reader:\n    def read(self):\n        return self.data",
             "import os\nreturn os.path.join(root, name)"],
    "math": ["What is 12 plus 7? The answer is 19.", "Compute 8 times 6. The answer is 48.",
             "What is 30 minus 4? The answer is 26.", "Add 5 and 9. The sum is 14."],
}


@pytest.mark.parametrize("svd", [None, 4])
def test_cbtm_picks_the_source_whose_text_matches(svd):
    router = ensembles.TfidfCentroids(TEXTS, svd_components=svd)
    w = np.exp(router.log_weights(["def read(self):\n    return open(path)",
                                   "What is 3 plus 4? The answer is 7.", "!!"]))
    assert router.sources == ["code", "math"]
    assert w[0, 0] > 0.95 and w[1, 1] > 0.95
    np.testing.assert_allclose(w[2], 0.5)  # no known feature: uniform
    np.testing.assert_allclose(w.sum(axis=1), 1.0)


def test_cbtm_weights_use_the_causal_prefix():
    router = ensembles.TfidfCentroids(TEXTS)
    text = "def read(self):\n    return self.data  # math: what is 12 plus 7? The answer is 19."
    tokens = np.frombuffer(text.encode(), np.uint8).astype(np.int32)[None, :33]  # T = 32
    log_w = ensembles.cbtm_log_weights(router, tokens, stride=8)
    assert log_w.shape == (2, 1, 32)
    w = np.exp(log_w)
    np.testing.assert_allclose(w[:, 0, :8], 0.5)  # prefix "d": no feature yet
    assert np.all(w[0, 0, 8:] > 0.9)  # "def read(" onwards: code
    np.testing.assert_array_equal(w[:, 0, 8:16], w[:, 0, 8:9].repeat(8, axis=1))  # per stride
    # the weights never look past the prefix: changing later tokens leaves them unchanged
    changed = tokens.copy()
    changed[0, 20:] = ord("7")
    np.testing.assert_array_equal(ensembles.cbtm_log_weights(router, changed, stride=8)[..., :20],
                                  log_w[..., :20])


def test_cbtm_ensemble_on_prepared_data(data_dir):
    router = ensembles.TfidfCentroids.from_data(data_dir, ["code", "math"],
                                                analyzer="char_wb", ngram_range=(1, 2))
    # experts given in the other order than the router's sources
    scorer = ensembles.cbtm({"math": tiny(seed=4), "code": tiny(seed=5)}, router, top_k=1,
                            stride=4)
    tokens = heldout_sequences(data_dir, "math", seq_len=SEQ, max_sequences=4).tokens
    w = scorer.weights(tokens)
    assert w.shape == (2, 4, SEQ)
    # top-1, except where the context has no feature yet: both tied, both kept at 0.5
    tied = w.min(axis=0) == 0.5
    assert set(np.unique(w[:, ~tied])) <= {0.0, 1.0} and np.all(w[:, tied] == 0.5)
    assert w[0, :, 4:].mean() > 0.9  # math text goes to the math expert


# --- ensembles on data of a Hugging Face tokenizer ---------------------------------------------

HF_WORDS = {"code": "def return import class self print open read path items".split(),
            "math": "plus minus times answer sum number equals twelve seven nine".split()}


@pytest.fixture(scope="module")
def hf_experts(tmp_path_factory):
    """Sources code and math tokenized with a word-level HF tokenizer (ids 3.., which decoded
    as bytes are control characters), and one expert checkpoint per source reading it."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from moesaic.data.prepare import write_source
    from moesaic.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("hf_ensemble")
    rng = random.Random(0)
    docs = {s: [" ".join(rng.choice(words) for _ in range(rng.randint(15, 30)))
                for _ in range(24)] for s, words in HF_WORDS.items()}
    hf = Tokenizer(models.WordLevel(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator([d for ds in docs.values() for d in ds],
                           trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>", "<pad>"]))
    hf.save(str(root / "tokenizer.json"))
    tok = load_tokenizer(root / "tokenizer.json")
    for source, ds in docs.items():
        write_source(root / "data", source, {"train": lambda d=ds: d[4:],
                                             "heldout": lambda d=ds: d[:4]},
                     tokenizer=tok, origin={"kind": "test"})
    for seed, source in enumerate(HF_WORDS):
        model = tiny(seed=seed, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                     pad_id=tok.pad_id, tokenizer=str(root / "tokenizer.json"))
        checkpoint.save_model(root / source, model, {"config": {"data": {"seq_len": SEQ}}})
    return root, tok


def _eval_ensemble(root, kind: str, *experts: str, data=None) -> list[str]:
    return ["eval", "--ensemble", kind, *(a for e in experts for a in ("--expert", e)),
            "--data", str(data or root / "data"), "--max-sequences", "4", "--batch-size", "4",
            "--stride", "4", "--no-progress"]


def test_cli_cbtm_decodes_with_the_data_tokenizer(hf_experts, tmp_path):
    """Before, contexts and centroids were decoded as bytes: control characters, no TF-IDF
    feature at all."""
    from moesaic.cli.main import main

    root, tok = hf_experts
    argv = _eval_ensemble(root, "cbtm", f"code={root / 'code'}", f"math={root / 'math'}")
    assert main([*argv, "--json", str(tmp_path / "out.json")]) == 0
    domains = json.loads((tmp_path / "out.json").read_text())["domains"]
    for own, source in enumerate(HF_WORDS):  # each domain's text goes to its own expert
        assert domains[source]["routing"]["experts"] == ["code", "math"]
        assert domains[source]["routing"]["ensemble_weight"][own] > 0.8

    router = ensembles.TfidfCentroids.from_data(root / "data", ["code", "math"], tokenizer=tok)
    assert router.tokenizer.identity == tok.identity and "plus" in router.vectorizer.vocabulary_
    with pytest.raises(ValueError, match=r"source 'code' was tokenized with 'hf:.*'; pass"):
        ensembles.TfidfCentroids.from_data(root / "data", ["code", "math"])
    with pytest.raises(ValueError, match=r"contexts are decoded with 'hf:.*' but experts read "
                                         r"\{'code': 'bytes'\}"):
        ensembles.cbtm({"code": tiny(), "math": str(root / "math")}, router)


def test_cli_ensemble_checks_each_expert_against_the_data(hf_experts, tmp_path, capsys):
    from moesaic.cli.main import main

    root, _ = hf_experts
    checkpoint.save_model(tmp_path / "bytes", tiny(), {"config": {"data": {"seq_len": SEQ}}})
    for kind in ("btm", "cbtm"):
        argv = _eval_ensemble(root, kind, f"code={tmp_path / 'bytes'}", f"math={root / 'math'}")
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--expert code: data source" in err and "was tokenized with 'hf:" in err


def test_cli_ensemble_names_the_expert_with_a_bad_path(hf_experts, capsys):
    from moesaic.cli.main import main

    root, _ = hf_experts
    argv = _eval_ensemble(root, "btm", "code=/nonexistent/ckpt", f"math={root / 'math'}")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--expert code=/nonexistent/ckpt: not a moesaic checkpoint" in err
    assert "--model" not in err


def test_cli_ensemble_of_experts_with_different_lengths_needs_seq_len(data_dir, tmp_path,
                                                                      capsys):
    from moesaic.cli.main import main

    for name, length in (("a", SEQ), ("b", 2 * SEQ)):
        checkpoint.save_model(tmp_path / name, tiny(), {"config": {"data": {"seq_len": length}}})
    argv = ["eval", "--ensemble", "btm", "--expert", f"code={tmp_path / 'a'}", "--expert",
            f"math={tmp_path / 'b'}", "--data", str(data_dir), "--sources", "code",
            "--max-sequences", "4", "--batch-size", "4", "--no-progress"]
    assert main(argv) == 2
    assert "different data.seq_len {'code': 16, 'math': 32}; pass --seq-len" in (
        capsys.readouterr().err)
    assert main([*argv, "--seq-len", str(SEQ)]) == 0
