"""The lm-eval model class: its three request kinds against direct computations, a task
defined in a local YAML over local files (no hub), and a task naming a missing split."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from moesaic.data.tokenizer import BYTES  # noqa: E402
from moesaic.eval import harness  # noqa: E402
from moesaic.eval.generate import generate  # noqa: E402
from moesaic.model import ModelConfig, checkpoint  # noqa: E402
from moesaic.model.transformer import Decoder  # noqa: E402

CONTEXT = 24
ITEMS = [{"question": "ab", "choices": ["cd", "xy"], "label": 0},
         {"question": "hello", "choices": ["world", "there"], "label": 1}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, init_std=0.3)
    path = tmp_path_factory.mktemp("harness") / "model"
    checkpoint.save_model(path, Decoder(cfg, rngs=nnx.Rngs(0)),
                          {"config": {"data": {"seq_len": CONTEXT}}})
    return harness.MoesaicLM(path=str(path), batch_size=4)


def _direct_logp(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    tokens = np.asarray([context + continuation], np.int32)
    logits = model(tokens[:, :-1])[0][0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    n = len(continuation)
    picked = [float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation)]
    greedy = np.argmax(np.asarray(logits)[len(context) - 1:len(context) - 1 + n], axis=-1)
    return sum(picked), bool(np.all(greedy == continuation))


def test_loglikelihood_and_rolling_equal_the_model_scored_directly(lm):
    pairs = [("ab", " cd"), ("", "xyz"), ("x" * 40, " end")]  # empty; cut from the left
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (context, cont), (logp, greedy) in zip(pairs, got):
        ctx = list(BYTES.encode(context)) or [BYTES.eos_id]
        ctx = ctx[-(CONTEXT + 1 - len(cont)):]
        want, want_greedy = _direct_logp(lm.model, ctx, list(BYTES.encode(cont)))
        assert logp == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    text = "rolling text longer than the context of the model"  # three windows
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        list(BYTES.encode(text)), BYTES.eos_id, CONTEXT, 1)]
    assert len(windows) == 3 and sum(len(p) for _, p in windows) == len(text)
    want = sum(_direct_logp(lm.model, c, p)[0] for c, p in windows)
    assert rolled == pytest.approx(want, abs=1e-3)


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(lm):
    prompt = np.asarray(BYTES.encode("abc"), np.int32)
    full = BYTES.decode(generate(lm.model, [prompt], max_new_tokens=8, eos_id=lm.eos_id,
                                 context=CONTEXT).tokens[0])
    stop = full[3:5] if len(full) >= 5 else "\0"
    (got,) = lm.generate_until([Instance("generate_until", {},
                                         ("abc", {"until": [stop], "max_gen_toks": 8}), 0)])
    assert got == full[:full.index(stop)] if stop in full else got == full


def _task(tmp_path, split: str) -> str:
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tmp_path / "local.yaml").write_text(
        f"task: moesaic_local_{split}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: {split}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return f"moesaic_local_{split}"


def test_a_local_yaml_task_runs_and_a_missing_split_is_named(lm, tmp_path, monkeypatch, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = _task(tmp_path, "test")
    results = lm_eval.simple_evaluate(model=lm, tasks=[name],
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    acc = results["results"][name]["acc,none"]
    # lm-eval joins the question and each choice with its target delimiter, a space
    scores = lm.loglikelihood([Instance("loglikelihood", {}, (it["question"], " " + c), 0)
                               for it in ITEMS for c in it["choices"]])
    picks = [int(np.argmax([s[0] for s in scores[2 * i:2 * i + 2]])) for i in range(2)]
    assert acc == pytest.approx(np.mean([p == it["label"] for p, it in zip(picks, ITEMS)]))
    bad = tmp_path / "bad"
    bad.mkdir()
    name = _task(bad, "validation")
    code = harness.main(["--model", "moesaic", "--model_args", "path=x", "--tasks", name,
                         "--include_path", str(bad)])
    assert code == 2 and "test_split 'validation' is not a split of its data_files" in (
        capsys.readouterr().err)
