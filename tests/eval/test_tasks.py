"""The embedded downstream tasks: items built from held-out text and their scorers, on
hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from moesaic.data.prepare import write_source
from moesaic.data.tokenizer import BYTES
from moesaic.eval import tasks
from moesaic.eval.generate import generate
from moesaic.model import ModelConfig
from moesaic.model.transformer import Decoder

MATH = ["Problem 1: What is 2 + 2?\nAnswer: 4\n\nProblem 2: What is 3 * 5?\nAnswer: 15",
        "Problem 1: Solve for x: 2x + 1 = 7.\nAnswer: x = 3"]
WORDS = ["alpha beta gamma delta " * 4, "one two three four five six " * 3,
         "red green blue yellow " * 5, "north south east west " * 5, "cat dog cow pig " * 6]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    write_source(out, "math", {"train": lambda: MATH, "heldout": lambda: MATH},
                 tokenizer=BYTES, origin={"kind": "test"})
    write_source(out, "words", {"train": lambda: WORDS, "heldout": lambda: WORDS},
                 tokenizer=BYTES, origin={"kind": "test"})
    return out


def test_math_items_are_the_problems_with_the_text_before_them(data_dir):
    items = tasks.math_items(data_dir, n=10)
    assert [BYTES.decode(it.choices[0]) for it in items] == [" 4", " 15", " x = 3"]
    assert BYTES.decode(items[1].prompt) == MATH[0][:MATH[0].rindex(" 15")]
    assert BYTES.decode(items[2].prompt) == "Problem 1: Solve for x: 2x + 1 = 7.\nAnswer:"
    assert set(items[0].stop_ids) == {ord("\n"), BYTES.eos_id}
    assert len(tasks.math_items(data_dir, n=2)) == 2


def test_cloze_items_hold_the_true_continuation_and_others_from_other_documents(data_dir):
    items = tasks.cloze_items(data_dir, "words", n=7, choices=3, cont_len=6, prompt_len=10)
    docs = [BYTES.encode(w.strip() + "\n") for w in WORDS]
    for item in items:
        true = item.choices[item.answer]
        (owner,) = [d for d in docs if BYTES.decode(item.prompt) + BYTES.decode(true)
                    in BYTES.decode(d)]
        for c, choice in enumerate(item.choices):
            assert len(choice) == 6
            if c != item.answer:  # cut from another document (no two share a word)
                assert BYTES.decode(choice) not in BYTES.decode(owner)
    again = tasks.cloze_items(data_dir, "words", n=7, choices=3, cont_len=6, prompt_len=10)
    assert all(a.prompt.tolist() == b.prompt.tolist() and a.answer == b.answer
               for a, b in zip(items, again))
    six = tasks.cloze_items(data_dir, "words", n=2, choices=6, cont_len=4, prompt_len=4)
    assert all(len(it.choices) == 6 for it in six)  # 5 documents: one gives two wrong ones
    with pytest.raises(ValueError, match="a cloze needs 2"):
        tasks.cloze_items(data_dir, "math", n=2, choices=2, cont_len=40, prompt_len=4)


def test_choice_accuracy_counts_strict_wins_only():
    logp = np.array([[-1.0, -2.0, -3.0],   # right (0) wins
                     [-1.0, -1.0, -5.0],   # tie with the right one: wrong
                     [-4.0, -0.5, -9.0],   # right (2) loses
                     [-9.0, -0.1, -3.0]])  # right (1) wins
    assert tasks.choice_accuracy(logp, [0, 0, 2, 1]) == 0.5


def test_exact_match_reads_the_greedy_token_after_each_position():
    row = np.array([7, 8, 9, 4, 2, 0, 0])  # prompt 7 8 9, answer 4 2 at 3..4, then stop
    greedy = np.array([0, 0, 4, 2, 10, 0])  # argmax after positions 0..5
    assert tasks.exact_match(greedy, row, 3, 2, stop_ids=(10, 11))
    assert not tasks.exact_match(greedy, row, 3, 2, stop_ids=(11,))  # no stop after it
    assert not tasks.exact_match(np.array([0, 0, 4, 3, 10, 0]), row, 3, 2, stop_ids=(10,))


def test_score_items_multiple_choice_and_exact_match_on_hand_made_scorers():
    # a scorer whose log-probability of a target is minus its id: low ids win
    def lowest(rows, greedy=None):
        return -rows[:, 1:].astype(float), greedy

    items = [tasks.Item(np.array([5, 5]), (np.array([9, 9]), np.array([1, 1])), answer=1),
             tasks.Item(np.array([5]), (np.array([2]), np.array([3])), answer=1)]
    assert tasks.score_items(lowest, items, width=6, batch=4) == {"accuracy": 0.5, "items": 2}
    # an oracle whose greedy token is the row's next one: every answer matches, stop included
    exact = [tasks.Item(np.array([5, 6]), (np.array([1, 2]),), 0, (0,)),
             tasks.Item(np.array([5]), (np.array([3]),), 0, (0,))]
    oracle = lambda rows: lowest(rows, rows[:, 1:])  # noqa: E731
    assert tasks.score_items(oracle, exact, width=6, batch=8)["accuracy"] == 1.0
    shifted = lambda rows: lowest(rows, rows[:, :-1])  # noqa: E731
    assert tasks.score_items(shifted, exact, width=6, batch=8)["accuracy"] == 0.0
    assert tasks.score_items(lowest, exact, width=6)["accuracy"] is None  # no greedy tokens


def test_teacher_forced_exact_match_is_greedy_generation():
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                      init_std=0.3, eos_id=31, pad_id=-1)
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    prompt = np.array([3, 1, 4, 1, 5])
    out = generate(model, [prompt], max_new_tokens=4).tokens[0]
    answer, stop = out[:3], int(out[3])
    scorer = tasks.model_scorer(model)
    right = tasks.Item(prompt, (answer,), 0, (stop,))
    wrong = tasks.Item(prompt, (np.array([*answer[:2], (answer[2] + 1) % 31]),), 0, (stop,))
    other_stop = tasks.Item(prompt, (answer,), 0, ((stop + 1) % 32,))
    assert [tasks.score_items(scorer, [it], width=12)["accuracy"]
            for it in (right, wrong, other_stop)] == [1.0, 0.0, 0.0]
