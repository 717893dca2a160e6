"""`moesaic plan`: compile a branch job's train step ahead of time, before a cluster is booked.

    moesaic plan --config moesaic/configs/olmo2_7b.py:source=code --mesh data=1,fsdp=8 --hbm 80GB
    moesaic plan --config moesaic/configs/flexolmo_7x7b.py --job eval --mesh data=1,expert=8 \
        --hbm 80GB

--job branch (the default) plans a branch job's train step (`moesaic.launch.plan`); eval,
tune-router and decode plan a step of the merged model of the config, expert-parallel
(`moesaic.launch.plan_merged`). Every plan reports the bytes each collective moves per step.

Prints the per-device memory XLA plans, the same split counted by hand and the sharding of
every parameter (what is planned and how: `moesaic.launch.plan`). A plan whose per-device
need exceeds --hbm is refused: exit code 3 and how much it needs. An input error (a bad flag,
config field or base) is one line on stderr and exit code 2.

The step is compiled on fake CPU devices, which XLA_FLAGS must ask for before jax is
imported: nothing this module imports at its top loads jax, and when jax is already imported
with too few devices the command re-runs itself in a fresh interpreter with the flag set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from moesaic.cli.args import whole_number
from moesaic.configs import loading  # no jax: XLA_FLAGS must be set before jax loads
from moesaic.configs.expert_axis import check_expert_axis
from moesaic.launch import plan, plan_merged


def register(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", required=True,
                        help="config file[:arg], e.g. moesaic/configs/olmo2_7b.py:source=code")
    parser.add_argument("--mesh", default="",
                        help="mesh sizes, e.g. data=1,fsdp=8 (default: config.mesh, which "
                             "must then have no -1)")
    parser.add_argument("--hbm", default="",
                        help="memory per device, e.g. 80GB; a plan needing more is refused")
    parser.add_argument("--base", default="",
                        help="a base checkpoint: plan for its model (reads meta.json only)")
    parser.add_argument("--base-experts", type=int, default=None,
                        help="experts of the base when no --base is given (1: dense; "
                             "default: config.model.n_experts - 1, or 1 for a dense config)")
    parser.add_argument("--job", default="branch", choices=("branch", *plan_merged.JOBS),
                        help="the step planned: a branch job's train step (default) or the "
                             "merged model's eval, tune-router or decode step")
    parser.add_argument("--batch", type=whole_number(1), default=8,
                        help="eval / tune-router / decode: rows per step (default 8)")
    parser.add_argument("--seq-len", type=whole_number(1), default=None,
                        help="eval / tune-router: tokens per row; decode: cache slots "
                             "(default: config.data.seq_len)")
    parser.add_argument("--dispatch", choices=("dropless", "all_to_all"), default="dropless",
                        help="eval / tune-router: how tokens reach their experts")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON line")


def _error(err: Exception) -> int:
    """An input error (a bad flag, config field or base) as one line on stderr: exit 2."""
    print(f"moesaic plan: error: {loading.error_message(err)}", file=sys.stderr)
    return 2


_MERGED_DEFAULTS = {"job": "branch", "batch": 8, "seq_len": None, "dispatch": "dropless"}


def run(args: argparse.Namespace) -> int:
    for name, default in _MERGED_DEFAULTS.items():  # a Namespace built in Python may lack them
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        config = loading.resolve(args.config, getattr(args, "config_overrides", []))
        mesh_shape = plan.parse_mesh(args.mesh) if args.mesh else dict(config.mesh)
        hbm = plan.parse_bytes(args.hbm) if args.hbm else None
        if any(int(v) < 1 for v in mesh_shape.values()):
            raise ValueError(f"config.mesh {mesh_shape} has a -1 (fill the rest); give the "
                             "sizes with --mesh, e.g. --mesh data=1,fsdp=8")
        _check_experts(args, config, mesh_shape)
    except loading.CONFIG_ERRORS as err:
        return _error(err)
    devices = math.prod(int(v) for v in mesh_shape.values())
    if not plan.has_fake_devices(devices):
        return _reexec(devices, _argv(args))
    if args.job != "branch":
        return _merged(args, config, mesh_shape, hbm)
    base_experts = (plan.default_base_experts(config) if args.base_experts is None
                    else args.base_experts)
    try:  # input errors first
        layout = plan.branch_layout(config, base=args.base, base_experts=base_experts)
        plan.check_expert_axis(layout.cfg.n_experts, mesh_shape)
        plan.check_microbatches(config, mesh_shape)
    except (ValueError, KeyError, FileNotFoundError) as err:
        return _error(err)
    result = plan.make_plan(config, mesh_shape, base=args.base, base_experts=base_experts)
    print(json.dumps(result.to_dict()) if args.json else result.report(hbm))
    if hbm is not None and result.needed > hbm:
        hints = ["shard more (--mesh fsdp=...)", "split the batch into more microbatches "
                 "(--config.train.microbatches=...)", "lower --config.data.global_batch"]
        if str(config.model.remat) != "full":
            hints.append("set --config.model.remat=full")
        print(f"moesaic plan: refused: the step needs {plan.human(result.needed)} per device, "
              f"--hbm gives {plan.human(hbm)} ({plan.human(result.needed - hbm)} short); "
              + ", ".join(hints), file=sys.stderr)
        return plan.EXIT_DOES_NOT_FIT
    return 0


def _check_experts(args: argparse.Namespace, config, mesh_shape: dict[str, int]) -> None:
    """The expert axis against the experts of the model planned, before jax starts (a
    --base is checked once its meta is read); the merged model's flags on a branch plan."""
    if args.job == "branch":
        ignored = [f"--{name.replace('_', '-')}" for name, default in _MERGED_DEFAULTS.items()
                   if name != "job" and getattr(args, name) != default]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: set the merged model's step (--job eval, "
                             "tune-router or decode); the branch step takes its batch from "
                             "the config (--config.data.global_batch, --config.data.seq_len)")
    n = int(config.model.n_experts)
    if args.job == "branch":
        mode = str(config.branch.mode)
        if args.base or mode not in ("coordinated", "dense"):
            return  # checked on the branch model's layout
        if mode == "coordinated":  # the base's experts plus the own
            base = plan.default_base_experts(config) if args.base_experts is None \
                else args.base_experts
            n = base + 1
    elif n <= 1:
        raise ValueError("--job: config.model has one expert (a dense model); plan a merged "
                         "model with an MoE config, e.g. moesaic/configs/olmo2_7b.py:experts=4")
    check_expert_axis(n, int(mesh_shape["expert"]), "--mesh")


def _merged(args: argparse.Namespace, config, mesh_shape: dict[str, int],
            hbm: int | None) -> int:
    """--job eval / tune-router / decode: the merged model's step."""
    ignored = [f for f, v in (("--base", args.base), ("--base-experts", args.base_experts))
               if v]
    try:
        if ignored:
            raise ValueError(f"{', '.join(ignored)} set the base of a branch job; --job "
                             f"{args.job} plans the merged model of the config")
        plan_merged.check(config, mesh_shape, args.dispatch)
    except (ValueError, KeyError) as err:
        return _error(err)
    seq_len = args.seq_len or int(config.data.seq_len)
    result = plan_merged.make_plan(config, mesh_shape, args.job, batch=args.batch,
                                   seq_len=seq_len, dispatch=args.dispatch)
    print(json.dumps(result.to_dict()) if args.json else result.report(hbm))
    if hbm is not None and result.needed > hbm:
        print(f"moesaic plan: refused: the {args.job} step needs {plan.human(result.needed)} "
              f"per device, --hbm gives {plan.human(hbm)}; split the experts over more "
              "devices (--mesh expert=...) or lower --batch", file=sys.stderr)
        return plan.EXIT_DOES_NOT_FIT
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line of `args` again, for the fresh interpreter."""
    argv = ["--config", args.config]
    for name, default in _MERGED_DEFAULTS.items():
        value = getattr(args, name, default)
        argv += [f"--{name.replace('_', '-')}", str(value)] if value != default else []
    if args.base_experts is not None:
        argv += ["--base-experts", str(args.base_experts)]
    for flag, value in (("--mesh", args.mesh), ("--hbm", args.hbm), ("--base", args.base)):
        argv += [flag, value] if value else []
    argv += ["--json"] if args.json else []
    return argv + [f"--config.{o}" for o in getattr(args, "config_overrides", [])]


def _reexec(count: int, argv: list[str]) -> int:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{plan.REEXEC_MARK: "1"})
    env["XLA_FLAGS"] = plan.fake_device_flags(env.get("XLA_FLAGS", ""), count)
    return subprocess.call([sys.executable, "-m", "moesaic.cli.main", "plan", *argv], env=env)
