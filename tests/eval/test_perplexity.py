"""Evaluation: perplexity and bits per byte against hand computations, routing shares,
the report files and `moesaic eval` (the ensembles are in test_ensembles.py)."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moesaic.data.loader import heldout_sequences
from moesaic.eval import perplexity, report
from moesaic.model import checkpoint
from moesaic.model.transformer import token_nll
from tests.support.evaluation import MOE, SEQ, tiny, uniform_model
from tests.support.processes import last_json_line, run_python
from tests.support.training import make_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("eval_data"))


# --- perplexity and bits per byte -------------------------------------------------------------

def test_uniform_model_gives_log_vocab_and_exact_bits_per_byte(data_dir):
    results = perplexity.evaluate(uniform_model(), data_dir, ["code", "math"], seq_len=SEQ,
                                  max_sequences=8, batch_size=4, progress=False)
    for source in ("code", "math"):
        held = heldout_sequences(data_dir, source, seq_len=SEQ, max_sequences=8)
        targets = held.tokens[:, 1:]
        text_bytes = int((targets < 256).sum())  # byte tokenizer: one byte per non-eos target
        m = results[source]
        assert m["tokens"] == targets.size and m["bytes"] == text_bytes and m["bytes_exact"]
        assert m["nll"] == pytest.approx(math.log(264), rel=1e-6)
        assert m["ppl"] == pytest.approx(264.0, rel=1e-5)
        assert m["bpb"] == pytest.approx(targets.size * math.log(264) / math.log(2) / text_bytes,
                                         rel=1e-6)
        assert "routing" not in m  # dense model


def test_evaluate_matches_direct_forward(data_dir):
    model = tiny(seed=3)
    held = heldout_sequences(data_dir, "code", seq_len=SEQ, max_sequences=7)
    logits, _ = model(jnp.asarray(held.tokens[:, :-1]))
    nll = np.asarray(token_nll(logits, jnp.asarray(held.tokens[:, 1:])), np.float64)
    m = perplexity.evaluate(model, data_dir, ["code"], seq_len=SEQ, max_sequences=7,
                            batch_size=4, progress=False)["code"]  # batches 4, 3
    assert m["sequences"] == 7
    assert m["nll"] == pytest.approx(nll.mean(), rel=1e-5)
    assert m["bpb"] == pytest.approx(nll.sum() / math.log(2) / held.num_bytes, rel=1e-5)


def test_hand_computed_case_with_a_controlled_scorer(data_dir):
    """p(target) = 1/2 when the target is byte 'a', else 1/8: nll, ppl and bpb by hand."""
    def scorer(tokens):
        return np.where(tokens[:, 1:] == ord("a"), math.log(0.5), math.log(0.125)), {}

    held = heldout_sequences(data_dir, "public", seq_len=SEQ)
    targets = held.tokens[:, 1:]
    n_a = int((targets == ord("a")).sum())
    nats = n_a * math.log(2) + (targets.size - n_a) * math.log(8)
    m = perplexity.evaluate_scorer(scorer, data_dir, ["public"], seq_len=SEQ, batch_size=4,
                                   progress=False)["public"]
    assert n_a > 0
    assert m["nll"] == pytest.approx(nats / targets.size, rel=1e-12)
    assert m["ppl"] == pytest.approx(math.exp(nats / targets.size), rel=1e-12)
    bits = n_a * 1 + (targets.size - n_a) * 3
    assert m["bpb"] == pytest.approx(bits / held.num_bytes, rel=1e-12)


def test_routing_shares_aggregate_over_batches(data_dir):
    model = tiny(seed=1, **MOE)
    held = heldout_sequences(data_dir, "math", seq_len=SEQ, max_sequences=9)
    _, aux = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(held.tokens[:, :-1]))  # one batch
    m = perplexity.evaluate(model, data_dir, ["math"], seq_len=SEQ, max_sequences=9,
                            batch_size=4, progress=False)["math"]  # batches 4, 4, 1
    token_share = np.asarray(m["routing"]["token_share"])
    weight_share = np.asarray(m["routing"]["weight_share"])
    assert token_share.shape == weight_share.shape == (2, 3)
    np.testing.assert_allclose(token_share.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weight_share.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(token_share, np.asarray(aux["expert_token_share"]), atol=1e-6)
    np.testing.assert_allclose(weight_share, np.asarray(aux["expert_weight_share"]), atol=1e-5)
    assert m["routing"]["experts"] == ["expert0", "expert1", "expert2"]
    assert m["tokens"] == 9 * SEQ


def test_router_weight_share_does_not_depend_on_the_batch_size(data_dir):
    """Top-k weights that are not renormalised do not sum to 1 per token: the share is pooled
    over the domain's tokens, not averaged over per-batch shares."""
    model = tiny(seed=2, n_experts=3, top_k=2, norm_topk_prob=False)
    held = heldout_sequences(data_dir, "math", seq_len=SEQ, max_sequences=9)
    _, aux = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(held.tokens[:, :-1]))  # one batch
    per_token = np.asarray(aux["expert_weight_per_token"])
    assert np.all(per_token.sum(axis=1) < 0.999)  # the case that matters
    for batch_size in (9, 4, 2):
        share = perplexity.evaluate(model, data_dir, ["math"], seq_len=SEQ, max_sequences=9,
                                    batch_size=batch_size, progress=False)["math"]
        np.testing.assert_allclose(share["routing"]["weight_share"],
                                   per_token / per_token.sum(axis=1, keepdims=True), atol=1e-6)


def test_a_checkpoint_trained_with_capacity_dispatch_is_evaluated_dropless(data_dir, tmp_path):
    model = tiny(seed=4, **MOE, dispatch="capacity", capacity_factor=0.5)  # drops tokens
    checkpoint.save_model(tmp_path / "cap", model, {})
    got = perplexity.evaluate(tmp_path / "cap", data_dir, ["math"], seq_len=SEQ,
                              max_sequences=4, batch_size=4, progress=False)["math"]
    dropless = tiny(seed=4, **MOE)  # the same weights, every token served
    want = perplexity.evaluate(dropless, data_dir, ["math"], seq_len=SEQ, max_sequences=4,
                               batch_size=4, progress=False)["math"]
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-6)
    capped = perplexity.evaluate(model, data_dir, ["math"], seq_len=SEQ, max_sequences=4,
                                 batch_size=4, progress=False)["math"]
    assert capped["nll"] != pytest.approx(want["nll"], rel=1e-4)  # what it would have seen


def test_a_checkpoint_trained_unrolled_is_evaluated_scanned(data_dir, tmp_path):
    """An unrolled layer loop pays only in a training step; evaluation compiles the scan."""
    checkpoint.save_model(tmp_path / "loop", tiny(seed=4, **MOE, scan_layers=False), {})
    loaded, _ = perplexity.load_model(tmp_path / "loop")
    assert loaded.cfg.scan_layers
    kw = dict(seq_len=SEQ, max_sequences=4, batch_size=4, progress=False)
    got = perplexity.evaluate(tmp_path / "loop", data_dir, ["math"], **kw)["math"]
    want = perplexity.evaluate(tiny(seed=4, **MOE, scan_layers=False), data_dir, ["math"],
                               **kw)["math"]
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-6)


def test_missing_source_is_an_error_naming_it(data_dir):
    with pytest.raises(FileNotFoundError, match="law"):
        perplexity.evaluate(uniform_model(), data_dir, ["law"], seq_len=SEQ, progress=False)


# --- report ------------------------------------------------------------------------------------

def test_report_files_and_structure(tmp_path):
    routing = {"token_share": [[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]],
               "weight_share": [[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]],
               "experts": ["public", "code", "math"]}
    results = {"systems": {
        "public": {"code": {"bpb": 2.0, "ppl": 4.0, "nll": 1.38, "tokens": 100},
                   "math": {"bpb": 3.0, "ppl": 8.0, "nll": 2.07, "tokens": 100}},
        "merged": {"code": {"bpb": 1.5, "ppl": 3.0, "nll": 1.1, "routing": routing},
                   "math": {"bpb": 2.5, "ppl": 6.0, "nll": 1.8, "routing": routing}},
    }, "domains": ["math", "code"]}
    out = report.write_report(tmp_path, results, title="Test", notes=["The merge wins."])
    data = json.loads((tmp_path / "report.json").read_text())
    assert data == json.loads(json.dumps(out))
    assert data["domains"] == ["math", "code"]
    assert data["systems"]["public"]["avg"] == {"bpb": 2.5, "ppl": 6.0}
    assert data["systems"]["merged"]["math"] == {"bpb": 2.5, "ppl": 6.0, "nll": 1.8}
    assert data["systems"]["public"]["code"]["tokens"] == 100
    assert data["routing"]["merged"]["code"]["token_share"] == routing["token_share"]
    assert data["plots"] == ["bpb_by_domain.png", "bpb_avg.png", "routing_merged.png"]
    for name in data["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Test\n\nThe merge wins.")
    assert "| system | math | code | avg |" in md
    assert "| merged | **2.5000** | **1.5000** | **2.0000** |" in md
    assert "| public | 3.0000 | 2.0000 | 2.5000 |" in md
    with pytest.raises(ValueError, match="lacks"):
        report.write_report(tmp_path, {"systems": {"x": {"code": {"ppl": 1.0}}}})


def test_report_averages_only_over_the_domains_asked_and_only_when_all_are_there(tmp_path):
    def row(*bpbs):
        return {d: {"bpb": b, "ppl": 2 ** b} for d, b in zip(("code", "math", "public"), bpbs)}

    results = {"systems": {"public": row(2.0, 3.0, 1.0), "merged": row(1.5, 2.5, 1.2),
                           "oracle": {"code": {"bpb": 1.0, "ppl": 2.0}}}}
    out = report.write_report(tmp_path, results, average_over=["code", "math"],
                              bar_systems=["merged", "public"])
    assert out["average_over"] == ["code", "math"]
    assert out["systems"]["public"]["avg"]["bpb"] == 2.5  # not 2.0: public text left out
    assert out["systems"]["merged"]["avg"]["bpb"] == 2.0
    assert "avg" not in out["systems"]["oracle"]  # an average over less text is not shown
    md = (tmp_path / "report.md").read_text()
    assert "| oracle | **1.0000** | – | – | – |" in md
    assert "| merged | 1.5000 | **2.5000** | 1.2000 | **2.0000** |" in md
    assert "mean of the code, math columns" in md
    assert (tmp_path / "bpb_avg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nan = {"systems": {"diverged": row(math.nan, math.nan, math.nan), **results["systems"]}}
    report.write_report(tmp_path / "nan", nan, average_over=["code", "math"])
    md = (tmp_path / "nan" / "report.md").read_text()
    assert "| diverged | nan | nan | nan | nan |" in md  # listed first, yet the best stays bold
    assert "| merged | 1.5000 | **2.5000** | 1.2000 | **2.0000** |" in md
    with pytest.raises(ValueError, match="average_over"):
        report.write_report(tmp_path / "x", results, average_over=["law"])
    with pytest.raises(ValueError, match=r"bar_systems: no results for \['BTM'\]"):
        report.write_report(tmp_path / "y", results, bar_systems=["BTM"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- the command and several devices -----------------------------------------------------------

def test_cli_eval_writes_json(data_dir, tmp_path, capsys):
    from moesaic.cli.main import main

    model = tiny(seed=6, **MOE)
    checkpoint.save_model(tmp_path / "ckpt", model, {"config": {"data": {"seq_len": SEQ}}})
    code = main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(data_dir),
                 "--sources", "code,math", "--max-sequences", "5", "--batch-size", "4",
                 "--json",
                 str(tmp_path / "out.json"), "--no-progress"])
    assert code == 0
    out = json.loads((tmp_path / "out.json").read_text())
    direct = perplexity.evaluate(model, data_dir, ["code", "math"], seq_len=SEQ,
                                 max_sequences=5, batch_size=4, progress=False)
    assert out["seq_len"] == SEQ and list(out["domains"]) == ["code", "math"]
    for source in ("code", "math"):
        assert out["domains"][source]["bpb"] == pytest.approx(direct[source]["bpb"], rel=1e-6)
    assert out["average"]["bpb"] == pytest.approx(
        (direct["code"]["bpb"] + direct["math"]["bpb"]) / 2, rel=1e-6)
    assert "layer  1:" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--data", str(data_dir)]) == 2
    assert "not a moesaic checkpoint" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(data_dir),
                 "--expert", f"a={tmp_path / 'ckpt'}"]) == 2
    assert "add --ensemble" in capsys.readouterr().err
    for flag, value in (("--batch-size", "0"), ("--batch-size", "-1"), ("--seq-len", "-1"),
                        ("--max-sequences", "0"), ("--top-k", "x")):
        with pytest.raises(SystemExit):  # argparse: exit 2, naming the flag
            main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(data_dir),
                  flag, value])
        assert f"argument {flag}:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        perplexity.score_sequences(lambda t: (np.zeros(t.shape), {}), np.zeros((2, 5), int),
                                   batch_size=0)


def test_cli_eval_refuses_what_it_would_ignore_or_cannot_score(data_dir, tmp_path, capsys):
    from moesaic.branch_train import artifact
    from moesaic.cli.main import main

    checkpoint.save_model(tmp_path / "code", tiny(seed=6), {"config": {"data": {"seq_len": SEQ}}})
    checkpoint.save_model(tmp_path / "math", tiny(seed=7), {"config": {"data": {"seq_len": SEQ}}})
    data = ["--data", str(data_dir), "--max-sequences", "2", "--no-progress"]
    cases = [
        (["--model", str(tmp_path / "code"), "--top-k", "2"],
         "--top-k set an ensemble (--ensemble); an MoE --model routes with the top_k"),
        (["--ensemble", "btm", "--expert", f"code={tmp_path / 'code'}", "--expert",
          f"math={tmp_path / 'math'}", "--stride", "4"], "--stride is c-BTM's"),
        (["--ensemble", "cbtm", "--expert", f"kode={tmp_path / 'code'}", "--expert",
          f"math={tmp_path / 'math'}"], "--expert kode: an expert's name must be the source "
                                        "of --data it trained on"),
    ]
    checkpoint.save(tmp_path / "artifact", {"x": np.zeros(2, np.float32)},
            {"kind": artifact.KIND, "source": "code"})
    cases.append((["--model", str(tmp_path / "artifact")],
                  "a branch artifact holds only the party's expert and router row"))
    for argv, message in cases:
        assert main(["eval", *argv, *data]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_evaluate_on_four_devices_matches_one(data_dir, tmp_path):
    model = tiny(seed=7, **MOE)
    checkpoint.save_model(tmp_path / "ckpt", model)
    one = perplexity.evaluate(model, data_dir, ["code"], seq_len=SEQ, max_sequences=8,
                              batch_size=4, progress=False)["code"]
    proc = run_python(f"""
        import json, jax
        from moesaic.eval.perplexity import evaluate
        r = evaluate({str(tmp_path / 'ckpt')!r}, {str(data_dir)!r}, ["code"], seq_len={SEQ},
                     max_sequences=8, batch_size=4, progress=False)["code"]
        print(json.dumps({{"devices": jax.device_count(), "nll": r["nll"],
                           "share": r["routing"]["token_share"]}}))
    """, devices=4)
    got = last_json_line(proc.stdout)
    assert got["devices"] == 4
    assert got["nll"] == pytest.approx(one["nll"], rel=1e-5)
    np.testing.assert_allclose(got["share"], one["routing"]["token_share"], atol=1e-6)
