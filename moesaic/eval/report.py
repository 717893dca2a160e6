"""The report a person reads: W/report.md, W/report.json and PNG plots (matplotlib, Agg).

`results` (what `write_report` takes):

    {"systems": {system: {domain: {"bpb": float, "ppl": float, "nll": float,
                                   ... any other numbers (tokens, bytes, ...),
                                   "routing": {"token_share": [[share per expert] per layer],
                                               "weight_share": same,
                                               "experts": [expert names]}}}},   # optional
     "domains": [domain, ...]}                                                  # optional

A system's value is exactly what `moesaic.eval.perplexity.evaluate` (or `evaluate_scorer` on an
ensemble) returns. "domains" fixes the column order (default: the first system's domains, then
any others). Systems keep their insertion order. "avg" is the arithmetic mean (of bpb, and of
ppl) over the `average_over` domains (default: every column); a system not evaluated on all of
them has no average, so every average shown covers the same text.

Files:
    report.md            title, the caller's notes, a bits-per-byte table and a perplexity table
                         (systems by domain, plus "avg"), links to the plots
    report.json          {"title", "notes", "domains", "average_over", "systems": {system:
                         {domain: {"bpb", "ppl", "nll", ...}, "avg": {"bpb", "ppl"}}},
                         "routing": {system: {domain: {...}}}, "plots": [file names]}
    bpb_by_domain.png    grouped bars: bits per byte per domain (and avg), one bar per system
                         of `bar_systems` (default: all)
    bpb_avg.png          one horizontal bar per system with an average, best at the top
    routing_<system>.png for each system with routing shares: one heatmap per domain, layers
                         by experts, each expert's share of the domain's router weight
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

AVG = "avg"
NUMBER_KEYS = ("bpb", "ppl", "nll")


def _domains(results: Mapping) -> list[str]:
    order = list(results.get("domains") or [])
    for per_domain in results["systems"].values():
        order += [d for d in per_domain if d not in order]
    return order


def summarize(results: Mapping, average_over: Sequence[str] | None = None) -> dict:
    """The numbers of report.json: per system, per domain {"bpb", "ppl", "nll", other numbers}
    plus "avg" over `average_over` (when the system has all of them); routing split out per
    system."""
    if not isinstance(results, Mapping) or not isinstance(results.get("systems"), Mapping):
        raise ValueError("results: want {'systems': {system: {domain: {'bpb', 'ppl', ...}}}}")
    domains = _domains(results)
    average_over = list(domains if average_over is None else average_over)
    unknown = [d for d in average_over if d not in domains]
    if unknown or not average_over:
        raise ValueError(f"average_over={average_over}: want some of the domains {domains}")
    systems, routing = {}, {}
    for system, per_domain in results["systems"].items():
        rows = {}
        for domain in domains:
            if domain not in per_domain:
                continue
            metrics = per_domain[domain]
            missing = [k for k in ("bpb", "ppl") if k not in metrics]
            if missing:
                raise ValueError(f"results: system {system!r}, domain {domain!r} lacks {missing}")
            rows[domain] = {k: float(v) if k in NUMBER_KEYS else v for k, v in metrics.items()
                            if k != "routing" and isinstance(v, (int, float, bool))}
            if "routing" in metrics:
                routing.setdefault(system, {})[domain] = metrics["routing"]
        if all(d in rows for d in average_over):
            rows[AVG] = {k: float(np.mean([rows[d][k] for d in average_over]))
                         for k in ("bpb", "ppl")}
        systems[system] = rows
    return {"domains": domains, "average_over": average_over, "systems": systems,
            "routing": routing}


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _table(summary: dict, key: str, digits: int) -> list[str]:
    columns = [*summary["domains"], AVG]
    lines = ["| system | " + " | ".join(columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    best = {c: min((r[c][key] for r in summary["systems"].values()
                    if c in r and math.isfinite(r[c][key])), default=None)
            for c in columns}  # a diverged system (nan) must not hide the best of a column
    for system, rows in summary["systems"].items():
        cells = []
        for c in columns:
            value = rows.get(c, {}).get(key)
            cell = _fmt(value, digits)
            cells.append(f"**{cell}**" if value is not None and value == best[c] else cell)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return lines


def _avg_footnote(summary: dict) -> str:
    if summary["average_over"] == summary["domains"]:
        return f"`{AVG}` is the mean of the domain columns."
    return (f"`{AVG}` is the mean of the {', '.join(summary['average_over'])} columns; a system "
            "not evaluated on all of them has none (–).")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "system"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(summary: dict, path: pathlib.Path, key: str = "bpb",
              systems: Sequence[str] | None = None) -> None:
    plt = _pyplot()
    columns = [*summary["domains"], AVG]
    systems = list(summary["systems"] if systems is None else systems)
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) + 0.25 * len(systems)),
                                    4.0 + 0.2 * ((len(systems) + 2) // 3)))
    colors = plt.get_cmap("tab10" if len(systems) <= 10 else "tab20").colors
    x = np.arange(len(columns))
    for i, system in enumerate(systems):
        rows = summary["systems"][system]
        values = [rows.get(c, {}).get(key, np.nan) for c in columns]
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=system,
               color=colors[i % len(colors)])
    ax.set_xticks(x, columns)
    ax.set_ylabel({"bpb": "bits per byte (lower is better)"}.get(key, key))
    finite = [v[key] for s in systems for v in summary["systems"][s].values()
              if math.isfinite(v.get(key, np.nan))]
    if finite:
        ax.set_ylim(min(finite) * 0.9, max(finite) * 1.05)
    ax.legend(fontsize="small", ncol=min(3, len(systems)), loc="upper center",
              bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_average(summary: dict, path: pathlib.Path, key: str = "bpb") -> None:
    """One horizontal bar per system with an average, sorted best (lowest) first, at the top."""
    plt = _pyplot()
    ranked = sorted((rows[AVG][key], system) for system, rows in summary["systems"].items()
                    if AVG in rows and math.isfinite(rows[AVG][key]))
    values = [v for v, _ in ranked]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(ranked) + 1.2))
    y = np.arange(len(ranked))[::-1]
    ax.barh(y, values, color="tab:blue")
    ax.set_yticks(y, [s for _, s in ranked], fontsize="small")
    if values:
        span = max(values) - min(values) or 1.0
        ax.set_xlim(min(values) - 0.3 * span, max(values) + 0.15 * span)
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.3f}", va="center", fontsize="x-small")
    over = ", ".join(summary["average_over"])
    ax.set_xlabel(f"{'bits per byte' if key == 'bpb' else key}, mean over {over} "
                  "(lower is better)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing(system: str, per_domain: Mapping[str, Mapping], path: pathlib.Path) -> None:
    """One heatmap per domain: rows layers, columns experts, colour = share of router weight
    (the top-k weights each expert receives; with top-k near E the token shares are flat and
    say little), or of tokens when no weight share was recorded."""
    plt = _pyplot()
    domains = list(per_domain)
    fig, axes = plt.subplots(1, len(domains), figsize=(2.6 * len(domains) + 1.2, 3.2),
                             squeeze=False)
    image = None
    for ax, domain in zip(axes[0], domains):
        routing = per_domain[domain]
        share = np.asarray(routing.get("weight_share", routing["token_share"]), float)  # (L, E)
        experts = routing.get("experts") or [str(e) for e in range(share.shape[1])]
        image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(domain, fontsize="medium")
        ax.set_xticks(range(share.shape[1]), experts, rotation=45, ha="right",
                      fontsize="small")
        ax.set_yticks(range(share.shape[0]))
        ax.set_ylabel("layer" if ax is axes[0][0] else "")
        if share.size <= 64:
            for (layer, expert), v in np.ndenumerate(share):
                ax.text(expert, layer, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.5 else "black")
    what = "router weight" if "weight_share" in per_domain[domains[0]] else "tokens"
    fig.suptitle(f"{system}: each expert's share of {what}", y=1.02)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(workdir: str | os.PathLike, results: Mapping, *, title: str = "moesaic report",
                 notes: Sequence[str] | str = (), average_over: Sequence[str] | None = None,
                 bar_systems: Sequence[str] | None = None,
                 sections: Sequence[Sequence[str]] = (), extra: Mapping | None = None) -> dict:
    """Writes report.md, report.json and the plots into `workdir`; returns report.json's dict.
    `average_over`: the domains "avg" means (default: all); `bar_systems`: the systems of
    bpb_by_domain.png (default: all); `sections`: more markdown sections (lists of lines,
    each starting with its heading), before the plots; `extra`: more keys of report.json."""
    summary = summarize(results, average_over)
    unknown = [s for s in bar_systems or () if s not in summary["systems"]]
    if unknown:
        raise ValueError(f"bar_systems: no results for {unknown}; systems are "
                         f"{list(summary['systems'])}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    notes = [notes] if isinstance(notes, str) else list(notes)
    plots = ["bpb_by_domain.png", "bpb_avg.png"]
    plot_bars(summary, workdir / plots[0], systems=bar_systems)
    plot_average(summary, workdir / plots[1])
    for system, per_domain in summary["routing"].items():
        with_shares = {d: r for d, r in per_domain.items() if "token_share" in r}
        if with_shares:
            name = f"routing_{_slug(system)}.png"
            plot_routing(system, with_shares, workdir / name)
            plots.append(name)
    report = {"title": title, "notes": notes, **summary, "plots": plots, **(extra or {})}
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# {title}", ""]
    if notes:
        lines += [*notes, ""]
    lines += ["## Bits per byte (held out; lower is better; best in bold)", "",
              *_table(summary, "bpb", 4), "",
              "## Perplexity (per token)", "", *_table(summary, "ppl", 3), "",
              _avg_footnote(summary), ""]
    for section in sections:
        lines += [*section, ""]
    lines += ["## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
    return report
