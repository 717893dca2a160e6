"""The `moesaic` command. Each subcommand lives in the module of its stage.

A stage module exposes `register(parser)` (adds its arguments) and `run(args) -> int`.
Modules are imported only when their subcommand runs, so `moesaic --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from moesaic.configs import loading
from moesaic.launch import host_memory

# name: (module, one-line help). Order is the order of the workflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("moesaic.data.cli", "prepare private sources as TFDS ArrayRecord datasets"),
    "train": ("moesaic.branch_train.cli_train", "train the model of a config for some steps"),
    "pretrain": ("moesaic.branch_train.cli_pretrain", "train the public model"),
    "branch": ("moesaic.branch_train.cli_branch", "train one party's expert from the base"),
    "merge": ("moesaic.merge.cli", "fuse branches into one MoE; remove or add an expert"),
    "tune-router": ("moesaic.merge.cli_tune", "tune router rows only, on data you provide"),
    "eval": ("moesaic.eval.cli", "per-domain perplexity, bits per byte, routing statistics"),
    "demo": ("moesaic.eval.demo", "the whole flow on the embedded corpora, with a report"),
    "import-hf": ("moesaic.interop.cli_import", "convert an OLMo-2 / FlexOlmo HF folder"),
    "export-hf": ("moesaic.interop.cli_export", "write a FlexOlmoForCausalLM folder"),
    "launch": ("moesaic.launch.jobs", "render or run one job per party from a manifest"),
    "plan": ("moesaic.launch.plan", "compile the branch step ahead of time; memory per device"),
}
# The commands that read --config.FIELD=VALUE overrides (launch: of its manifest). Any other
# command refuses them rather than ignore them silently.
TAKES_OVERRIDES = ("train", "pretrain", "branch", "launch", "plan")


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


def _available() -> dict[str, tuple[str, str]]:
    return {
        name: spec for name, spec in COMMANDS.items()
        if importlib.util.find_spec(spec[0]) is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesaic",
        description="Private experts trained apart, merged into one Mixture-of-Experts model.",
        epilog="Configs: --config moesaic/configs/tiny.py:arg --config.model.d_model=256",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in _available().items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available()
    if not argv or argv[0] not in commands:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; one of: {', '.join(commands)}")
        parser.parse_args(argv)
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    host_memory.keep_freed_memory()  # before the first JAX computation
    try:
        rest, overrides = loading.split_config_args(rest)
    except ValueError as err:
        print(f"moesaic {name}: error: {err}", file=sys.stderr)
        return 2
    if overrides and name not in TAKES_OVERRIDES:
        print(f"moesaic {name}: error: --config.{overrides[0]}: `moesaic {name}` reads no "
              f"config, so config overrides would be ignored; only "
              f"{', '.join(TAKES_OVERRIDES)} take --config.FIELD=VALUE", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    parser = argparse.ArgumentParser(prog=f"moesaic {name}", description=commands[name][1])
    module.register(parser)
    args = parser.parse_args(rest)
    args.config_overrides = overrides
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
