"""`moesaic train`, `moesaic pretrain` and `moesaic branch`: the training jobs.

    moesaic train --config moesaic/configs/tiny.py --workdir runs/t --config.train.steps=50
    moesaic pretrain --config moesaic/configs/tiny.py --workdir runs/w
    moesaic branch --config moesaic/configs/tiny.py:source=code --base runs/w/public \
        --workdir runs/w/branches/code

train and pretrain run one job, the public model's (dense, or an MoE with
config.model.n_experts, on the public mixture config.data.mixture); they differ only in
what they default to and what they leave (PRETRAIN_COMMANDS): train is the quick look, its
--config defaults to tiny.py, it builds the smoke-size embedded corpora when no data is
given, writes no model and prints the loss; pretrain needs a --config, builds the
default-size corpora and writes WORKDIR/public, the base the branches start from.

branch is one party's job. It restores the base, upcycles it to [base experts..., own],
trains only the owner's expert, router row and bias on its own source (config.branch.source)
and writes WORKDIR/artifact. With config.branch.mode=dense: plain continued pretraining of a
dense copy (the BTX / BTM baselines); with config.branch.mode=ffn: the uncoordinated expert,
a dense copy whose FFN alone trains, in place, with no public expert or router beside it; it
writes a branch artifact (that FFN as the expert, the router row and bias a coordinated
branch would start from) and the dense model it trained (WORKDIR/model).

An input error (a bad config, a missing, damaged or mismatched base, mismatched data) or a
full disk is one line on stderr and exit code 2. A job stopped by SIGTERM while it trains saves
a checkpoint; the same command resumes (and says "resumed from step N"). SIGTERM before the
training loop or while the output is written stops it with a line on stderr and exit code 143,
nothing half-written left. --no-verify skips reading the base against its fingerprint and
checking a resumed state for NaN or Inf.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from moesaic import configs
from moesaic.cli import args as cli_args

MODES = {"coordinated": "branch", "dense": "dense", "ffn": "ffn",
         "lora": "lora"}  # branch.mode -> job kind


@dataclasses.dataclass(frozen=True)
class PretrainCommand:
    """What `moesaic train` and `moesaic pretrain` differ in; the job is the same."""
    default_config: str  # "" = --config required
    embedded_size: str  # of the corpora built when no data is given
    write_output: bool  # WORKDIR/public
    summary: str  # the help's account of the difference


PRETRAIN_COMMANDS = {
    "train": PretrainCommand(
        str(pathlib.Path(configs.__file__).parent / "tiny.py"), "smoke", False,
        "The same job as `moesaic pretrain`, as a quick look: --config defaults to tiny.py, "
        "the embedded corpora built when no data is given are the smoke size, no model is "
        "written (checkpoints in WORKDIR/ckpt only), and the loss at the first and last step "
        "is printed."),
    "pretrain": PretrainCommand(
        "", "default", True,
        "The same job as `moesaic train`, for the real run: --config is required, the "
        "embedded corpora built when no data is given are the default size, and the public "
        "model is written to WORKDIR/public (the --base of `moesaic branch`)."),
}


def register(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "branch":
        cli_args.add_job_arguments(parser)
        parser.add_argument("--base", required=True,
                            help="the public checkpoint (WORKDIR/public)")
        parser.add_argument("--no-verify", action="store_true",
                            help="skip reading the whole base against its fingerprint")
        parser.epilog = ("config.branch.mode: coordinated (default; writes WORKDIR/artifact), "
                         "dense (a whole dense model, for soup / btx / BTM), ffn (the "
                         "uncoordinated expert; also writes WORKDIR/model) or lora (a "
                         "low-rank expert, config.branch.lora; docs/low-rank.md)")
        return
    how = PRETRAIN_COMMANDS[command]
    cli_args.add_job_arguments(parser, default_config=how.default_config,
                               embedded_size=how.embedded_size)
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking a resumed state for NaN or Inf")
    parser.epilog = how.summary


def run_job(config, job, output_name: str):
    """Runs the job; an input error (missing base, mismatched config or data) is printed as
    one line and gives exit code 2. Returns (exit code, result or None)."""
    from moesaic.branch_train.trainer import train
    from moesaic.cli import refusals

    try:
        result = train(config, job)
    except (ValueError, FileNotFoundError, OSError) as err:
        if refusals.disk_full(err):
            print(f"error: {refusals.disk_full_message(err, output_name)}", file=sys.stderr)
        elif isinstance(err, (ValueError, FileNotFoundError)):
            print(f"error: {err}", file=sys.stderr)
        else:
            raise
        return 2, None
    if result.stopped:
        print(f"stopped at step {result.step}; checkpoint saved in {job.workdir}/ckpt, "
              "run the same command again to resume")
    elif result.output is not None:
        print(f"{output_name}: {result.output}")
    return 0, result


def _branch_job(args: argparse.Namespace, config):
    """The branch's Job, or an exit code for a bad branch.mode or --base."""
    from moesaic.branch_train import base_model
    from moesaic.branch_train.trainer import Job

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
    return Job(kind=MODES[mode], workdir=pathlib.Path(args.workdir), base=base,
               data_dir=cli_args.data_dir(args, config, base),
               show_progress=not args.no_progress, verify=not args.no_verify)


def run(args: argparse.Namespace) -> int:
    from moesaic.branch_train.checkpointing import Terminated

    with Terminated.on_sigterm():
        try:
            return _run(args)
        except Terminated:
            print(f"moesaic {args.command}: stopped by SIGTERM before training or while "
                  f"writing its output: nothing half-written is left in {args.workdir} (its "
                  "saved checkpoints are kept); run the same command again to go on",
                  file=sys.stderr)
            return Terminated.EXIT_CODE


def _run(args: argparse.Namespace) -> int:
    from moesaic.branch_train import distributed
    from moesaic.branch_train.trainer import Job

    distributed.initialize(args)
    config = cli_args.resolve_config(args)
    if args.command == "branch":
        job = _branch_job(args, config)
        if isinstance(job, int):
            return job
        code, result = run_job(config, job, "branch artifact")
        if result is not None and result.output is not None and job.kind == "ffn":
            print(f"dense model: {job.workdir / 'model'}")  # the FFN-trained model, kept whole
        return code
    how = PRETRAIN_COMMANDS[args.command]
    job = Job(kind="pretrain", workdir=pathlib.Path(args.workdir),
              data_dir=cli_args.data_dir(args, config), show_progress=not args.no_progress,
              write_output=how.write_output, verify=not args.no_verify)
    code, result = run_job(config, job, "public model")
    if result is None or how.write_output:
        return code
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"loss {result.losses[first]:.4f} at step {first} -> "
              f"{result.losses[last]:.4f} at step {last}")
    else:
        print(f"nothing to train: {args.workdir} is already at step {result.step}")
    return 0
