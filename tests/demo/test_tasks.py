"""The demo's task table: chance first, the best of a column in bold, an empty cell where a
system has no score."""

from __future__ import annotations

from moesaic.demo.tasks import task_table


def test_task_table_marks_the_best_and_leaves_missing_scores_empty():
    record = {"tasks": {"math exact match": {"items": 8, "chance": 0.0},
                        "code cloze": {"items": 8, "chance": 0.25}},
              "systems": {"public model": {"math exact match": {"accuracy": 0.0},
                                           "code cloze": {"accuracy": 0.5}},
                          "BTM (top-2)": {"math exact match": {"accuracy": None},
                                          "code cloze": {"accuracy": 0.625}},
                          "merged": {"math exact match": {"accuracy": 0.0},
                                     "code cloze": {"accuracy": 0.25}}}}
    lines = task_table(record)
    assert "| chance | 0 | 25 |" in lines
    assert "| public model | 0 | 50 |" in lines  # every system alike: no bold
    assert "| BTM (top-2) | – | **62** |" in lines
    assert "| merged | 0 | 25 |" in lines
