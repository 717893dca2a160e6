"""The demo's low-rank systems (docs/low-rank.md): experts a party with one small GPU can
afford, beside the full FFN experts.

  lowrank/R      the coordinated branches merged as rank-R low-rank experts (FlexMoRE: each
                 FFN expert's difference from the public FFN truncated by SVD, no training),
                 R = the `low_rank` setting (0: no such stage), for each router kind of
                 LOW_RANK_ROUTERS: learned rows and Arrow (rows from the weights alone)
  lora/D         with lora_branches=true: one low-rank branch per domain (the party trains
                 rank-`lora_rank` updates of every projection and its router row), merged
                 with each router kind of LOW_RANK_ROUTERS (lora-merge/R)

The report's note on trainable parameters per party (`note`) compares the kinds of expert.
"""

from __future__ import annotations

import pathlib

from moesaic.branch_train.lora import trainable_counts
from moesaic.configs import demo as settings
from moesaic.model.config import ModelConfig

LOW_RANK_ROUTERS = ("learned-rows", "arrow")


def converted_name(rank: int, router: str) -> str:
    return f"merged MoE, rank-{rank} experts ({router})"


def trained_name(rank: int, router: str) -> str:
    return f"merged low-rank branches, rank {rank} ({router})"


def paths(w: pathlib.Path, preset) -> dict[str, pathlib.Path]:
    out = {}
    if preset.low_rank:
        out.update({f"lowrank/{r}": w / "merged" / f"rank{preset.low_rank}-{r}"
                    for r in LOW_RANK_ROUTERS})
    if preset.lora_branches:
        out.update({f"lora/{d}": w / "lora" / d / "artifact" for d in settings.DOMAINS})
        out.update({f"lora-merge/{r}": w / "merged" / f"lora-{r}" for r in LOW_RANK_ROUTERS})
    return out


def work(demo) -> dict:
    """The stages' functions, by stage name (`paths`)."""
    p, preset, out = demo.paths, demo.preset, {}
    branches = [p[f"branch/{d}"] for d in settings.DOMAINS]
    for r in LOW_RANK_ROUTERS:
        if preset.low_rank:
            out[f"lowrank/{r}"] = (lambda r=r: demo.merge(branches, r, p[f"lowrank/{r}"],
                                                          low_rank_to=int(preset.low_rank)))
        if preset.lora_branches:
            out[f"lora-merge/{r}"] = (lambda r=r: demo.merge(
                [p[f"lora/{d}"] for d in settings.DOMAINS], r, p[f"lora-merge/{r}"]))
    if preset.lora_branches:
        for d in settings.DOMAINS:
            out[f"lora/{d}"] = (lambda d=d: demo.train("lora", d, demo.w / "lora" / d,
                                                       p["public"]))
    return out


def systems(demo, ev) -> dict:
    """The low-rank systems' results (`ev(path, name)`: one model on every domain)."""
    p, preset, out = demo.paths, demo.preset, {}
    for r in LOW_RANK_ROUTERS:
        if preset.low_rank:
            out[converted_name(preset.low_rank, r)] = ev(p[f"lowrank/{r}"], f"lowrank-{r}")
        if preset.lora_branches:
            out[trained_name(preset.lora_rank, r)] = ev(p[f"lora-merge/{r}"], f"lora-{r}")
    return out


def note(preset) -> str | None:
    """Trainable parameters per party for each kind of expert in this run."""
    if not (preset.low_rank or preset.lora_branches):
        return None
    config = settings.job_config(preset, "branch", settings.DOMAINS[0])
    cfg = ModelConfig.from_config(config.model)
    counts = trainable_counts(cfg.replace(lora_targets=("gate", "up", "down")),
                              (int(preset.low_rank),) if preset.low_rank else ())
    parts = [f"a full FFN expert {counts['ffn']:,}"]
    if preset.low_rank:
        share = counts[f"lora_r{preset.low_rank}"] / counts["ffn"]
        parts.append(f"rank-{preset.low_rank} experts of gate, up, down "
                     f"{counts[f'lora_r{preset.low_rank}']:,} ({share:.0%})")
    if preset.lora_branches:
        lora = trainable_counts(cfg.replace(lora_targets=tuple(config.branch.lora.targets)),
                                (int(preset.lora_rank),))[f"lora_r{preset.lora_rank}"]
        parts.append(f"a rank-{preset.lora_rank} low-rank branch of every projection "
                     f"{lora:,} ({lora / counts['ffn']:.0%})")
    return ("- Parameters per party (expert and router row): " + "; ".join(parts) + ".")
