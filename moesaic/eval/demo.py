"""`moesaic demo`: the whole flow on the embedded corpora, with a report a person reads.

    moesaic demo --workdir runs/demo                  # 2-core CPU, about 20 minutes
    moesaic demo --workdir runs/smoke --preset smoke  # CI, about 2 minutes
    moesaic demo --workdir runs/token --set router_input=token --set branch_lr=7e-4  # ablation
    moesaic demo --workdir runs/unc --set uncoordinated=true  # + FlexOlmo's uncoordinated experts
    moesaic demo --workdir runs/bias --set negative_bias=true  # FlexOlmo's negative bias

Stages (each skipped when its output exists, so a re-run resumes where it stopped):
  data        the embedded corpora: code, prose, law, math (private) and public
  public      the public model, pretrained on the public mixture
  branch/D    one coordinated branch per private domain D (FlexOlmo owner training, with
              public replay and prefix-mean routing, its router bias held at 0)
  dense/D     one dense continued-pretraining copy per domain (BTM, soups, BTX baselines)
  moe-all     the unrestricted MoE: the public model upcycled and trained on all the data
  merge/R     the branches merged with each router kind R, no training
  alone/D     branch D merged alone: the branch's own 2-expert model, what the merged MoE
              reaches on D if routing were perfect (its ceiling)
  soups, btx  weight-merge baselines: the BTX model routes top-2 (BTX's recipe) with a random
              router, no training after the merge
  btx-tune    the BTX model with its router tuned on public data, only the rows train: the
              BTX of FlexOlmo's Table 1 ("public-only post-training"), whose parties' data
              cannot be pooled to train the router
  optout      the learned-rows merge with one party removed
  tune        the learned-rows merge with FlexOlmo's optional router tuning: only the router
              rows train, on public data (Table 1 has the merged model with and without it)
  ffn/D       with --set uncoordinated=true: FlexOlmo's uncoordinated expert per domain (the
              FFN trained in place, no public expert beside it, no replay), merged with its
              initial router rows and with ridge rows (uncoordinated/R)
  eval        every system on every domain's held-out split -> report.md, report.json, plots
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np
from tqdm import tqdm

from moesaic.branch_train.sparse_upcycle import upcycle_checkpoint
from moesaic.branch_train.trainer import Job, train
from moesaic.configs import tiny
from moesaic.data.corpora import build_embedded
from moesaic.data.loader import TokenBatches, load_manifest
from moesaic.eval import ensembles, perplexity, report
from moesaic.merge import baselines, fuse
from moesaic.merge.public_stats import compute_public_stats
from moesaic.merge.tune import tune_router_on_data
from moesaic.model import checkpoint

DOMAINS = ("code", "prose", "law", "math")
ROUTERS = ("learned-rows", "contrast", "centroid", "ridge", "random")
# Router options, picked on small probes that used held-out sequences (so the merged rows of
# these two kinds are slightly tuned to the evaluation): ridge rows regress one-hot labels and
# their logits are small, scale 5 was the best of (1, 5, 20); contrast selectivity 2 was the
# best of (0, 2, 4).
ROUTER_OPTIONS = {"ridge": {"scale": 5.0}, "contrast": {"selectivity": 2.0}}
OPT_OUT = "code"
CEILING = "each branch alone on its domain"
DENSE_OWN = "each dense expert on its own domain"  # what BTM's posterior picks, at best
TUNED = "merged MoE (learned-rows, router tuned)"
BTX = "BTX (random router)"
BTX_TUNED = "BTX (router tuned on public data)"
TUNE_LR = 1e-3
# The systems of the per-domain bar plot: one of each kind (the other routers, the opt-out and
# the dense experts off their own domains are in the tables and the average plot).
HEADLINE = ("public model", "soup (uniform)", "soup (weighted)", "BTM (top-2)", "c-BTM (top-2)",
            BTX_TUNED, "merged MoE (learned-rows)", TUNED, CEILING,
            "unrestricted MoE (all data)", DENSE_OWN)


@dataclasses.dataclass(frozen=True)
class Preset:
    data_size: str
    model: dict
    seq_len: int
    batch: int
    pretrain_steps: int
    branch_steps: int
    dense_steps: int
    moe_steps: int
    lr: float
    branch_lr: float  # coordinated and dense branches alike
    public_mix: float  # share of public data replayed in coordinated branches
    router_input: str  # what the branches' routers score (model.router_input)
    top_k: int
    tune_steps: int  # router tuning after the merge (FlexOlmo's optional step), on public data
    eval_sequences: int
    uncoordinated: bool = False  # also FlexOlmo's uncoordinated experts (branch.mode=ffn)
    # branch.negative_bias: False holds each owner's bias at 0. The default is what a workdir
    # made before the field ran with; both presets set False (it measured better, README).
    negative_bias: bool = True
    # experts per token of the BTX baseline: BTX's recipe is 2; a workdir made before the
    # field merged BTX at the preset's top_k (4 of 4), so that is the default here
    btx_top_k: int = 4


# The uncoordinated experts' merges: router kind -> what its rows are. Their learned rows are
# the initial rows (config.branch.router_init), which an ffn job never trains.
UNCOORDINATED_ROWS = {"learned-rows": "initial rows", "ridge": "ridge"}
UNCOORDINATED = {r: f"merged uncoordinated experts ({rows})"  # router kind -> system name
                 for r, rows in UNCOORDINATED_ROWS.items()}
FFN_ALONE = "each uncoordinated FFN expert alone on its domain"

PRESETS = {
    "default": Preset(data_size="default", model={}, seq_len=128, batch=16,
                      pretrain_steps=500, branch_steps=150, dense_steps=150, moe_steps=300,
                      lr=3e-3, branch_lr=2e-3, public_mix=0.3, router_input="prefix_mean",
                      top_k=4, tune_steps=150, eval_sequences=48, negative_bias=False,
                      btx_top_k=2),
    "smoke": Preset(data_size="smoke", model=dict(d_model=32, n_layers=2, n_heads=2,
                                                  n_kv_heads=2, d_ff=64),
                    seq_len=32, batch=8, pretrain_steps=300, branch_steps=40, dense_steps=40,
                    moe_steps=60, lr=3e-3, branch_lr=2e-3, public_mix=0.3,
                    router_input="prefix_mean", top_k=4, tune_steps=20, eval_sequences=6,
                    negative_bias=False, btx_top_k=2),
}


def with_overrides(preset: Preset, items: list[str]) -> Preset:
    """`preset` with `NAME=VALUE` items (`--set`) applied, typed by the preset's values."""
    settable = {f.name for f in dataclasses.fields(Preset)} - {"model"}
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in settable:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE, NAME one of {sorted(settable)}")
        kind = type(getattr(preset, key))
        try:
            changes[key] = _parse_bool(value) if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} is of type {kind.__name__}") from None
    return dataclasses.replace(preset, **changes)


def _parse_bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return value.lower() in ("true", "1")


def claim_workdir(w: pathlib.Path, preset: Preset) -> None:
    """Stages are skipped when their output exists, so a workdir serves one preset: the first
    run records it in W/preset.json and a run with other settings is refused."""
    path, wanted = w / "preset.json", dataclasses.asdict(preset)
    if path.exists():  # a field added since the workdir was made ran at its default there
        defaults = {f.name: f.default for f in dataclasses.fields(Preset)
                    if f.default is not dataclasses.MISSING}
        had = {**defaults, **json.loads(path.read_text())}
        diff = sorted(k for k in set(had) | set(wanted) if had.get(k) != wanted.get(k))
        if diff:
            changes = ", ".join(f"{k}: {had.get(k)!r} there, {wanted.get(k)!r} now" for k in diff)
            raise ValueError(f"{w} was made with other demo settings ({changes}); use another "
                             "--workdir")
    elif any(w.iterdir()):
        raise ValueError(f"{w} holds files but no preset.json (made by an older demo, or not a "
                         "demo workdir): its settings are unknown; use another --workdir")
    else:
        path.write_text(json.dumps(wanted, indent=1) + "\n")


def job_config(preset: Preset, *, steps: int, lr: float, source: str = "", mixture: str = ""):
    config = tiny.get_config()
    config.branch.source = source
    config.branch.public_mix = preset.public_mix  # read by coordinated branches only
    config.branch.negative_bias = preset.negative_bias
    config.model.router_input = preset.router_input  # only an MoE reads it
    config.model.scan_layers = False  # 4 layers: the unrolled step is faster on CPU
    config.model.update(preset.model)
    config.data.seq_len, config.data.global_batch = preset.seq_len, preset.batch
    if mixture:
        config.data.mixture = mixture
    config.train.update(steps=steps, lr=lr, warmup_steps=max(1, steps // 10),
                        log_every=max(1, steps // 10), ckpt_every=steps)
    return config


def stage_names(preset: Preset) -> list[str]:
    uncoordinated = ([f"ffn/{d}" for d in DOMAINS]
                     + [f"uncoordinated/{r}" for r in UNCOORDINATED]
                     if preset.uncoordinated else [])
    return (["data", "public"] + [f"branch/{d}" for d in DOMAINS]
            + [f"dense/{d}" for d in DOMAINS] + ["moe-all", "public-stats"]
            + [f"merge/{r}" for r in ROUTERS] + [f"alone/{d}" for d in DOMAINS]
            + ["soups", "btx", "btx-tune", "optout", "tune"] + uncoordinated + ["eval"])


class Stages:
    """Runs named stages in order; a stage whose output is a complete checkpoint (or file) is
    skipped. One progress bar over the stages; each stage may show its own."""

    def __init__(self, names: list[str]):
        self.bar = tqdm(total=len(names), desc="demo", unit="stage", position=0,
                        dynamic_ncols=True)
        self.times: dict[str, float] = {}

    def run(self, name: str, output: pathlib.Path, fn) -> pathlib.Path:
        done = output.is_file() or checkpoint.is_complete(output)
        self.bar.set_postfix_str(name)
        if done:
            tqdm.write(f"[demo] {name}: done before ({output})")
        else:
            tqdm.write(f"[demo] {name} ...")
            start = time.perf_counter()
            fn()
            self.times[name] = time.perf_counter() - start
            tqdm.write(f"[demo] {name}: {self.times[name]:.0f} s")
        self.bar.update(1)
        return output


def _train(config, kind: str, workdir: pathlib.Path, data: pathlib.Path,
           base: pathlib.Path | None = None) -> None:
    result = train(config, Job(kind=kind, workdir=workdir, data_dir=data, base=base))
    if result.stopped:
        raise SystemExit(f"{workdir}: stopped by a signal; run the demo again to resume")


def _sample(data: pathlib.Path, source: str, preset: Preset) -> np.ndarray:
    """A training sample of one domain (the weighted soup's weights), never held-out text."""
    batches = TokenBatches(data, source, seq_len=preset.seq_len, global_batch=preset.batch,
                           seed=1234)
    return np.concatenate([batches.get(step) for step in range(2)])


def run_demo(workdir: str | pathlib.Path, preset_name: str = "default",
             overrides: list[str] | tuple = ()) -> dict:
    preset = with_overrides(PRESETS[preset_name], list(overrides))
    w = pathlib.Path(workdir).absolute()
    w.mkdir(parents=True, exist_ok=True)
    claim_workdir(w, preset)
    data = w / "data"
    stages = Stages(stage_names(preset))

    # ---- data and training -----------------------------------------------------------
    stages.run("data", data / "public" / "manifest.json",
               lambda: build_embedded(data, size=preset.data_size))
    public = stages.run("public", w / "public" / "public", lambda: _train(
        job_config(preset, steps=preset.pretrain_steps, lr=preset.lr, mixture="public"),
        "pretrain", w / "public", data))
    branches, dense = {}, {}
    for d in DOMAINS:
        branches[d] = stages.run(f"branch/{d}", w / "branches" / d / "artifact", lambda d=d: _train(
            job_config(preset, steps=preset.branch_steps, lr=preset.branch_lr, source=d),
            "branch", w / "branches" / d, data, public))
    def train_dense(d):
        config = job_config(preset, steps=preset.dense_steps, lr=preset.branch_lr, source=d)
        config.branch.stats_batches = 0  # no router statistics: the demo's BTX starts random
        _train(config, "dense", w / "dense" / d, data, public)
    for d in DOMAINS:
        dense[d] = stages.run(f"dense/{d}", w / "dense" / d / "artifact",
                              lambda d=d: train_dense(d))
    everything = ",".join(f"{s}:1" for s in (*DOMAINS, "public"))
    n_all = 1 + len(DOMAINS)

    def train_moe_all():
        if not checkpoint.is_complete(w / "moe-all" / "base"):
            upcycle_checkpoint(public, w / "moe-all" / "base", n_experts=n_all,
                               top_k=preset.top_k, router_input=preset.router_input)
        config = job_config(preset, steps=preset.moe_steps, lr=preset.branch_lr,
                            source=everything)
        config.model.update(n_experts=n_all, top_k=preset.top_k)
        _train(config, "dense", w / "moe-all", data, w / "moe-all" / "base")
    moe_all = stages.run("moe-all", w / "moe-all" / "artifact", train_moe_all)

    # ---- merges and baselines (no training) ------------------------------------------
    def make_public_stats():  # statistics of public data under the public model
        (w / "public-stats").mkdir(exist_ok=True)
        made = compute_public_stats(public, data, seq_len=preset.seq_len,
                                    max_sequences=8 * preset.batch, workdir=str(w),
                                    router_input=preset.router_input)
        made.rename(w / "public-stats" / "stats")
        shutil.rmtree(made.parent)  # the now empty temporary folder
    public_stats = stages.run("public-stats", w / "public-stats" / "stats", make_public_stats)
    merged = {}
    for r in ROUTERS:
        merged[r] = stages.run(f"merge/{r}", w / "merged" / r, lambda r=r: fuse.merge_paths(
            public, [branches[d] for d in DOMAINS], router=r, top_k=preset.top_k,
            out=w / "merged" / r, public_stats=public_stats, options=ROUTER_OPTIONS.get(r),
            log=tqdm.write))
    alone = {d: stages.run(f"alone/{d}", w / "alone" / d, lambda d=d: fuse.merge_paths(
        public, [branches[d]], router="learned-rows", top_k=2, out=w / "alone" / d,
        log=tqdm.write)) for d in DOMAINS}

    def make_soups():  # five soups, one stage: a re-run keeps the soups already written
        for name, domain in [("uniform", None)] + [(f"weighted-{d}", d) for d in DOMAINS]:
            if not checkpoint.is_complete(w / "soups" / name):
                sample = None if domain is None else _sample(data, domain, preset)
                baselines.soup([dense[e] for e in DOMAINS], w / "soups" / name,
                               sample_bt1=sample, log=tqdm.write)
        (w / "soups" / "done").write_text("ok\n")
    stages.run("soups", w / "soups" / "done", make_soups)
    btx_path = stages.run("btx", w / "btx", lambda: baselines.btx(
        [dense[d] for d in DOMAINS], w / "btx", router="random", top_k=preset.btx_top_k,
        log=tqdm.write))
    btx_tuned = stages.run("btx-tune", w / "btx-tuned", lambda: tune_router_on_data(
        btx_path, w / "btx-tuned", data, "public", seq_len=preset.seq_len, batch=preset.batch,
        seed=1, steps=preset.tune_steps, lr=TUNE_LR, log=tqdm.write))
    optout = stages.run("optout", w / "merged" / f"learned-rows-without-{OPT_OUT}",
                        lambda: fuse.remove(merged["learned-rows"], OPT_OUT,
                                            out=w / "merged" / f"learned-rows-without-{OPT_OUT}",
                                            log=tqdm.write))
    tuned = stages.run("tune", w / "merged" / "learned-rows-tuned", lambda: tune_router_on_data(
        merged["learned-rows"], w / "merged" / "learned-rows-tuned", data, "public",
        seq_len=preset.seq_len, batch=preset.batch, seed=1, steps=preset.tune_steps, lr=TUNE_LR,
        log=tqdm.write))

    ffn, uncoordinated = {}, {}
    if preset.uncoordinated:
        for d in DOMAINS:
            def train_ffn(d=d):
                config = job_config(preset, steps=preset.branch_steps, lr=preset.branch_lr,
                                    source=d)
                config.branch.mode = "ffn"
                _train(config, "ffn", w / "ffn" / d, data, public)
            ffn[d] = stages.run(f"ffn/{d}", w / "ffn" / d / "artifact", train_ffn)
        for r in UNCOORDINATED:
            out = w / "merged" / f"uncoordinated-{r}"
            uncoordinated[r] = stages.run(f"uncoordinated/{r}", out, lambda r=r, out=out: (
                fuse.merge_paths(public, [ffn[d] for d in DOMAINS], router=r,
                                 top_k=preset.top_k, out=out, public_stats=public_stats,
                                 options=ROUTER_OPTIONS.get(r), log=tqdm.write)))

    # ---- evaluation and the report ---------------------------------------------------
    results_path = w / "results.json"

    def evaluate_all():
        domains = [*DOMAINS, "public"]
        kw = dict(seq_len=preset.seq_len, max_sequences=preset.eval_sequences, batch_size=8)

        def ev(path, name):
            return perplexity.evaluate(path, data, domains, name=name, **kw)

        systems = {"public model": ev(public, "public")}
        systems["soup (uniform)"] = ev(w / "soups" / "uniform", "soup")
        systems["soup (weighted)"] = {
            d: perplexity.evaluate(w / "soups" / f"weighted-{d}", data, [d], name=f"soup-{d}",
                                   **kw)[d] for d in DOMAINS}
        experts = {"public": public, **{d: dense[d] for d in DOMAINS}}
        systems["BTM (top-2)"] = perplexity.evaluate_scorer(
            ensembles.btm(experts, top_k=2), data, domains, name="btm", **kw)
        centroids = ensembles.TfidfCentroids.from_data(data, list(experts))
        systems["c-BTM (top-2)"] = perplexity.evaluate_scorer(
            ensembles.cbtm(experts, centroids, top_k=2), data, domains, name="cbtm", **kw)
        systems[BTX] = ev(btx_path, "btx")
        systems[BTX_TUNED] = ev(btx_tuned, "btx-tuned")
        systems[CEILING] = {d: perplexity.evaluate(alone[d], data, [d], name=f"alone-{d}",
                                                   **kw)[d] for d in DOMAINS}
        for r in ROUTERS:
            systems[f"merged MoE ({r})"] = ev(merged[r], r)
        systems[TUNED] = ev(tuned, "tuned")
        systems[f"merged MoE (learned-rows) without {OPT_OUT}"] = ev(optout, "optout")
        systems["unrestricted MoE (all data)"] = ev(moe_all, "moe-all")
        for d in DOMAINS:
            systems[f"dense expert {d}"] = ev(dense[d], f"dense-{d}")
        if preset.uncoordinated:
            systems[FFN_ALONE] = {d: perplexity.evaluate(
                w / "ffn" / d / "model", data, [d], name=f"ffn-{d}", **kw)[d] for d in DOMAINS}
            for r, path in uncoordinated.items():
                systems[UNCOORDINATED[r]] = ev(path, f"uncoordinated-{r}")
        partial = results_path.with_name(results_path.name + ".partial")
        partial.write_text(json.dumps({"domains": domains, "systems": systems}))
        os.replace(partial, results_path)  # a killed write never reads as a finished stage
    stages.run("eval", results_path, evaluate_all)
    results = with_dense_own(json.loads(results_path.read_text()))
    hashes = {s: load_manifest(data, s)["content_hash"][:12] for s in results["domains"]}
    notes = findings(results, preset_name) + [
        "- corpora (content hashes): " + ", ".join(f"{s} {h}" for s, h in hashes.items())
        + "; prose and law are read from the installed packages, so other numbers with other "
        "hashes are expected."]
    report.write_report(w, results, title="moesaic demo: merged experts vs baselines",
                        notes=notes, average_over=DOMAINS,
                        bar_systems=HEADLINE)
    stages.bar.close()
    print("\n".join(notes))
    print(f"report: {w / 'report.md'}")
    return results


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


def _private_avg(system: dict) -> float:
    return float(np.mean([system[d]["bpb"] for d in DOMAINS]))


def findings(results: dict, preset_name: str) -> list[str]:
    """A few plain sentences on what the numbers show."""
    systems = results["systems"]
    avg = {name: _private_avg(s) for name, s in systems.items() if all(d in s for d in DOMAINS)}
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


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="where everything is written")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change one preset field (branch_lr=7e-4, router_input=token, "
                             "public_mix=0, top_k=2, uncoordinated=true, ...); repeatable")


def use_compilation_cache(path: pathlib.Path) -> None:
    """XLA's persistent compilation cache in `path`, unless the user named one
    (JAX_COMPILATION_CACHE_DIR). Every stage compiles its own train and eval steps, and the four
    branches (and the four dense experts) compile the same programs: with the cache each is
    compiled once. A cache holds executables the process will run, so it must be trusted
    like the code: it lives in the workdir."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run(args: argparse.Namespace) -> int:
    use_compilation_cache(pathlib.Path(args.workdir).absolute() / "xla-cache")
    try:
        run_demo(args.workdir, args.preset, args.set)
    except ValueError as err:
        print(f"moesaic demo: {err}")
        return 2
    return 0
