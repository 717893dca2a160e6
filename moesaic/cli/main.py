"""The `moesaic` command: the table of commands and the entry point.

A command module exposes `register(parser, command)` (adds its arguments; `command` is the
name typed, for a module that serves several) and `run(args) -> int` (the exit code).
`main` sets `args.command` (the name typed) and `args.config_overrides` (the FIELD=VALUE of
each `--config.FIELD=VALUE`; only the commands in TAKES_OVERRIDES accept any). Modules are
imported only when their command runs, so `moesaic --help` is instant; a command whose
module is not installed is not listed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from moesaic.cli.args import split_config_args
from moesaic.model import host_memory

# name: (module, one-line help). Order is the order of the workflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("moesaic.cli.data", "prepare private sources as TFDS ArrayRecord datasets"),
    "train": ("moesaic.cli.train", "train a config's model for some steps and print the loss "
                                   "(tiny.py by default)"),
    "pretrain": ("moesaic.cli.train", "train the public model and write WORKDIR/public"),
    "branch": ("moesaic.cli.train", "train one party's expert from the base"),
    "merge": ("moesaic.cli.merge", "fuse branches into one MoE; remove or add an expert; "
                                   "soup / btx baselines"),
    "tune-router": ("moesaic.cli.merge", "tune router rows only, on data you provide"),
    "screen": ("moesaic.cli.screen", "trust score of each expert of a merged model, on "
                                     "public proxy data"),
    "eval": ("moesaic.cli.eval", "per-domain perplexity, bits per byte, routing statistics"),
    "generate": ("moesaic.cli.generate", "text from a model: batched decoding with a KV cache"),
    "audit": ("moesaic.cli.audit", "what a model reproduces of a party's training text"),
    "demo": ("moesaic.cli.demo", "the whole flow on the embedded corpora, with a report"),
    "import-hf": ("moesaic.cli.hf", "convert an OLMo-2 / FlexOlmo HF folder"),
    "export-hf": ("moesaic.cli.hf", "write a FlexOlmoForCausalLM folder"),
    "import-peft": ("moesaic.cli.peft", "a PEFT LoRA adapter as a low-rank branch artifact"),
    "export-peft": ("moesaic.cli.peft", "a low-rank branch artifact as a PEFT LoRA adapter"),
    "launch": ("moesaic.cli.launch", "render or run one job per party from a manifest"),
    "plan": ("moesaic.cli.plan", "compile the branch step ahead of time; memory per device"),
}
# The commands that read --config.FIELD=VALUE overrides (launch: of its manifest). Any other
# command refuses them rather than ignore them silently.
TAKES_OVERRIDES = ("train", "pretrain", "branch", "launch", "plan", "demo")


def _available() -> dict[str, tuple[str, str]]:
    """The commands whose module is installed."""
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


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command, its module's arguments registered."""
    module, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"moesaic {name}", description=help_text)
    importlib.import_module(module).register(parser, name)
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
        rest, overrides = split_config_args(rest)
    except ValueError as err:
        print(f"moesaic {name}: error: {err}", file=sys.stderr)
        return 2
    if overrides and name not in TAKES_OVERRIDES:
        print(f"moesaic {name}: error: --config.{overrides[0]}: `moesaic {name}` reads no "
              f"config, so config overrides would be ignored; only "
              f"{', '.join(TAKES_OVERRIDES)} take --config.FIELD=VALUE", file=sys.stderr)
        return 2
    module = importlib.import_module(commands[name][0])
    args = command_parser(name).parse_args(rest)
    args.command = name
    args.config_overrides = overrides
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
