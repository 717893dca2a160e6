"""`moesaic export-hf M --out DIR`: a moesaic checkpoint -> a FlexOlmoForCausalLM folder (see
moesaic/interop/hf_export.py)."""

from __future__ import annotations

import argparse
import sys

from moesaic.interop.hf_export import export_hf, parse_size


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="moesaic model checkpoint (public, merged, ...)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split safetensors above this size, with an index (default 5GB "
                             "= 5e9 bytes, as transformers reads it; 4GiB = 4 * 2^30)")
    parser.add_argument("--drop-router-bias", action="store_true",
                        help="export a model whose router biases are non-zero without them "
                             "(FlexOlmoForCausalLM has none); routing then changes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    try:
        export_hf(args.model, args.out, max_shard_bytes=parse_size(args.max_shard_size),
                  drop_router_bias=args.drop_router_bias, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"moesaic export-hf: error: {e}", file=sys.stderr)
        return 2
    return 0
