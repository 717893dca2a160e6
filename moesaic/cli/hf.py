"""`moesaic import-hf` and `moesaic export-hf`: to and from Hugging Face folders.

    moesaic import-hf DIR --out B
    moesaic export-hf M --out DIR

import-hf converts an Olmo2 / FlexOlmo folder into a moesaic checkpoint (the mapping:
moesaic/interop/hf_import.py); export-hf writes a moesaic checkpoint as a
FlexOlmoForCausalLM folder (moesaic/interop/hf_export.py), after reading the model whole
against its fingerprint (--no-verify skips it). An input error, a damaged model or a full disk
is one line on stderr and exit code 2, and --out is left as it was.
"""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "import-hf":
        parser.add_argument("folder", help="folder with config.json, safetensors, tokenizer.json")
        parser.add_argument("--out", required=True, help="moesaic checkpoint to write")
        parser.add_argument("--param-dtype", default=None,
                            choices=("float32", "bfloat16", "float16"),
                            help="store parameters in this dtype (default: the weights' own "
                                 "dtype)")
        parser.add_argument("--tokenizer", default=None,
                            help="model.tokenizer to record instead of copying "
                                 "DIR/tokenizer.json ('bytes' or a tokenizer.json path)")
    else:
        parser.add_argument("model", help="moesaic model checkpoint (public, merged, ...)")
        parser.add_argument("--out", required=True, help="folder to write")
        parser.add_argument("--max-shard-size", default="5GB",
                            help="split safetensors above this size, with an index (default "
                                 "5GB = 5e9 bytes, as transformers reads it; 4GiB = 4 * 2^30)")
        parser.add_argument("--drop-router-bias", action="store_true",
                            help="export a model whose router biases are non-zero without them "
                                 "(FlexOlmoForCausalLM has none); routing then changes")
        parser.add_argument("--no-verify", action="store_true",
                            help="skip reading the model whole against its fingerprint first")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from moesaic.cli import refusals

    try:
        if args.command == "import-hf":
            from moesaic.interop.hf_import import import_hf

            import_hf(args.folder, args.out, param_dtype=args.param_dtype,
                      tokenizer=args.tokenizer, overwrite=args.overwrite)
        else:
            from moesaic.interop.hf_export import export_hf, parse_size
            from moesaic.model import checkpoint

            if not args.no_verify and checkpoint.is_complete(args.model):  # else named below
                checkpoint.verify(args.model, "model")
            export_hf(args.model, args.out, max_shard_bytes=parse_size(args.max_shard_size),
                      drop_router_bias=args.drop_router_bias, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # FileNotFoundError and FileExistsError are OSErrors
        if refusals.disk_full(e):
            e = refusals.disk_full_message(e, f"--out {args.out}")
        elif not isinstance(e, (ValueError, FileNotFoundError, FileExistsError)):
            raise
        print(f"moesaic {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
