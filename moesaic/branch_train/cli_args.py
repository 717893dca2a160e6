"""The command-line arguments the training commands share (train, pretrain, branch) and how
they become a resolved config and a `trainer.Job`.

Data: --data DIR, else config.data.dir, else the first folder holding prepared sources among
WORKDIR/data, WORKDIR/../data and (a branch) BASE/../data, BASE/../../data (so
`moesaic data embedded --out W/data` then `--workdir W/run` finds it), else the embedded
corpora built into WORKDIR/data (once; reused when present). The folder used is printed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import ml_collections
from jax.experimental import multihost_utils

from moesaic.branch_train import distributed
from moesaic.branch_train.trainer import Job, Result, train
from moesaic.configs import loading


def add_arguments(parser: argparse.ArgumentParser, *, default_config: str = "",
                  embedded_size: str = "default") -> None:
    config_help = "config file[:arg], e.g. moesaic/configs/tiny.py:source=code"
    parser.add_argument("--config", default=default_config, required=not default_config,
                        help=config_help + (f" (default: {default_config})"
                                            if default_config else ""))
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and outputs")
    parser.add_argument("--data", default="", help="prepared data folder (DATA_DIR)")
    parser.add_argument("--embedded-size", default=embedded_size, choices=("default", "smoke"),
                        help="size of the embedded corpora built when no data is given "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(parser)


def resolve_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config file with its --config.FIELD=VALUE overrides; a bad file, field or value is
    one line on stderr and exit code 2, as the commands' other input errors are."""
    try:
        return loading.resolve(args.config, getattr(args, "config_overrides", []))
    except loading.CONFIG_ERRORS as err:
        print(f"error: {loading.error_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def _has_sources(folder: pathlib.Path) -> bool:
    return folder.is_dir() and any(folder.glob("*/manifest.json"))


def data_dir(args: argparse.Namespace, config: ml_collections.ConfigDict,
             base: pathlib.Path | None = None) -> pathlib.Path:
    """The data folder for this job (see the module docstring); builds the embedded corpora
    when nothing else is given."""
    if args.data or config.data.dir:
        return pathlib.Path(args.data or config.data.dir)
    workdir = pathlib.Path(args.workdir)
    candidates = [workdir / "data", workdir.parent / "data"]
    if base is not None:
        candidates += [base.parent / "data", base.parent.parent / "data"]
    found = next((c for c in candidates if _has_sources(c)), None)
    if found is not None:
        print(f"data: {found}", flush=True)
        return found
    folder = workdir / "data"
    if jax.process_index() == 0:
        from moesaic.data.corpora import build_embedded

        print(f"no data given: building the embedded corpora ({args.embedded_size}) "
              f"in {folder}", flush=True)
        build_embedded(folder, size=args.embedded_size)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("moesaic-embedded-data")
    return folder


def run_job(config: ml_collections.ConfigDict, job: Job, output_name: str
            ) -> tuple[int, Result | None]:
    """Runs the job; an input error (missing base, mismatched config or data) is printed as
    one line and gives exit code 2. Returns (exit code, result)."""
    try:
        result = train(config, job)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2, None
    if result.stopped:
        print(f"stopped at step {result.step}; checkpoint saved in {job.workdir}/ckpt, "
              "run the same command again to resume")
    elif result.output is not None:
        print(f"{output_name}: {result.output}")
    return 0, result
