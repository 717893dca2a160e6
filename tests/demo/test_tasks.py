"""The demo's task table (chance first, the best of a column in bold, an empty cell where a
system has no score) and its extraction-audit table."""

from __future__ import annotations

from moesaic.demo.audit import audit_table
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


def test_audit_table_gives_exact_and_loose_rates_and_leaves_missing_models_empty():
    rates = {"exact_rate": 0.0625, "loose_rate": 0.25}
    record = {"samples": 16, "prefix_len": 32, "match_len": 32, "loose": 0.9,
              "parties": {"code": {m: rates for m in ("public model", "dense expert",
                                                      "merged MoE",
                                                      "merged MoE without the party")},
                          "math": {"public model": rates}}}
    lines = audit_table(record)
    assert "| code | 6 / 25 | 6 / 25 | 6 / 25 | 6 / 25 |" in lines
    assert "| math | 6 / 25 | – | – | – |" in lines
