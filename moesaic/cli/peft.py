"""`moesaic import-peft` and `moesaic export-peft`: PEFT LoRA adapters to and from low-rank
branch artifacts.

    moesaic import-peft ADAPTER_DIR --base B --source NAME --data DIR --out ARTIFACT
    moesaic export-peft ARTIFACT --out DIR

import-peft turns a PEFT LoRA adapter of the base's OLMo-2 Hugging Face form into the branch
artifact a low-rank branch job writes (moesaic/interop/peft_artifact.py); the router row and
statistics come from the party's source NAME in DIR under the base, as a branch job sets
them. export-peft writes a low-rank branch artifact as adapter_config.json +
adapter_model.safetensors. An input the artifact cannot hold (another base or architecture,
a module the model does not have, a rank above a projection's, DoRA, ...) is one line naming
the tensor or key on stderr and exit code 2, and --out is left as it was.
"""

from __future__ import annotations

import argparse

from moesaic.cli.args import whole_number


def register(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "import-peft":
        parser.add_argument("adapter", help="PEFT adapter folder (adapter_config.json, "
                                            "adapter_model.safetensors)")
        parser.add_argument("--base", required=True,
                            help="the public model the adapter's base was imported as")
        parser.add_argument("--source", required=True, help="the party's source name")
        parser.add_argument("--data", required=True,
                            help="prepared data holding the source (and the public source "
                                 "for --router-init contrast): its router statistics")
        parser.add_argument("--out", required=True, help="branch artifact to write")
        parser.add_argument("--router-init", default="contrast",
                            choices=("contrast", "mean_hidden"),
                            help="the router row, as config.branch.router_init sets a "
                                 "branch's (default contrast)")
        parser.add_argument("--public-source", default="public",
                            help="public data source for --router-init contrast")
        parser.add_argument("--router-margin", type=float, default=2.0,
                            help="contrast's margin (config.branch.router_margin)")
        parser.add_argument("--seq-len", type=whole_number(1), default=128,
                            help="sequence length of the statistics' rows (default 128)")
        parser.add_argument("--stats-sequences", type=whole_number(1), default=64,
                            help="rows of each source the statistics sum over (default 64)")
    else:
        parser.add_argument("artifact", help="a low-rank branch artifact")
        parser.add_argument("--out", required=True, help="adapter folder to write")
        parser.add_argument("--base-model", default=None,
                            help="base_model_name_or_path to record (default: the imported "
                                 "adapter's, else none)")
        parser.add_argument("--no-verify", action="store_true",
                            help="skip reading the artifact whole against its fingerprint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from moesaic.cli import refusals

    return refusals.exit_code_of(args.command, f"--out {args.out}", lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    from moesaic.interop import peft_artifact
    from moesaic.model import checkpoint

    if args.command == "import-peft":
        peft_artifact.import_peft(
            args.adapter, args.base, args.source, args.out, args.data,
            public_source=args.public_source, router_init=args.router_init,
            margin=args.router_margin, seq_len=args.seq_len,
            stats_sequences=args.stats_sequences, overwrite=args.overwrite)
        return
    if not args.no_verify and checkpoint.is_complete(args.artifact):  # else named below
        checkpoint.verify(args.artifact, "branch artifact")
    peft_artifact.export_peft(args.artifact, args.out, base_model=args.base_model,
                              overwrite=args.overwrite)
