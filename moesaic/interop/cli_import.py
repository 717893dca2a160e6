"""`moesaic import-hf DIR --out B`: a Hugging Face Olmo2 / FlexOlmo folder -> a moesaic
checkpoint (see moesaic/interop/hf_import.py for the mapping)."""

from __future__ import annotations

import argparse
import sys

from moesaic.interop.hf_import import import_hf


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder with config.json, safetensors, tokenizer.json")
    parser.add_argument("--out", required=True, help="moesaic checkpoint to write")
    parser.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="store parameters in this dtype (default: the weights' own dtype)")
    parser.add_argument("--tokenizer", default=None,
                        help="model.tokenizer to record instead of copying DIR/tokenizer.json "
                             "('bytes' or a tokenizer.json path)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    try:
        import_hf(args.folder, args.out, param_dtype=args.param_dtype, tokenizer=args.tokenizer,
                  overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"moesaic import-hf: error: {e}", file=sys.stderr)
        return 2
    return 0
