"""`moesaic pretrain`: train the public model (dense, or an MoE with config.model.n_experts)
on the public mixture (config.data.mixture); writes WORKDIR/public.

    moesaic pretrain --config moesaic/configs/tiny.py --workdir runs/w
"""

from __future__ import annotations

import argparse
import pathlib

from moesaic.branch_train import cli_args, distributed
from moesaic.branch_train.trainer import Job


def register(parser: argparse.ArgumentParser) -> None:
    cli_args.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    distributed.initialize(args)
    config = cli_args.resolve_config(args)
    job = Job(kind="pretrain", workdir=pathlib.Path(args.workdir),
              data_dir=cli_args.data_dir(args, config), show_progress=not args.no_progress)
    return cli_args.run_job(config, job, "public model")[0]
