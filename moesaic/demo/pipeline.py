"""The demo's pipeline: a list of stages built from its settings (moesaic/configs/demo.py),
which `runner.run_stages` walks. Each stage is skipped when its output exists, so a re-run
resumes where it stopped:

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
  lowrank/R   the branches merged as low-rank experts (rank `low_rank`, FlexMoRE), with
              learned rows and Arrow; lora/D and lora-merge/R with lora_branches=true: one
              low-rank branch per domain and their merges (moesaic/demo/low_rank.py)
  ffn/D       with uncoordinated=true: FlexOlmo's uncoordinated expert per domain (the FFN
              trained in place, no public expert beside it, no replay), merged with its
              initial router rows and with ridge rows (uncoordinated/R)
  screen, hijack/P, screening
              with screen_rows > 0: the learned-rows merge screened on public proxy data, and
              a planted router hijacker merged unscreened and screened (policy P: refuse,
              down-weight), against the merge without that party (moesaic/demo/screening.py)
  tasks       downstream tasks from the held-out split for the headline systems (demo/tasks.py)
  audit       the extraction audit of each party's training text (demo/audit.py)
  eval        every system on every domain's held-out split -> report.md, report.json, plots

The training stages run the jobs of moesaic/configs/demo.py (`demo.py:job=branch,source=D`),
so a party trained by hand with that config is trained as the demo's are.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import ml_collections
import numpy as np
from tqdm import tqdm

from moesaic.branch_train.sparse_upcycle import upcycle_checkpoint
from moesaic.branch_train.trainer import Job, train
from moesaic.configs import demo as settings
from moesaic.data.corpora import build_embedded
from moesaic.data.loader import TokenBatches, load_manifest
from moesaic.demo import audit as demo_audit
from moesaic.demo import findings, low_rank, runner, screening, workdir
from moesaic.demo import tasks as demo_tasks
from moesaic.demo.runner import Stage
from moesaic.demo.systems import (
    BTX,
    BTX_TUNED,
    CALIBRATED,
    CALIBRATION_ROWS,
    CEILING,
    DOMAINS,
    FFN_ALONE,
    HEADLINE,
    OPT_OUT,
    ROUTER_OPTIONS,
    ROUTERS,
    TUNED,
    UNCOORDINATED,
)
from moesaic.eval import ensembles, perplexity, report
from moesaic.merge import baselines, calibrate, fuse
from moesaic.merge.public_stats import compute_public_stats
from moesaic.merge.tune import tune_router_on_data
from moesaic.model import checkpoint

TUNE_LR = 1e-3  # router tuning, of the merged MoE and of BTX alike


class Demo:
    """One demo run: its workdir, data and settings, where each stage writes, and the stages."""

    def __init__(self, w: pathlib.Path, preset: ml_collections.ConfigDict):
        self.w, self.data, self.preset = w, w / "data", preset
        p = self.paths = {
            "data": self.data / "public" / "manifest.json",
            "public": w / "public" / "public",
            **{f"branch/{d}": w / "branches" / d / "artifact" for d in DOMAINS},
            **{f"dense/{d}": w / "dense" / d / "artifact" for d in DOMAINS},
            "moe-all": w / "moe-all" / "artifact",
            "public-stats": w / "public-stats" / "stats",
            **{f"merge/{r}": w / "merged" / r for r in ROUTERS},
            "calibrated": w / "merged" / "learned-rows-calibrated",
            **{f"alone/{d}": w / "alone" / d for d in DOMAINS},
            "soups": w / "soups" / "done",
            "btx": w / "btx",
            "btx-tune": w / "btx-tuned",
            "optout": w / "merged" / f"learned-rows-without-{OPT_OUT}",
            "tune": w / "merged" / "learned-rows-tuned",
        }
        if preset.uncoordinated:
            p.update({f"ffn/{d}": w / "ffn" / d / "artifact" for d in DOMAINS})
            p.update({f"uncoordinated/{r}": w / "merged" / f"uncoordinated-{r}"
                      for r in UNCOORDINATED})
        p.update(low_rank.paths(w, preset))
        p.update(screening.paths(w, preset))
        p["tasks"] = w / "tasks.json"
        p["audit"] = w / "audit.json"
        p["eval"] = w / "results.json"

    def stages(self) -> list[Stage]:
        """The stages in the order they run: name, output, the function that writes it."""
        p, preset = self.paths, self.preset
        work = {
            "data": lambda: build_embedded(self.data, size=preset.data_size),
            "public": lambda: self.train("pretrain", "", self.w / "public", None),
            "moe-all": self.train_moe_all,
            "public-stats": self.make_public_stats,
            "soups": self.make_soups,
            "btx": lambda: baselines.btx(
                [p[f"dense/{d}"] for d in DOMAINS], p["btx"], router="random",
                top_k=preset.btx_top_k, log=tqdm.write),
            "btx-tune": lambda: self.tune(p["btx"], p["btx-tune"]),
            "optout": lambda: fuse.remove(p["merge/learned-rows"], OPT_OUT, out=p["optout"],
                                          log=tqdm.write),
            "tune": lambda: self.tune(p["merge/learned-rows"], p["tune"]),
            "tasks": lambda: demo_tasks.run_tasks(p, self.w, self.data, preset.seq_len,
                                                  p["tasks"]),
            "audit": lambda: demo_audit.run_audit(p, self.data, preset.seq_len, p["audit"]),
            "eval": self.evaluate_all,
        }
        for d in DOMAINS:
            for job, folder in (("branch", "branches"), ("dense", "dense"), ("ffn", "ffn")):
                work[f"{job}/{d}"] = (lambda job=job, d=d, folder=folder: self.train(
                    job, d, self.w / folder / d, p["public"]))
            work[f"alone/{d}"] = lambda d=d: fuse.merge_paths(
                p["public"], [p[f"branch/{d}"]], router="learned-rows", top_k=2,
                out=p[f"alone/{d}"], log=tqdm.write)
        for r in ROUTERS:
            work[f"merge/{r}"] = lambda r=r: self.merge([p[f"branch/{d}"] for d in DOMAINS], r,
                                                        p[f"merge/{r}"])
        work["calibrated"] = lambda: self.merge(
            [p[f"branch/{d}"] for d in DOMAINS], "learned-rows", p["calibrated"],
            calibration=self.calibration())
        for r in UNCOORDINATED:
            work[f"uncoordinated/{r}"] = lambda r=r: self.merge(
                [p[f"ffn/{d}"] for d in DOMAINS], r, p[f"uncoordinated/{r}"])
        work.update(low_rank.work(self))
        work.update(screening.work(self))
        return [Stage(name, output, work[name]) for name, output in p.items()]

    # ---- training --------------------------------------------------------------------
    def train(self, job: str, source: str, out: pathlib.Path, base: pathlib.Path | None) -> None:
        """Job `job` of moesaic/configs/demo.py, for party `source`, into `out`."""
        config = settings.job_config(self.preset, job, source)
        self.run_job(config, settings.JOBS[job].kind, out, base)

    def run_job(self, config, kind: str, out: pathlib.Path, base: pathlib.Path | None) -> None:
        result = train(config, Job(kind=kind, workdir=out, data_dir=self.data, base=base))
        if result.stopped:
            raise SystemExit(f"{out}: stopped by a signal; run the demo again to resume")

    def train_moe_all(self) -> None:
        base = self.w / "moe-all" / "base"
        if not checkpoint.is_complete(base):
            upcycle_checkpoint(self.paths["public"], base, n_experts=len(settings.ALL_SOURCES),
                               top_k=self.preset.top_k, router_input=self.preset.router_input)
        self.train("moe-all", "", self.w / "moe-all", base)

    # ---- merges and baselines (no training) ------------------------------------------
    def make_public_stats(self) -> None:  # statistics of public data under the public model
        (self.w / "public-stats").mkdir(exist_ok=True)
        made = compute_public_stats(self.paths["public"], self.data,
                                    seq_len=self.preset.seq_len,
                                    max_sequences=8 * self.preset.batch, workdir=str(self.w),
                                    router_input=self.preset.router_input)
        made.rename(self.paths["public-stats"])
        shutil.rmtree(made.parent)  # the now empty temporary folder

    def merge(self, branches: list[pathlib.Path], router: str, out: pathlib.Path,
              **kw) -> None:
        fuse.merge_paths(self.paths["public"], branches, router=router, top_k=self.preset.top_k,
                         out=out, public_stats=self.paths["public-stats"],
                         options=ROUTER_OPTIONS.get(router), log=tqdm.write, **kw)

    def calibration(self) -> calibrate.Request:
        """The calibration of the demo's calibrated merges: CALIBRATION_ROWS public rows."""
        cfg = checkpoint.model_config(checkpoint.read_meta(self.paths["public"]))
        return calibrate.request_from_data(self.data, cfg, seq_len=self.preset.seq_len,
                                           rows=CALIBRATION_ROWS)

    def make_soups(self) -> None:  # five soups, one stage: a re-run keeps those already written
        soups = self.w / "soups"
        for name, domain in [("uniform", None)] + [(f"weighted-{d}", d) for d in DOMAINS]:
            if not checkpoint.is_complete(soups / name):
                sample = None if domain is None else self.sample(domain)
                baselines.soup([self.paths[f"dense/{e}"] for e in DOMAINS], soups / name,
                               sample_bt1=sample, log=tqdm.write)
        (soups / "done").write_text("ok\n")

    def sample(self, source: str) -> np.ndarray:
        """A training sample of one domain (the weighted soup's weights), never held-out text."""
        batches = TokenBatches(self.data, source, seq_len=self.preset.seq_len,
                               global_batch=self.preset.batch, seed=1234)
        return np.concatenate([batches.get(step) for step in range(2)])

    def tune(self, model: pathlib.Path, out: pathlib.Path) -> None:
        tune_router_on_data(model, out, self.data, "public", seq_len=self.preset.seq_len,
                            batch=self.preset.batch, seed=1, steps=self.preset.tune_steps,
                            lr=TUNE_LR, log=tqdm.write)

    # ---- evaluation ------------------------------------------------------------------
    def evaluate_all(self) -> None:
        p, w, data = self.paths, self.w, self.data
        domains = [*DOMAINS, "public"]
        kw = dict(seq_len=self.preset.seq_len, max_sequences=self.preset.eval_sequences,
                  batch_size=8)

        def ev(path, name):
            return perplexity.evaluate(path, data, domains, name=name, **kw)

        def each_own(paths, name):  # each model on its own domain only
            return {d: perplexity.evaluate(paths[d], data, [d], name=f"{name}-{d}", **kw)[d]
                    for d in DOMAINS}

        dense = {d: p[f"dense/{d}"] for d in DOMAINS}
        systems = {"public model": ev(p["public"], "public")}
        systems["soup (uniform)"] = ev(w / "soups" / "uniform", "soup")
        systems["soup (weighted)"] = each_own(
            {d: w / "soups" / f"weighted-{d}" for d in DOMAINS}, "soup")
        experts = {"public": p["public"], **dense}
        systems["BTM (top-2)"] = perplexity.evaluate_scorer(
            ensembles.btm(experts, top_k=2), data, domains, name="btm", **kw)
        centroids = ensembles.TfidfCentroids.from_data(data, list(experts))
        systems["c-BTM (top-2)"] = perplexity.evaluate_scorer(
            ensembles.cbtm(experts, centroids, top_k=2), data, domains, name="cbtm", **kw)
        systems[BTX] = ev(p["btx"], "btx")
        systems[BTX_TUNED] = ev(p["btx-tune"], "btx-tuned")
        systems[CEILING] = each_own({d: p[f"alone/{d}"] for d in DOMAINS}, "alone")
        for r in ROUTERS:
            systems[f"merged MoE ({r})"] = ev(p[f"merge/{r}"], r)
        systems[TUNED] = ev(p["tune"], "tuned")
        systems[CALIBRATED] = ev(p["calibrated"], "calibrated")
        systems[f"merged MoE (learned-rows) without {OPT_OUT}"] = ev(p["optout"], "optout")
        systems["unrestricted MoE (all data)"] = ev(p["moe-all"], "moe-all")
        for d in DOMAINS:
            systems[f"dense expert {d}"] = ev(dense[d], f"dense-{d}")
        if self.preset.uncoordinated:
            systems[FFN_ALONE] = each_own({d: w / "ffn" / d / "model" for d in DOMAINS}, "ffn")
            for r, name in UNCOORDINATED.items():
                systems[name] = ev(p[f"uncoordinated/{r}"], f"uncoordinated-{r}")
        systems.update(low_rank.systems(self, ev))
        results_path = p["eval"]
        partial = results_path.with_name(results_path.name + ".partial")
        partial.write_text(json.dumps({"domains": domains, "systems": systems}))
        os.replace(partial, results_path)  # a killed write never reads as a finished stage


def stage_names(preset: ml_collections.ConfigDict) -> list[str]:
    return [stage.name for stage in Demo(pathlib.Path("."), preset).stages()]


def run_demo(w: str | pathlib.Path, preset: ml_collections.ConfigDict) -> dict:
    """Runs (or resumes) the demo with the settings `preset` (moesaic/configs/demo.py) in
    workdir `w`; writes W/report.md, report.json and the plots; returns the results."""
    w = pathlib.Path(w).absolute()
    w.mkdir(parents=True, exist_ok=True)
    workdir.claim_workdir(w, preset)
    demo = Demo(w, preset)
    runner.run_stages(demo.stages())
    results = findings.with_dense_own(json.loads(demo.paths["eval"].read_text()))
    hashes = {s: load_manifest(demo.data, s)["content_hash"][:12] for s in results["domains"]}
    notes = findings.findings(results, preset.preset) + [findings.corpus_note(hashes)]
    notes += [n for n in [low_rank.note(preset)] if n]
    task_record = json.loads(demo.paths["tasks"].read_text())
    audit_record = json.loads(demo.paths["audit"].read_text())
    sections = [demo_tasks.task_table(task_record), demo_audit.audit_table(audit_record)]
    extra = {"tasks": task_record, "audit": audit_record}
    if "screening" in demo.paths:
        extra["screening"] = json.loads(demo.paths["screening"].read_text())
        sections.append(screening.screening_table(extra["screening"]))
    report.write_report(w, results, title="moesaic demo: merged experts vs baselines",
                        notes=notes, average_over=DOMAINS, bar_systems=HEADLINE,
                        sections=sections, extra=extra)
    print("\n".join(notes))
    print(f"report: {w / 'report.md'}")
    return results
