"""A launch manifest: two parties (code, math) branch from one public checkpoint, each on
its own cluster with its own data; then a merge with learned router rows.

    moesaic launch render moesaic/configs/manifest_example.py --target slurm --out jobs/
    moesaic launch render moesaic/configs/manifest_example.py --target tpu-vm --out jobs/
    moesaic launch run moesaic/configs/manifest_example.py --target local

The local run expects the base (runs/w/public, e.g. from `moesaic pretrain --config
moesaic/configs/tiny.py --workdir runs/w`); each party's data folder defaults to the one
beside the base. Override anything: `--config.parties.code.resources.nodes=4`,
`--config.merge.router=centroid`. See moesaic/launch/manifest.py for every field.
"""

import ml_collections


def party(config: str, source: str, workdir: str, *, data: str = "", **resources):
    return ml_collections.ConfigDict(dict(
        config=config, source=source, data=data, workdir=workdir,
        overrides=["train.steps=300"], base="", artifact="", env={}, extra_args=[],
        resources=dict(nodes=2, tasks_per_node=1, gpus_per_node=8, cpus_per_task=16,
                       time="24:00:00", partition="", account="", tpu_name="", tpu_zone="",
                       tpu_project="", processes=0) | resources,
    ))


def get_config(arg=None):
    m = ml_collections.ConfigDict()
    m.name = "moesaic"
    m.repo = ""
    m.command = "moesaic"
    m.base = "runs/w/public"
    m.env = {"PYTHONUNBUFFERED": "1"}
    m.port = 12355
    m.log_dir = "logs"
    m.parties = ml_collections.ConfigDict()
    m.parties.code = party("moesaic/configs/tiny.py", "code", "runs/w/branches/code",
                           partition="gpu", tpu_name="code-v5p-16", tpu_zone="us-east5-a")
    m.parties.math = party("moesaic/configs/tiny.py", "math", "runs/w/branches/math",
                           partition="gpu", tpu_name="math-v5p-16", tpu_zone="europe-west4-b")
    m.merge = ml_collections.ConfigDict(dict(
        router="learned-rows", top_k=2, out="runs/w/merged", branches=["code", "math"],
        extra_args=[], env={},
        resources=dict(nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=8,
                       time="1:00:00", partition="cpu", account="", tpu_name="", tpu_zone="",
                       tpu_project="", processes=0),
    ))
    return m
