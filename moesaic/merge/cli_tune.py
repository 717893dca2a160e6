"""`moesaic tune-router M --data DIR --source S [--source S2] --steps N --out M2`: router rows
only, everything else frozen, on data the caller provides (moesaic.merge.tune)."""

from __future__ import annotations

import argparse
import sys

from moesaic.launch.cli import whole_number
from moesaic.merge.sources import MergeRefused
from moesaic.model import checkpoint


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("merged", help="a merged checkpoint")
    parser.add_argument("--data", required=True, help="prepared data folder (moesaic data)")
    parser.add_argument("--source", action="append", required=True,
                        help="a source of --data to tune on (repeat; source:weight allowed)")
    parser.add_argument("--steps", type=whole_number(1), required=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=whole_number(1), default=None,
                        help="tokens per row (default: the data.seq_len the merged model's "
                             "parties trained on, else 128)")
    parser.add_argument("--batch", type=whole_number(1), default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)


def run(args) -> int:
    from moesaic.merge.tune import tune_router_on_data

    try:
        seq_len = args.seq_len or checkpoint.trained_seq_len([checkpoint.read_meta(args.merged)]) or 128
        tune_router_on_data(args.merged, args.out, args.data, ",".join(args.source),
                            seq_len=seq_len, batch=args.batch, seed=args.seed,
                            steps=args.steps, lr=args.lr)
    except (MergeRefused, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"moesaic tune-router: refused: {err}", file=sys.stderr)
        return 2
    return 0
