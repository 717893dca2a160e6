"""Argument helpers the commands share: a whole-number argparse type, the `--config.FIELD=VALUE`
overrides split from the other arguments, and the arguments of a training job (train,
pretrain, branch) with how they become a resolved config and a data folder.

Data of a training job: --data DIR, else config.data.dir, else the first folder holding
prepared sources among WORKDIR/data, WORKDIR/../data and (a branch) BASE/../data,
BASE/../../data (so `moesaic data embedded --out W/data` then `--workdir W/run` finds it),
else the embedded corpora built into WORKDIR/data (once; reused when present). The folder
used is printed.

Nothing here imports jax at import time: `moesaic plan` must set XLA_FLAGS before jax loads.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import ml_collections

from moesaic.configs import loading


def whole_number(low: int):
    """An argparse type: a whole number of at least `low`. argparse names the flag in its
    error, e.g. `argument --batch-size: must be at least 1, got 0`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x=y` overrides (or `--config.x y`, as absl flags also take them)
    from the other arguments."""
    rest, overrides = [], []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("--config."):
            rest.append(arg)
            continue
        key = arg[len("--config."):]
        if "=" not in key:
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise ValueError(f"{arg}: no value; write {arg}=VALUE")
            key = f"{key}={value}"
        overrides.append(key)
    return rest, overrides


def add_job_arguments(parser: argparse.ArgumentParser, *, default_config: str = "",
                      embedded_size: str = "default") -> None:
    """--config, --workdir, --data, --embedded-size, --no-progress and the multi-process
    start-up flags of a training job."""
    from moesaic.branch_train import distributed

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
    import jax
    from jax.experimental import multihost_utils

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
