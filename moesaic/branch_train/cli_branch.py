"""`moesaic branch`: one party's job. Restores the base, upcycles it to [base experts..., own],
trains only the owner's expert, router row and bias on its own source
(config.branch.source) and writes WORKDIR/artifact. With config.branch.mode=dense: plain
continued pretraining of a dense copy (the BTX / BTM baselines); with config.branch.mode=ffn:
the uncoordinated expert, a dense copy whose FFN alone trains, in place, with no public expert
or router beside it; it writes a branch artifact (that FFN as the expert, the router row and
bias a coordinated branch would start from) and the dense model it trained (WORKDIR/model).

    moesaic branch --config moesaic/configs/tiny.py:source=code --base runs/w/public \
        --workdir runs/w/branches/code
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from moesaic.branch_train import base_model, cli_args, distributed
from moesaic.branch_train.trainer import Job

MODES = {"coordinated": "branch", "dense": "dense", "ffn": "ffn"}  # mode -> job kind


def register(parser: argparse.ArgumentParser) -> None:
    cli_args.add_arguments(parser)
    parser.add_argument("--base", required=True, help="the public checkpoint (WORKDIR/public)")


def run(args: argparse.Namespace) -> int:
    distributed.initialize(args)
    config = cli_args.resolve_config(args)
    mode = str(config.branch.mode)
    if mode not in MODES:
        print(f"error: config.branch.mode={mode!r}: one of {sorted(MODES)}", file=sys.stderr)
        return 2
    base = pathlib.Path(args.base)
    try:  # a wrong --base is named before any corpus is built for the job
        base_model.read_base(base, config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    job = Job(kind=MODES[mode], workdir=pathlib.Path(args.workdir), base=base,
              data_dir=cli_args.data_dir(args, config, base),
              show_progress=not args.no_progress)
    code, result = cli_args.run_job(config, job, "branch artifact")
    if result is not None and result.output is not None and job.kind == "ffn":
        print(f"dense model: {job.workdir / 'model'}")  # the FFN-trained model, kept whole
    return code
