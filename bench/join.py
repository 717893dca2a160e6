"""A party that joins later (issue 27, "What it must show"): how much of its gain does it get?

Over a finished demo workdir W (its public model, its learned-rows merge of four parties, its
prepared data), a held-out domain none of the demo's parties has, the C headers of the Python
installation (`sysconfig` include, split 94/6 by the corpora's stable hash), is prepared beside
W's sources (in OUT/data, W's sources linked), and
  - its coordinated branch and its dense expert are trained exactly as the demo trains its own
    (moesaic/configs/demo.py:job=branch / job=dense, W's settings);
  - the branch is joined to W's merge with `merge add` (OUT/joined) and merged alone with the
    public model (OUT/alone, the ceiling of any routing);
  - every model is scored on every domain's held-out split (the demo's evaluation size).
It prints, on the new domain, the share of the dense expert's gain over the public model that
the joined model gets and that the branch alone gets, where the joined model's router weight
goes on the new domain, and the joined model's move on every other domain against the merge
it joined (percent of bits per byte); OUT/join.json keeps them.

    .venv/bin/python bench/join.py --workdir runs/demo --out /tmp/join [--merged learned-rows]
        [--calibrate]   # also the calibrated merge, and the party joined to it
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sysconfig

import numpy as np

NEW = "cheaders"


def new_domain_texts() -> list[str]:
    root = pathlib.Path(sysconfig.get_paths()["include"])
    return [p.read_text(errors="replace") for p in sorted(root.rglob("*.h"))]


def prepare(w: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    from moesaic.data import corpora
    from moesaic.data.prepare import write_source
    from moesaic.data.sources import heldout_score
    from moesaic.data.tokenizer import BYTES

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for source in (w / "data").iterdir():
        if source.is_dir() and not (data / source.name).exists():
            (data / source.name).symlink_to(source.resolve(), target_is_directory=True)
    if not (data / NEW / "manifest.json").exists():
        docs = list(corpora._pieces(new_domain_texts()))
        held = [d for d in docs if heldout_score(d) < corpora.HELDOUT_FRACTION]
        train = [d for d in docs if heldout_score(d) >= corpora.HELDOUT_FRACTION]
        write_source(data, NEW, {"train": lambda: train, "heldout": lambda: held},
                     tokenizer=BYTES, origin={"kind": "bench/join.py", "what": "C headers"})
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished demo workdir")
    parser.add_argument("--out", required=True, help="scratch folder (kept: a re-run resumes)")
    parser.add_argument("--merged", default="learned-rows", help="W/merged/NAME to join")
    parser.add_argument("--calibrate", action="store_true",
                        help="also join the calibrated merge (W/merged/learned-rows-calibrated, "
                             "made from W's branches when W has none) with `merge add`")
    args = parser.parse_args()

    from moesaic.branch_train.trainer import Job, train
    from moesaic.configs import demo as settings
    from moesaic.demo.systems import DOMAINS
    from moesaic.demo.workdir import use_compilation_cache
    from moesaic.eval import perplexity
    from moesaic.merge import calibrate, fuse
    from moesaic.model import checkpoint

    w, out = pathlib.Path(args.workdir).absolute(), pathlib.Path(args.out).absolute()
    recorded = json.loads((w / "preset.json").read_text())
    preset = settings.preset_config(recorded.get("data_size", "default"))
    preset.update({k: v for k, v in recorded.items() if k in preset and k != "model"})
    preset.model.update(recorded.get("model", {}))
    use_compilation_cache(w / "xla-cache")
    data = prepare(w, out)
    public, merged = w / "public" / "public", w / "merged" / args.merged
    made = {}
    for job in ("branch", "dense"):
        folder = out / job
        made[job] = folder / "artifact"
        if not checkpoint.is_complete(made[job]):
            config = settings.job_config(preset, job, NEW)
            train(config, Job(kind=settings.JOBS[job].kind, workdir=folder, data_dir=data,
                              base=public))
    models = {"public": public, "merged": merged, "joined": out / "joined",
              "alone": out / "alone", "dense": made["dense"]}
    if not checkpoint.is_complete(models["joined"]):
        fuse.add(merged, [made["branch"]], out=models["joined"])
    if not checkpoint.is_complete(models["alone"]):
        fuse.merge_paths(public, [made["branch"]], router="learned-rows", top_k=2,
                         out=models["alone"])
    if args.calibrate:  # the calibrated merge, and the party joined to it with `merge add`
        calibrated = w / "merged" / "learned-rows-calibrated"
        if not checkpoint.is_complete(calibrated):
            calibrated = out / "calibrated"
        if not checkpoint.is_complete(calibrated):
            cfg = checkpoint.model_config(checkpoint.read_meta(public))
            request = calibrate.request_from_data(w / "data", cfg, seq_len=preset.seq_len,
                                                  rows=64)
            fuse.merge_paths(public, [w / "branches" / d / "artifact" for d in DOMAINS],
                             router="learned-rows", top_k=preset.top_k, out=calibrated,
                             public_stats=w / "public-stats" / "stats", calibration=request)
        models["merged, calibrated"] = calibrated
        models["joined, calibrated"] = out / "joined-calibrated"
        if not checkpoint.is_complete(models["joined, calibrated"]):
            fuse.add(calibrated, [made["branch"]], out=models["joined, calibrated"])
    domains = [*DOMAINS, "public", NEW]
    bpb, shares = {}, {}
    for name, path in models.items():
        only = [NEW] if name in ("alone", "dense") else domains
        metrics = perplexity.evaluate(path, data, only, seq_len=preset.seq_len,
                                      max_sequences=preset.eval_sequences, batch_size=8,
                                      name=name, progress=False)
        bpb[name] = {d: metrics[d]["bpb"] for d in only}
        if name.startswith("joined"):  # where the new domain's router weight goes
            routing = metrics[NEW]["routing"]
            shares[name] = dict(zip(routing["experts"], np.mean(routing["weight_share"],
                                                                axis=0).round(3).tolist()))
    gain = bpb["public"][NEW] - bpb["dense"][NEW]
    record = {"bpb": bpb, "share_of_dense_gain": {
        name: (bpb["public"][NEW] - bpb[name][NEW]) / gain
        for name in models if name not in ("public", "dense")}}
    record["weight share on the new domain (mean over layers)"] = shares
    for name in models:  # against the merge it joined
        if name.startswith("joined"):
            before = bpb["merged, calibrated" if "calibrated" in name else "merged"]
            record[f"{name}: move on other domains (%)"] = {
                d: 100 * (bpb[name][d] / before[d] - 1) for d in domains if d != NEW}
    (out / "join.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
