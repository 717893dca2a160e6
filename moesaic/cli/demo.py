"""`moesaic demo`: the whole flow on the embedded corpora, with a report a person reads
(moesaic.demo; the settings are moesaic/configs/demo.py).

    moesaic demo --workdir runs/demo                  # 2-core CPU, 13 to 25 minutes
    moesaic demo --workdir runs/smoke --config moesaic/configs/demo.py:preset=smoke  # CI, 2 min
    moesaic demo --workdir runs/token --config.router_input=token --config.branch_lr=7e-4
    moesaic demo --workdir runs/unc --config.uncoordinated=true  # + uncoordinated experts
    moesaic demo --workdir runs/bias --config.negative_bias=true  # FlexOlmo's negative bias

A re-run in the same workdir resumes where the last one stopped; a workdir serves the settings
it was made with (W/preset.json) and refuses others.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

DEFAULT_CONFIG = "moesaic/configs/demo.py"


class _Gone(argparse.Action):
    """An option of the demo before its settings became a config file: refused with the
    spelling that replaces it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--preset":
            instead = f"--config {DEFAULT_CONFIG}:preset={values}"
        else:
            instead = f"--config.{values}"
        parser.error(f"{option_string} {values}: the demo's settings are a config file now; "
                     f"write {instead}")


def register(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--workdir", required=True, help="where everything is written")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="the demo's settings, config file[:arg] (default: %(default)s, "
                             "its default preset; :preset=smoke for CI); change one with "
                             "--config.NAME=VALUE (branch_lr=7e-4, router_input=token, "
                             "uncoordinated=true, ...)")
    for gone in ("--preset", "--set"):
        parser.add_argument(gone, action=_Gone, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from moesaic.configs import loading

    try:
        config = loading.resolve(args.config, args.config_overrides)
    except loading.CONFIG_ERRORS as err:
        print(f"moesaic demo: error: {loading.error_message(err)}", file=sys.stderr)
        return 2
    if "train" in config:  # a job's config (demo.py:job=...), for moesaic branch / pretrain
        print(f"moesaic demo: error: {args.config} is a training job's config; the demo reads "
              f"its settings ({DEFAULT_CONFIG}[:preset=NAME], no job=)", file=sys.stderr)
        return 2
    from moesaic.demo import pipeline, workdir

    workdir.use_compilation_cache(pathlib.Path(args.workdir).absolute() / "xla-cache")
    try:
        pipeline.run_demo(args.workdir, config)
    except ValueError as err:
        print(f"moesaic demo: {err}")
        return 2
    return 0
