"""`moesaic train`: train a config's model for some steps and print the loss. With no data
given it builds the small embedded corpora in WORKDIR/data and trains on config.data.mixture.

    moesaic train --config moesaic/configs/tiny.py --workdir runs/t --config.train.steps=50
"""

from __future__ import annotations

import argparse
import pathlib

from moesaic import configs
from moesaic.branch_train import cli_args, distributed
from moesaic.branch_train.trainer import Job


def register(parser: argparse.ArgumentParser) -> None:
    tiny = pathlib.Path(configs.__file__).parent / "tiny.py"
    cli_args.add_arguments(parser, default_config=str(tiny), embedded_size="smoke")


def run(args: argparse.Namespace) -> int:
    distributed.initialize(args)
    config = cli_args.resolve_config(args)
    job = Job(kind="pretrain", workdir=pathlib.Path(args.workdir),
              data_dir=cli_args.data_dir(args, config), show_progress=not args.no_progress,
              write_output=False)
    code, result = cli_args.run_job(config, job, "")
    if result is None:
        return code
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"loss {result.losses[first]:.4f} at step {first} -> "
              f"{result.losses[last]:.4f} at step {last}")
    else:
        print(f"nothing to train: {args.workdir} is already at step {result.step}")
    return 0
