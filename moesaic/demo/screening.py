"""The demo's screening (docs/calibration.md): does each of its parties earn its tokens, and
what does a party that hijacks the router cost the others, screened and unscreened?

  screen              the calibrated merge of the demo's parties (the `calibrated` stage: the
                      party gate) screened on `screen_rows` rows of the public source
                      (moesaic.merge.screen): share, leave-one-out, gain, row norm, logit
                      range, skew and trust per expert; the report is written beside the merge
                      (W/merged/learned-rows-calibrated.screening.json)
  hijacker            party HIJACKER's branch with its router row scaled by 50
                      (moesaic.merge.planted), under the same name
  hijack/calibrated   the calibrated merge with the hijacker in HIJACKER's place, unscreened
  hijack/refuse       the same merge screened, `--policy refuse`: the parties below the trust
                      threshold left out
  hijack/unscreened   the learned-rows merge (no gate) with the hijacker, unscreened
  without             the calibrated merge without HIJACKER (`merge remove`)
  screening           every model above, the merge without HIJACKER and the learned-rows merge
                      without it (the opt-out stage's model) on every domain's held-out split:
                      W/screening.json and the report's screening section

`screen_rows` 0 runs none of these.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from tqdm import tqdm

from moesaic.demo import runner
from moesaic.demo.systems import DOMAINS, OPT_OUT, ROUTER_OPTIONS
from moesaic.eval import perplexity
from moesaic.merge import calibrate, fuse, planted, screen
from moesaic.model import checkpoint

HIJACKER = OPT_OUT  # its merge without it is the opt-out stage's
ROUTER = "learned-rows"
POLICIES = ("refuse",)
WITHOUT = f"calibrated merge without {HIJACKER}"
CALIBRATED = f"calibrated, with {HIJACKER} hijacking, unscreened"
PLAIN_WITHOUT = f"learned-rows merge without {HIJACKER} (no gate)"
UNSCREENED = f"learned rows (no gate), with {HIJACKER} hijacking, unscreened"


def screened_name(policy: str) -> str:
    return f"calibrated, with {HIJACKER} hijacking, screened ({policy})"


def paths(w: pathlib.Path, preset) -> dict[str, pathlib.Path]:
    if not preset.screen_rows:
        return {}
    hijacked = w / "merged" / f"calibrated-{HIJACKER}-hijacker"
    return {"screen": w / "merged" / "learned-rows-calibrated.screening.json",
            "hijacker": w / "screening" / f"{HIJACKER}-hijacker",
            "hijack/calibrated": hijacked,
            **{f"hijack/{p}": hijacked.with_name(f"{hijacked.name}-{p}") for p in POLICIES},
            "hijack/unscreened": w / "merged" / f"{ROUTER}-{HIJACKER}-hijacker",
            "without": w / "merged" / f"calibrated-without-{HIJACKER}",
            "screening": w / "screening.json"}


def _tokens(demo) -> np.ndarray:
    cfg = checkpoint.model_config(checkpoint.read_meta(demo.paths[f"merge/{ROUTER}"]))
    return calibrate.proxy_tokens(demo.data, cfg, seq_len=demo.preset.seq_len,
                                  rows=int(demo.preset.screen_rows))


def _branches(demo) -> list[pathlib.Path]:
    p = demo.paths
    return [p["hijacker"] if d == HIJACKER else p[f"branch/{d}"] for d in DOMAINS]


def _merge_kw(demo) -> dict:
    return dict(router=ROUTER, top_k=demo.preset.top_k, public_stats=demo.paths["public-stats"],
                options=ROUTER_OPTIONS.get(ROUTER))


def work(demo) -> dict:
    """The stages' functions, by stage name (`paths`)."""
    p = demo.paths
    if not demo.preset.screen_rows:
        return {}
    out = {
        "screen": lambda: screen.write_report(
            screen.screen(p["calibrated"], _tokens(demo), log=tqdm.write), p["calibrated"]),
        "hijacker": lambda: planted.plant("hijacker", p[f"branch/{HIJACKER}"], p["hijacker"]),
        "hijack/calibrated": lambda: demo.merge(_branches(demo), ROUTER, p["hijack/calibrated"],
                                                calibration=demo.calibration()),
        "hijack/unscreened": lambda: demo.merge(_branches(demo), ROUTER,
                                                p["hijack/unscreened"]),
        "without": lambda: fuse.remove(p["calibrated"], HIJACKER, out=p["without"],
                                       log=tqdm.write),
        "screening": lambda: evaluate(demo),
    }
    for policy in POLICIES:
        out[f"hijack/{policy}"] = (lambda policy=policy: screen.screened_merge(
            p["public"], _branches(demo), out=p[f"hijack/{policy}"], tokens=_tokens(demo),
            policy=policy, calibration=demo.calibration(), log=tqdm.write,
            **_merge_kw(demo)))
    return out


def _report(model: pathlib.Path) -> dict:
    return json.loads(model.with_name(model.name + ".screening.json").read_text())


def evaluate(demo) -> dict:
    """W/screening.json: the screening reports and each model's held-out bits per byte."""
    p, preset = demo.paths, demo.preset
    models = {WITHOUT: p["without"], CALIBRATED: p["hijack/calibrated"],
              **{screened_name(policy): p[f"hijack/{policy}"] for policy in POLICIES},
              PLAIN_WITHOUT: p["optout"], UNSCREENED: p["hijack/unscreened"]}
    domains = [*DOMAINS, "public"]
    bpb = {}
    for name, path in tqdm(models.items(), desc="screening eval", unit="model", leave=False):
        metrics = perplexity.evaluate(path, demo.data, domains, seq_len=preset.seq_len,
                                      max_sequences=preset.eval_sequences, batch_size=8,
                                      name=name, progress=False)
        bpb[name] = {d: metrics[d]["bpb"] for d in domains}
    record = {"hijacker": HIJACKER, "scale": planted.HIJACK_SCALE,
              "honest": _report(p["calibrated"]),
              "against": {name: PLAIN_WITHOUT if name == UNSCREENED else WITHOUT
                          for name in models if name not in (WITHOUT, PLAIN_WITHOUT)},
              "hijacked": {policy: _report(p[f"hijack/{policy}"]) for policy in POLICIES},
              "experts": {name: [e["source"] for e in checkpoint.read_meta(path)["experts"]]
                          for name, path in models.items()},
              "bpb": bpb}
    out = p["screening"]
    runner.write_record(out, record)
    return record


def _expert_rows(report: dict) -> list[str]:
    lines = ["| expert | share | loo | gain | row norm x | logit range x | skew x | trust | "
             "flagged by |", "| --- |" + " ---: |" * 7 + " --- |"]
    for r in report["experts"]:
        lines.append(f"| {r['source']} | {r['share']:.3f} | {r['loo']:+.4f} | "
                     f"{r['gain']:+.4f} | {r['row_norm']:.2f} | {r['logit_range']:.2f} | "
                     f"{r['skew']:.2f} | {r['trust']:.3f} | "
                     f"{', '.join(r['flagged_by']) or '–'} |")
    return lines


def screening_table(record: dict) -> list[str]:
    """The report's section: the screening of the demo's own merge, the hijacked merge's, and
    the bits per byte of the merges with the hijacker against the merge without it."""
    honest, hijacked = record["honest"], record["hijacked"][POLICIES[0]]
    threshold = hijacked["threshold"]
    lines = ["## Screening of the parties (public proxy data; docs/calibration.md)", "",
             f"The calibrated merge of the demo's parties (the party gate), screened on "
             f"{honest['proxy_rows']} public rows ({honest['proxy_tokens']} tokens; the public "
             f"expert's share {honest['public_share']:.3f}):", "", *_expert_rows(honest), "",
             f"The same merge with {record['hijacker']}'s router row scaled by "
             f"{record['scale']:g} (a router hijacker), screened:", "",
             *_expert_rows(hijacked), ""]
    domains = list(next(iter(record["bpb"].values())))
    others = [d for d in domains if d != record["hijacker"]]
    honest_flagged = [r["source"] for r in honest["experts"]  # flagged without the hijacker too
                      if r["trust"] < threshold and r["source"] in hijacked["flagged"]]
    lines += ["| merge | experts | " + " | ".join(domains) + " | worst other domain |",
              "| --- | --- |" + " ---: |" * (len(domains) + 1)]
    for name, row in record["bpb"].items():
        against = record["against"].get(name)
        worst = (f"{max(100 * (row[d] / record['bpb'][against][d] - 1) for d in others):+.1f}%"
                 if against else "–")
        lines.append(f"| {name} | {', '.join(record['experts'][name])} | "
                     + " | ".join(f"{row[d]:.4f}" for d in domains) + f" | {worst} |")
    lines += ["", f"Bits per byte on the held-out split. Worst other domain: the largest change "
              f"on a domain other than {record['hijacker']} against the merge of the same kind "
              f"without {record['hijacker']} (made by `merge remove`). Screened: parties whose "
              f"trust "
              f"is below {threshold:g} are left out; flagged here: "
              f"{', '.join(hijacked['flagged']) or 'none'}"
              + (f", of which {', '.join(honest_flagged)} also in the demo's own merge "
                 f"(a domain whose honest party is left out loses its expert)"
                 if honest_flagged else "") + "."]
    return lines
