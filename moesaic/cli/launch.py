"""`moesaic launch`: one job per party and one merge job, from one manifest.

    moesaic launch render MANIFEST --target slurm|tpu-vm|local --out DIR
    moesaic launch run MANIFEST --target local [--log-dir DIR] [--parallel K]

render writes the job scripts of a target (what each holds: moesaic/launch/jobs.py); run
executes the local form here: every party's branch job (several at once when the machine
has a core per process for them), then the merge. A failing job stops the run; its log's
tail is printed. --config.FIELD=VALUE overrides a field of the manifest.
"""

from __future__ import annotations

import argparse
import os
import sys

from moesaic.cli.args import whole_number
from moesaic.launch import jobs
from moesaic.launch import manifest as manifest_lib


def register(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("action", choices=("render", "run"),
                        help="render job scripts, or run the local form here")
    parser.add_argument("manifest", help="manifest file[:arg], e.g. "
                                         "moesaic/configs/manifest_example.py")
    parser.add_argument("--target", choices=jobs.TARGETS, required=True)
    parser.add_argument("--out", default=None, help="render: the folder for the scripts")
    parser.add_argument("--log-dir", default=None,
                        help="run: where each process's log goes (default: manifest log_dir)")
    parser.add_argument("--parallel", type=whole_number(0), default=None,
                        help="run: branch jobs at once (default 0: automatic, as many as "
                             "there are cores for their processes)")


# The flags only one action reads, and the hint given when the other action receives one.
_ACTION_FLAGS = {
    "render": {"log_dir": ("--log-dir", "the rendered scripts write to the manifest's "
                                        "log_dir (--config.log_dir=DIR)"),
               "parallel": ("--parallel", "run_all.sh starts every branch job at once")},
    "run": {"out": ("--out", "it writes no scripts; its logs go to --log-dir")},
}


def _misplaced_flag(args: argparse.Namespace) -> str:
    """The error for a flag of the other action (it would be ignored), or ""."""
    for attr, (flag, hint) in _ACTION_FLAGS[args.action].items():
        if getattr(args, attr) is not None:
            other = "run" if args.action == "render" else "render"
            return (f"moesaic launch {args.action}: {flag} is a flag of `launch {other}`, "
                    f"`launch {args.action}` would ignore it: {hint}")
    return ""


def run(args: argparse.Namespace) -> int:
    if error := _misplaced_flag(args):
        print(error, file=sys.stderr)
        return 2
    try:
        manifest = manifest_lib.load(args.manifest, getattr(args, "config_overrides", []))
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"moesaic launch: {err}", file=sys.stderr)
        return 2
    if args.action == "render":
        if not args.out:
            print("moesaic launch render: --out DIR is required", file=sys.stderr)
            return 2
        try:
            written = jobs.render(manifest, args.target, args.out)
        except ValueError as err:
            print(f"moesaic launch render: {err}", file=sys.stderr)
            return 2
        for path in written:
            print(path)
        if args.target == "tpu-vm" and not manifest.repo:
            print("moesaic launch render: note: repo is empty, so each TPU worker runs its "
                  "job in its home directory (where `gcloud ... ssh` logs in); relative "
                  "paths resolve there (set repo, e.g. --config.repo='~/moesaic')",
                  file=sys.stderr)
        return 0
    if args.target != "local":
        print(f"moesaic launch run: only --target local runs here; render --target "
              f"{args.target} and submit the scripts on the cluster", file=sys.stderr)
        return 2
    log_dir = os.path.expanduser(args.log_dir) if args.log_dir else manifest.log_dir
    return jobs.run_local(manifest, log_dir=log_dir, parallel=args.parallel or 0)
