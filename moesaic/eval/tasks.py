"""Downstream tasks built from a data folder's own held-out split, scored by log-likelihood.

  math   exact match: each problem of the held-out math documents ("Problem i: ...\\nAnswer:
         A") with the text before it as the prompt; correct when greedy decoding gives " A"
         and then ends the line (newline or end of document). Scored teacher-forced: greedy
         decoding yields exactly those tokens iff at each of their positions the model's
         argmax, given the prompt and the answer so far, is that token, so one forward pass
         per problem gives the exact-match rate of greedy generation.
  cloze  multiple choice per domain: a held-out passage's prefix and its true continuation of
         `cont_len` tokens against continuations of the same length cut from other held-out
         documents of that domain; the choice is the continuation of highest log-likelihood
         (a tie counts as wrong). Chance is 1 / choices.

Every item is a row of a fixed width (the model's context plus one), the prompt kept from the
right, the continuation after it and padding after that: the model is causal, so the padding
changes nothing the continuation's scores see, and one compiled forward of one shape serves
every item: with W = the context + 1 and batches of 8, the evaluator's own (`perplexity`).
A `RowScorer` gives log-probabilities and, for a model, greedy tokens (the same compiled
call); an ensemble of `moesaic.eval.ensembles` gives no greedy tokens, so its exact-match
cell is left empty.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from moesaic.data.loader import documents, load_manifest
from moesaic.data.tokenizer import BYTES
from moesaic.eval.perplexity import ModelScorer
from moesaic.model.transformer import Decoder

PROBLEM = re.compile(r"Problem \d+: [^\n]*\nAnswer:( [^\n]*)")


@dataclasses.dataclass(frozen=True)
class Item:
    """A prompt and its candidate continuations (token arrays); `answer` indexes the right
    one. `stop_ids`: tokens any of which may end an exact-match answer (math), else ()."""

    prompt: np.ndarray
    choices: tuple[np.ndarray, ...]
    answer: int = 0
    stop_ids: tuple[int, ...] = ()


def _byte_source(data_dir: str | os.PathLike, source: str) -> None:
    identity = load_manifest(data_dir, source)["tokenizer"]["identity"]
    if identity != "bytes":
        raise ValueError(f"tasks: source {source!r} was tokenized with {identity!r}; the "
                         "embedded tasks read byte-tokenized held-out text")


def math_items(data_dir: str | os.PathLike, *, n: int, source: str = "math") -> list[Item]:
    """Up to `n` problems evenly spaced over the held-out math documents."""
    _byte_source(data_dir, source)
    eos = load_manifest(data_dir, source)["tokenizer"]["eos_id"]
    found = []
    for doc in documents(data_dir, source, "heldout"):
        text = BYTES.decode(doc)
        for m in PROBLEM.finditer(text):
            prompt = BYTES.encode(text[:m.start(1)])
            found.append(Item(prompt, (BYTES.encode(m.group(1)),), 0,
                              (int(BYTES.encode("\n")[0]), int(eos))))
    if not found:
        raise ValueError(f"tasks: no 'Problem ...\\nAnswer: ...' in the held-out split of "
                         f"{source!r}")
    picks = np.linspace(0, len(found) - 1, min(n, len(found))).round().astype(int)
    return [found[i] for i in picks]


def cloze_items(data_dir: str | os.PathLike, source: str, *, n: int, choices: int,
                cont_len: int, prompt_len: int, seed: int = 0) -> list[Item]:
    """`n` items from the held-out documents of `source` (see the module docstring); a
    document gives several items, and several wrong continuations (at other places), when
    the split has few. Seeded: the same items each run."""
    docs = [d for d in documents(data_dir, source, "heldout") if len(d) >= 2 * cont_len]
    if len(docs) < 2:
        raise ValueError(f"tasks: source {source!r} has {len(docs)} held-out documents of at "
                         f"least {2 * cont_len} tokens; a cloze needs 2")
    rng = random.Random(f"{seed}:{source}")
    items = []
    for j in range(n):
        i = j % len(docs)
        doc = docs[i]
        cut = rng.randint(cont_len, len(doc) - cont_len)
        true = doc[cut:cut + cont_len]
        rest = [k for k in range(len(docs)) if k != i]  # a split of few documents gives
        others = (rng.sample(rest, choices - 1) if len(rest) >= choices - 1  # several
                  else [rng.choice(rest) for _ in range(choices - 1)])  # from one of them
        wrong = []
        for k in others:
            start = rng.randint(0, len(docs[k]) - cont_len)
            wrong.append(docs[k][start:start + cont_len])
        answer = rng.randrange(choices)
        options = [*wrong[:answer], true, *wrong[answer:]]
        items.append(Item(doc[max(0, cut - prompt_len):cut], tuple(options), answer))
    return items


def rows_of(items: Sequence[Item], width: int, pad_id: int = 0
            ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Rows (R, width), one per (item, choice), and for each (item, choice, start, length):
    the continuation sits at row positions start .. start + length - 1. A stop token, when
    the item has any, takes one more position after it (scored by `exact_match`)."""
    rows, where = [], []
    for i, item in enumerate(items):
        for c, cont in enumerate(item.choices):
            tail = len(cont) + (1 if item.stop_ids else 0)
            keep = width - tail
            if keep < 1:
                raise ValueError(f"tasks: a continuation of {len(cont)} tokens does not fit "
                                 f"rows of {width}")
            prompt = item.prompt[-keep:]
            row = np.full(width, pad_id, np.int32)
            row[:len(prompt)] = prompt
            row[len(prompt):len(prompt) + len(cont)] = cont
            rows.append(row)
            where.append((i, c, len(prompt), len(cont)))
    return np.stack(rows), where


def choice_accuracy(logp_ic: np.ndarray, answers: Sequence[int]) -> float:
    """Share of items whose right choice scores strictly above every other one."""
    logp_ic = np.asarray(logp_ic, np.float64)
    right = logp_ic[np.arange(len(answers)), answers]
    others = np.where(np.eye(logp_ic.shape[1], dtype=bool)[list(answers)], -np.inf, logp_ic)
    return float(np.mean(right > others.max(axis=1)))


def exact_match(greedy_row: np.ndarray, row: np.ndarray, start: int, length: int,
                stop_ids: Sequence[int]) -> bool:
    """Whether greedy decoding from row[:start] yields row[start:start + length] and then one
    of `stop_ids`. greedy_row[t] is the argmax after input position t."""
    picks = greedy_row[start - 1:start + length]
    return (bool(np.all(picks[:length] == row[start:start + length]))
            and int(picks[length]) in set(stop_ids))


def _scored_rows(scorer: RowScorer, rows: np.ndarray, batch: int
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The scorer over rows in batches of `batch`, the last one filled with copies (one
    shape, one compile): (log-probs (R, W - 1), greedy tokens (R, W - 1) or None)."""
    logps, greedy = [], []
    for lo in range(0, len(rows), batch):
        chunk = rows[lo:lo + batch]
        lp, gr = scorer(np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)]))
        logps.append(np.asarray(lp)[:len(chunk)])
        greedy.append(None if gr is None else np.asarray(gr)[:len(chunk)])
    return (np.concatenate(logps),
            None if any(g is None for g in greedy) else np.concatenate(greedy))


def continuation_scores(scorer: RowScorer, items: Sequence[Item], *, width: int,
                        batch: int = 8) -> list[list[tuple[float, bool | None]]]:
    """For each item and choice: (summed log-probability of the continuation after the
    prompt, whether greedy decoding yields it; None without greedy tokens)."""
    rows, where = rows_of(items, width)
    logp, greedy = _scored_rows(scorer, rows, batch)
    out: list[list] = [[None] * len(it.choices) for it in items]
    for r, (i, c, s, n) in enumerate(where):
        hit = None if greedy is None else bool(
            np.all(greedy[r, s - 1:s - 1 + n] == rows[r, s:s + n]))
        out[i][c] = (float(logp[r, s - 1:s - 1 + n].sum()), hit)
    return out


def score_items(scorer: RowScorer, items: Sequence[Item], *, width: int, batch: int = 8
                ) -> dict[str, float | int | None]:
    """{"accuracy", "items"}: exact match for items with stop tokens (None when the scorer
    gives no greedy tokens), else multiple choice by summed log-likelihood."""
    if any(item.stop_ids for item in items):
        rows, where = rows_of(items, width)
        _, greedy = _scored_rows(scorer, rows, batch)
        if greedy is None:
            return {"accuracy": None, "items": len(items)}
        hits = [exact_match(greedy[r], rows[r], s, n, items[i].stop_ids)
                for r, (i, _, s, n) in enumerate(where)]
        return {"accuracy": float(np.mean(hits)), "items": len(items)}
    scores = continuation_scores(scorer, items, width=width, batch=batch)
    totals = np.array([[lp for lp, _ in row] for row in scores], np.float64)
    return {"accuracy": choice_accuracy(totals, [it.answer for it in items]),
            "items": len(items)}


# rows (N, W) -> (the log-probability of each target (N, W - 1), the argmax token after each
# input position (N, W - 1) or None where the scorer cannot say: an ensemble)
RowScorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def model_scorer(model: Decoder) -> RowScorer:
    """Through the evaluator's compiled forward: rows of its shape reuse its compilation."""
    scorer = ModelScorer(model)

    def score(rows):
        logp, _, greedy = scorer.with_greedy(rows)
        return logp, greedy

    return score


def ensemble_scorer(scorer) -> RowScorer:
    """Over a perplexity scorer (`scorer(tokens) -> (logp, stats)`, e.g. an ensemble): no
    greedy tokens, so exact match is left out."""
    return lambda rows: (scorer(rows)[0], None)


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """The items of every task of a data folder, built once and scored per system."""

    tasks: Mapping[str, list[Item]]
    width: int

    @classmethod
    def embedded(cls, data_dir: str | os.PathLike, domains: Sequence[str], *, context: int,
                 math_n: int = 24, cloze_n: int = 12, choices: int = 4,
                 math_source: str = "math") -> TaskSet:
        """math exact match (when `math_source` is among `domains`) and a cloze per domain,
        each row `context + 1` wide (the context the models trained on)."""
        cont = max(4, context // 8)
        tasks = {}
        if math_source in domains:
            tasks["math exact match"] = math_items(data_dir, n=math_n, source=math_source)
        for d in domains:
            tasks[f"{d} cloze"] = cloze_items(data_dir, d, n=cloze_n, choices=choices,
                                              cont_len=cont, prompt_len=context - cont)
        return cls(tasks, context + 1)

    def score(self, scorer: RowScorer, only: Sequence[str] | None = None) -> dict[str, dict]:
        """{task: {"accuracy", "items"}} for the tasks named in `only` (default all)."""
        return {name: score_items(scorer, items, width=self.width)
                for name, items in self.tasks.items() if only is None or name in only}


def chance(items: Sequence[Item]) -> float:
    """An accuracy guessing gives: 1 / choices, 0 for exact match."""
    return 0.0 if any(it.stop_ids for it in items) else 1.0 / len(items[0].choices)
