"""The demo's downstream tasks (moesaic.eval.tasks) for its systems: W/tasks.json and the
report's task table.

The items come from the demo's held-out split: math exact match on MATH_ITEMS problems and a
CLOZE_CHOICES-way cloze of CLOZE_ITEMS passages per private domain, each row the models'
context plus one wide (the evaluator's compiled forward scores them). A system made of one
model per domain (the weighted soups, each branch alone, each dense expert on its own domain)
answers each domain's task with that domain's model and math with the math one. BTM scores
the cloze; it has no greedy tokens, so its math cell is empty. c-BTM, the other routers and
the uncoordinated merges are left out to keep the stage short (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping

from tqdm import tqdm

from moesaic.demo import runner
from moesaic.demo.systems import (
    BTX_TUNED,
    CALIBRATED,
    CEILING,
    DENSE_OWN,
    DOMAINS,
    OPT_OUT,
    TUNED,
)
from moesaic.eval import ensembles, perplexity
from moesaic.eval.tasks import RowScorer, TaskSet, chance, ensemble_scorer, model_scorer

MATH_ITEMS, CLOZE_ITEMS, CLOZE_CHOICES = 8, 8, 4
MATH_TASK = "math exact match"


def task_set(data_dir: pathlib.Path, seq_len: int) -> TaskSet:
    return TaskSet.embedded(data_dir, DOMAINS, context=seq_len, math_n=MATH_ITEMS,
                            cloze_n=CLOZE_ITEMS, choices=CLOZE_CHOICES)


def _model(path: pathlib.Path) -> RowScorer:
    return model_scorer(perplexity.load_model(path)[0])


def _systems(paths: Mapping[str, pathlib.Path], w: pathlib.Path
             ) -> dict[str, Callable[[], RowScorer] | dict[str, Callable[[], RowScorer]]]:
    """system -> a loader of its scorer, or {domain: loader} for a system of one model per
    domain. Names as the report's bits-per-byte table spells them."""
    def one(path):
        return lambda: _model(path)

    dense = {d: paths[f"dense/{d}"] for d in DOMAINS}
    return {
        "public model": one(paths["public"]),
        "soup (uniform)": one(w / "soups" / "uniform"),
        "soup (weighted)": {d: one(w / "soups" / f"weighted-{d}") for d in DOMAINS},
        "BTM (top-2)": lambda: ensemble_scorer(
            ensembles.btm({"public": paths["public"], **dense}, top_k=2)),
        BTX_TUNED: one(paths["btx-tune"]),
        CEILING: {d: one(paths[f"alone/{d}"]) for d in DOMAINS},
        "merged MoE (learned-rows)": one(paths["merge/learned-rows"]),
        TUNED: one(paths["tune"]),
        CALIBRATED: one(paths["calibrated"]),
        f"merged MoE (learned-rows) without {OPT_OUT}": one(paths["optout"]),
        "unrestricted MoE (all data)": one(paths["moe-all"]),
        DENSE_OWN: {d: one(dense[d]) for d in DOMAINS},
    }


def _task_domain(task: str) -> str:
    return "math" if task == MATH_TASK else task.removesuffix(" cloze")


def run_tasks(paths: Mapping[str, pathlib.Path], w: pathlib.Path, data_dir: pathlib.Path,
              seq_len: int, out: pathlib.Path) -> dict:
    """Scores every system on every task; writes `out` (tasks.json) whole or not at all."""
    tasks = task_set(data_dir, seq_len)
    results = {}
    for system, load in tqdm(_systems(paths, w).items(), desc="tasks", unit="system",
                             leave=False):
        if isinstance(load, dict):
            results[system] = {}
            for domain, loader in load.items():
                mine = [t for t in tasks.tasks if _task_domain(t) == domain]
                results[system].update(tasks.score(loader(), only=mine))
        else:
            results[system] = tasks.score(load())
    record = {"tasks": {name: {"items": len(items), "chance": chance(items)}
                        for name, items in tasks.tasks.items()},
              "systems": results}
    runner.write_record(out, record)
    return record


def task_table(record: Mapping) -> list[str]:
    """The report's section: accuracy per system and task (percent), chance in the first
    row, the best of each column in bold, an empty cell where a system has no score."""
    names = list(record["tasks"])
    lines = ["## Downstream tasks (accuracy %, held-out items; higher is better)", "",
             "| system | " + " | ".join(names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |",
             "| chance | " + " | ".join(f"{100 * record['tasks'][n]['chance']:.0f}"
                                       for n in names) + " |"]
    best = {}
    for n in names:  # no bold in a column where every system scores the same
        scores = {s[n]["accuracy"] for s in record["systems"].values()
                  if s.get(n, {}).get("accuracy") is not None}
        best[n] = max(scores) if len(scores) > 1 else None
    for system, scores in record["systems"].items():
        cells = []
        for n in names:
            acc = scores.get(n, {}).get("accuracy")
            cell = "–" if acc is None else f"{100 * acc:.0f}"
            cells.append(f"**{cell}**" if acc is not None and acc == best[n] else cell)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    items = ", ".join(f"{n} {t['items']}" for n, t in record["tasks"].items())
    lines += ["", f"Items per task: {items}. Math: the answer after `Answer:` exactly, by "
              f"greedy decoding; cloze: the true continuation among {CLOZE_CHOICES} "
              "(the others cut from other held-out documents of the domain), by "
              "log-likelihood. BTM gives no greedy tokens (no math cell)."]
    return lines
