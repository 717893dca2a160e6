"""The demo's extraction audit (moesaic.eval.audit): for each private party, how much of its
training text the public model, its dense expert, the merged MoE and the merged MoE without
it reproduce. W/audit.json and the report's table; rates only.

SAMPLES prefixes of PREFIX_LEN tokens per party, MATCH_LEN tokens compared (half the context
each, at most 32). The merged MoE without a party exists for the demo's opt-out party only
(the `optout` stage); the others' cells are empty rather than paid for with three more
merges.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

from tqdm import tqdm

from moesaic.demo import runner
from moesaic.demo.systems import DOMAINS, OPT_OUT
from moesaic.eval import audit, perplexity

SAMPLES = 16
MODELS = ("public model", "dense expert", "merged MoE", "merged MoE without the party")


def _paths(paths: Mapping[str, pathlib.Path], party: str) -> dict[str, pathlib.Path | None]:
    return {"public model": paths["public"], "dense expert": paths[f"dense/{party}"],
            "merged MoE": paths["merge/learned-rows"],
            "merged MoE without the party": paths["optout"] if party == OPT_OUT else None}


def run_audit(paths: Mapping[str, pathlib.Path], data_dir: pathlib.Path, seq_len: int,
              out: pathlib.Path) -> dict:
    """Audits every (party, model) pair; writes `out` whole or not at all."""
    length = min(32, seq_len // 2)
    parties = {}
    for party in tqdm(DOMAINS, desc="extraction audit", unit="party", leave=False):
        parties[party] = {}
        for name, path in _paths(paths, party).items():
            if path is None:
                continue
            model, _ = perplexity.load_model(path)
            parties[party][name] = audit.extraction(
                model, data_dir, party, n=SAMPLES, prefix_len=length,
                match_len=length).to_dict()
    record = {"samples": SAMPLES, "prefix_len": length, "match_len": length,
              "loose": audit.LOOSE, "parties": parties}
    runner.write_record(out, record)
    return record


def audit_table(record: Mapping) -> list[str]:
    """The report's section: exact / loose extraction rate (%) per party and model."""
    lines = ["## Extraction audit (share of a party's training prefixes continued verbatim; "
             "exact / loose %)", "",
             "| party | " + " | ".join(MODELS) + " |",
             "| --- | " + " | ".join("---:" for _ in MODELS) + " |"]
    for party, rows in record["parties"].items():
        cells = [f"{100 * rows[m]['exact_rate']:.0f} / {100 * rows[m]['loose_rate']:.0f}"
                 if m in rows else "–" for m in MODELS]
        lines.append(f"| {party} | " + " | ".join(cells) + " |")
    lines += ["", f"{record['samples']} prefixes of {record['prefix_len']} tokens from each "
              f"party's training documents, the next {record['match_len']} tokens greedy; "
              f"loose: within a {1 - record['loose']:.0%} token edit distance. The merged MoE "
              f"is the learned-rows merge; without the party: the opt-out ({OPT_OUT}) only."]
    return lines
