"""demo: the settings of the demo command, and the training config of each job it runs.

    moesaic demo --workdir runs/demo
    moesaic demo --workdir runs/smoke --config moesaic/configs/demo.py:preset=smoke
    moesaic demo --workdir runs/long --config.branch_steps=600 --config.dense_steps=600
    moesaic pretrain --config moesaic/configs/demo.py:job=pretrain --workdir runs/demo/public
    moesaic branch --config moesaic/configs/demo.py:job=branch,source=NEWPARTY \
        --base runs/demo/public/public --workdir runs/demo/branches/NEWPARTY

The last one trains one more party exactly as the demo trains its own. Its source must sit
beside the public source it replays: prepared into the demo's data folder (moesaic data
prepare --source NEWPARTY=PATH --out runs/demo/data), which the job finds from --base, or in
a folder named by --data. The one before it is how the demo trains its public model.

Arguments (demo.py:preset=smoke,job=branch,source=code):
  preset       default (a 2-core CPU, about 13 to 25 minutes) or smoke (CI, about 2 minutes)
  job          none: the demo's settings, what the demo command reads. pretrain, branch,
               dense, ffn, lora or moe-all: the whole training config of that job of the demo, as
               the demo builds it (pretrain runs as moesaic pretrain, the others as moesaic
               branch, whose config.branch.mode this sets; moe-all's base is the public model
               upcycled to one expert per source)
  source       the party's data, for branch, dense, ffn and lora
  FIELD=VALUE  any demo setting (branch_steps=600, model.d_model=64 for smoke): the jobs of a
               demo run with --config.FIELD=VALUE
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from moesaic.configs import loading, tiny

DOMAINS = ("code", "prose", "law", "math")  # the private parties; public is everyone's

PRESETS = {
    "default": dict(data_size="default", model={}, seq_len=128, batch=16,
                    pretrain_steps=500, branch_steps=150, dense_steps=150, moe_steps=300,
                    lr=3e-3, branch_lr=2e-3, public_mix=0.3, router_input="prefix_mean",
                    top_k=4, tune_steps=150, eval_sequences=48, uncoordinated=False,
                    negative_bias=False, btx_top_k=2, low_rank=16, lora_branches=False,
                    lora_rank=16, screen_rows=16),
    "smoke": dict(data_size="smoke", model=dict(d_model=32, n_layers=2, n_heads=2,
                                                n_kv_heads=2, d_ff=64),
                  seq_len=32, batch=8, pretrain_steps=300, branch_steps=40, dense_steps=40,
                  moe_steps=60, lr=3e-3, branch_lr=2e-3, public_mix=0.3,
                  router_input="prefix_mean", top_k=4, tune_steps=20, eval_sequences=6,
                  uncoordinated=False, negative_bias=False, btx_top_k=2, low_rank=16,
                  lora_branches=False, lora_rank=16, screen_rows=0),
}
# What the settings mean (every preset has all of them):
#   data_size       the embedded corpora's size (moesaic.data.corpora)
#   model           fields of tiny.py's model changed (its shape)
#   seq_len, batch  every job's sequence length and global batch
#   *_steps, lr     steps of each job; lr: the public model's, branch_lr: coordinated, dense,
#                   ffn branches and the unrestricted MoE alike
#   public_mix      share of public data replayed in coordinated branches
#   router_input    what the branches' routers score (model.router_input)
#   top_k           experts per token of the merged MoE and the unrestricted MoE
#   tune_steps      router tuning after the merge (FlexOlmo's optional step), on public data
#   eval_sequences  held-out sequences per domain in the evaluation
#   uncoordinated   also FlexOlmo's uncoordinated experts (ffn jobs) and their merges
#   negative_bias   branch.negative_bias; False holds each owner's bias at 0
#   btx_top_k       experts per token of the BTX baseline (BTX's recipe is 2)
#   low_rank        the branches also merged as rank-R low-rank experts (FlexMoRE), 0: not
#   lora_branches   also a low-rank branch per party (moesaic.demo.low_rank), of lora_rank
#   screen_rows     public rows the screening reads (moesaic.demo.screening), 0: none


class JobSpec(NamedTuple):
    steps: str  # the setting that gives its steps
    lr: str  # the setting that gives its learning rate
    kind: str  # moesaic.branch_train.trainer.Job.kind
    mode: str = ""  # config.branch.mode, which tells `moesaic branch` the kind


JOBS = {
    "pretrain": JobSpec("pretrain_steps", "lr", "pretrain"),
    "branch": JobSpec("branch_steps", "branch_lr", "branch", "coordinated"),
    "dense": JobSpec("dense_steps", "branch_lr", "dense", "dense"),
    "ffn": JobSpec("branch_steps", "branch_lr", "ffn", "ffn"),
    "moe-all": JobSpec("moe_steps", "branch_lr", "dense", "dense"),
    "lora": JobSpec("branch_steps", "branch_lr", "lora", "lora"),
}
PARTY_JOBS = ("branch", "dense", "ffn", "lora")  # the jobs that take source=
# The unrestricted MoE: every source, one expert each (the public model upcycled).
ALL_SOURCES = (*DOMAINS, "public")
_ARGUMENTS = ("preset", "job", "source")


def preset_config(name: str) -> ml_collections.ConfigDict:
    """The demo's settings of preset `name`; `preset` names it (the findings say which). Kept
    in the order written here, the order W/preset.json records them in."""
    if name not in PRESETS:
        raise ValueError(f"demo preset {name!r}: one of {sorted(PRESETS)}")
    settings = {**PRESETS[name], "model": ml_collections.ConfigDict(PRESETS[name]["model"],
                                                                    sort_keys=False)}
    return ml_collections.ConfigDict({"preset": name, **settings}, sort_keys=False)


def job_config(preset: ml_collections.ConfigDict, job: str, source: str = ""
               ) -> ml_collections.ConfigDict:
    """The training config of the demo's job `job` (one of JOBS) under the settings `preset`,
    for party `source` (branch, dense, ffn)."""
    if job not in JOBS:
        raise ValueError(f"demo job {job!r}: one of {sorted(JOBS)}")
    if (job in PARTY_JOBS) != bool(source):
        raise ValueError(f"demo job {job!r}: " + ("needs source=NAME (the party's data)"
                                                   if job in PARTY_JOBS else "takes no source"))
    spec = JOBS[job]
    steps, lr = preset[spec.steps], preset[spec.lr]
    config = tiny.get_config()
    config.branch.source = (",".join(f"{s}:1" for s in ALL_SOURCES) if job == "moe-all"
                            else source)
    config.branch.public_mix = preset.public_mix  # read by coordinated branches only
    config.branch.negative_bias = preset.negative_bias
    config.model.router_input = preset.router_input  # only an MoE reads it
    config.model.scan_layers = False  # 4 layers: the unrolled step is faster on CPU
    config.model.update(preset.model.to_dict())
    config.data.seq_len, config.data.global_batch = preset.seq_len, preset.batch
    if job == "pretrain":
        config.data.mixture = "public"
    config.train.update(steps=steps, lr=lr, warmup_steps=max(1, steps // 10),
                        log_every=max(1, steps // 10), ckpt_every=steps)
    if spec.mode:
        config.branch.mode = spec.mode
    if job == "dense":
        config.branch.stats_batches = 0  # no router statistics: the demo's BTX starts random
    if job == "moe-all":
        config.model.update(n_experts=len(ALL_SOURCES), top_k=preset.top_k)
    if job == "lora":
        config.branch.lora.rank = int(preset.lora_rank)
    return config


def get_config(arg=None):
    named, settings = {}, []
    for item in filter(None, (arg or "").split(",")):
        key, sep, _ = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r}: expected NAME=VALUE")
        if key in _ARGUMENTS:
            named[key] = item[len(key) + 1:]
        else:
            settings.append(item)
    preset = preset_config(named.get("preset", "default"))
    try:
        loading.apply_overrides(preset, settings)
    except KeyError as err:
        raise ValueError(f"config argument: {loading.error_message(err)}; expected one of "
                         f"{list(_ARGUMENTS)} or a demo setting") from None
    if "job" not in named:
        if "source" in named:
            raise ValueError("config argument source=: only with job=")
        return preset
    return job_config(preset, named["job"], named.get("source", ""))
