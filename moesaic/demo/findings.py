"""The demo's findings: a few plain sentences on what the numbers show, written at the top of
the report and printed at the end of a run."""

from __future__ import annotations

import numpy as np

from moesaic.demo.systems import (
    BTX,
    BTX_TUNED,
    CALIBRATED,
    CEILING,
    DENSE_OWN,
    DOMAINS,
    FFN_ALONE,
    OPT_OUT,
    TUNED,
    UNCOORDINATED,
    UNCOORDINATED_ROWS,
)


def with_dense_own(results: dict) -> dict:
    """`results` with the row DENSE_OWN after CEILING: each domain's numbers from that domain's
    dense expert (the specialist a perfect domain posterior would pick)."""
    systems = results["systems"]
    own = {d: systems[f"dense expert {d}"][d] for d in DOMAINS}
    ordered = {}
    for name, value in systems.items():
        ordered[name] = value
        if name == CEILING:
            ordered[DENSE_OWN] = own
    return {**results, "systems": ordered}


def private_avg(system: dict) -> float:
    return float(np.mean([system[d]["bpb"] for d in DOMAINS]))


def findings(results: dict, preset_name: str) -> list[str]:
    """A few plain sentences on what the numbers show."""
    systems = results["systems"]
    avg = {name: private_avg(s) for name, s in systems.items() if all(d in s for d in DOMAINS)}
    merged = avg["merged MoE (learned-rows)"]
    lines = [f"Preset `{preset_name}`. Bits per byte averaged over the private domains "
             f"({', '.join(DOMAINS)}); lower is better."]
    for rival in ("public model", "soup (uniform)", "soup (weighted)", "BTM (top-2)",
                  "c-BTM (top-2)", BTX, BTX_TUNED):
        if rival in avg:
            verdict = "beats" if merged < avg[rival] else "does NOT beat"
            lines.append(f"- merged MoE (learned rows, no router training) {verdict} "
                         f"{rival}: {merged:.3f} vs {avg[rival]:.3f}.")
    merges = {n: a for n, a in avg.items() if n.startswith("merged MoE")
              and "without" not in n and n != TUNED}
    best = min(merges, key=merges.get)
    lines.append(f"- best merged router: {best} at {merges[best]:.3f} (public model "
                 f"{avg['public model']:.3f}, BTM {avg.get('BTM (top-2)', float('nan')):.3f}).")
    if TUNED in avg:
        lines.append(f"- with FlexOlmo's optional router tuning (only the router rows train, on "
                     f"public data): {avg[TUNED]:.3f}, {avg[TUNED] - merged:+.3f} against the "
                     f"merge without it.")
    if FFN_ALONE in avg:
        merges = ", ".join(f"{UNCOORDINATED_ROWS[r]} {avg[name]:.3f}"
                           for r, name in UNCOORDINATED.items() if name in avg)
        lines.append(f"- FlexOlmo's uncoordinated experts (its ablation: each owner trains the "
                     f"FFN in place, with no public expert beside it and no replay) average "
                     f"{avg[FFN_ALONE]:.3f} alone on their own domains (the coordinated branches "
                     f"{avg.get(CEILING, float('nan')):.3f}); merged: {merges}, against "
                     f"{merged:.3f} for the coordinated merge.")
    if CALIBRATED in avg:
        lines.append(calibrated_line(avg, merged))
    gaps = []
    for d in DOMAINS:
        own = systems[DENSE_OWN][d]["bpb"]
        gaps.append(f"{d} {systems['merged MoE (learned-rows)'][d]['bpb']:.3f} vs {own:.3f}")
    lines.append("- merged MoE vs each dense expert on its own domain: " + "; ".join(gaps) + ".")
    if CEILING in avg:
        dense = avg[DENSE_OWN]
        lines.append(
            f"- where the gap is: each branch alone on its own domain (perfect routing) averages "
            f"{avg[CEILING]:.3f}, so routing costs the merged MoE {merged - avg[CEILING]:+.3f}; "
            f"each dense expert on its own domain averages {dense:.3f}, so training only the "
            f"FFN expert instead of the whole model costs {avg[CEILING] - dense:+.3f}.")
    upper = avg.get("unrestricted MoE (all data)")
    if upper is not None:
        line = f"- unrestricted MoE trained on all data (the upper bound): {upper:.3f}"
        btm = avg.get("BTM (top-2)")
        if btm is not None and upper >= btm:
            line += (f"; it does not beat BTM ({btm:.3f}) either: on single-domain text, "
                     "BTM's sequence posterior picks the dense expert fine-tuned whole on "
                     "that domain, which no MoE over shared attention matches at this size")
        lines.append(line + ".")
    with_all = systems["merged MoE (learned-rows)"]
    without = systems[f"merged MoE (learned-rows) without {OPT_OUT}"]
    others = max(abs(without[d]["bpb"] - with_all[d]["bpb"]) for d in DOMAINS if d != OPT_OUT)
    lines.append(f"- opting {OPT_OUT} out: {OPT_OUT} goes from {with_all[OPT_OUT]['bpb']:.3f} "
                 f"to {without[OPT_OUT]['bpb']:.3f} bits per byte; the other domains move by "
                 f"at most {others:.3f}.")
    return lines


def calibrated_line(avg: dict[str, float], merged: float) -> str:
    """The calibrated merge (the party gate, no router training) against the plain one, the
    router tuning and the baselines it is meant to reach, with its routing cost."""
    cal = avg[CALIBRATED]
    line = (f"- calibrated (the party gate from each party's bigram counts, its temperature "
            f"chosen on public proxy rows; no router training): {cal:.3f}, {cal - merged:+.3f} "
            f"against the merge without it")
    if CEILING in avg:
        line += f"; routing cost {cal - avg[CEILING]:+.3f}"
    rivals = [(n, avg[n]) for n in (TUNED, "soup (weighted)", "c-BTM (top-2)", "BTM (top-2)")
              if n in avg]
    verdicts = [f"{'beats' if cal < a else 'does NOT beat'} {n} ({a:.3f})" for n, a in rivals]
    return line + ("; it " + ", ".join(verdicts) if verdicts else "") + "."


def corpus_note(hashes: dict[str, str]) -> str:
    """Which corpora the numbers come from: source -> its content hash (12 digits)."""
    return ("- corpora (content hashes): " + ", ".join(f"{s} {h}" for s, h in hashes.items())
            + "; prose and law are read from the packages moesaic depends on, at the versions "
            "requirements/demo.lock pins: other hashes (another environment or Python) give "
            "other numbers.")
