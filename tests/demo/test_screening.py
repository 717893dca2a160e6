"""The demo's screening stages (moesaic.demo.screening): which stages `screen_rows` adds and
where, and the report's section from a screening record (the stages themselves run the
screening and merges that tests/merge/test_screen.py tests; a default demo runs them)."""

from __future__ import annotations

from moesaic.demo import pipeline, screening
from tests.demo.test_demo import smoke_settings

STAGES = ["screen", "hijacker", "hijack/calibrated", "hijack/refuse", "hijack/unscreened",
          "without", "screening"]


def test_screen_rows_adds_the_screening_stages_before_the_evaluation():
    assert not set(STAGES) & set(pipeline.stage_names(smoke_settings()))
    names = pipeline.stage_names(smoke_settings("screen_rows=8"))
    found = [n for n in names if n in STAGES]
    assert found == STAGES
    assert names.index("optout") < names.index("screen")  # the merges without the hijacker
    assert names.index("calibrated") < names.index("screen")  # the merge it screens
    assert names.index("screening") < names.index("eval")


def _expert(source, trust, flagged=(), **values):
    row = {"source": source, "share": 0.2, "loo": 0.01, "gain": 0.02, "row_norm": 1.0,
           "logit_range": 1.0, "skew": 1.0, "trust": trust, "flagged_by": list(flagged)}
    return {**row, **values}


def test_the_report_section_compares_each_merge_with_the_same_kind_without_the_hijacker():
    honest = {"proxy_rows": 8, "proxy_tokens": 1016, "public_share": 0.1,
              "experts": [_expert("code", 0.9), _expert("law", 0.1, ["gain"], gain=-0.1),
                          _expert("math", 0.2, ["gain"])]}  # not flagged with the hijacker
    hijacked = {**honest, "threshold": 0.5, "flagged": ["code", "law"],
                "experts": [_expert("code", 0.0, ["row_norm"], row_norm=48.0),
                            _expert("law", 0.1, ["gain"]), _expert("math", 0.6)]}
    domains = ("code", "law", "math")
    bpb = {screening.WITHOUT: dict(zip(domains, (2.0, 2.0, 1.0))),
           screening.CALIBRATED: dict(zip(domains, (1.0, 2.1, 1.3))),
           screening.screened_name("refuse"): dict(zip(domains, (2.0, 2.5, 0.99))),
           screening.PLAIN_WITHOUT: dict(zip(domains, (2.0, 2.0, 2.0))),
           screening.UNSCREENED: dict(zip(domains, (1.0, 2.2, 2.0)))}
    against = {screening.CALIBRATED: screening.WITHOUT,
               screening.screened_name("refuse"): screening.WITHOUT,
               screening.UNSCREENED: screening.PLAIN_WITHOUT}
    record = {"hijacker": "code", "scale": 50.0, "honest": honest,
              "hijacked": {"refuse": hijacked}, "bpb": bpb, "against": against,
              "experts": {name: ["public", "law", "math"] for name in bpb}}
    lines = screening.screening_table(record)
    text = "\n".join(lines)
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert rows["code"].endswith("| 48.00 | 1.00 | 1.00 | 0.000 | row_norm |")
    assert rows[screening.CALIBRATED].endswith("| +30.0% |")  # math 1.3 against 1.0
    assert rows[screening.screened_name("refuse")].endswith("| +25.0% |")  # law
    assert rows[screening.UNSCREENED].endswith("| +10.0% |")  # law, against its own kind
    assert rows[screening.WITHOUT].endswith("| – |")
    assert rows[screening.PLAIN_WITHOUT].endswith("| – |")
    assert "flagged here: code, law, of which law also in the demo's own merge (" in text
    header = next(line for line in lines if line.startswith("| expert"))
    rule = lines[lines.index(header) + 1]
    assert header.count("|") == rule.count("|") == rows["code"].count("|")
