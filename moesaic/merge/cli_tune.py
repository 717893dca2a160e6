"""`moesaic tune-router M --data DIR --source S [--source S2] --steps N --out M2`: router rows
only, everything else frozen, on data the caller provides (moesaic.merge.tune)."""

from __future__ import annotations

import argparse
import sys

from moesaic.merge.sources import MergeRefused


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("merged", help="a merged checkpoint")
    parser.add_argument("--data", required=True, help="prepared data folder (moesaic data)")
    parser.add_argument("--source", action="append", required=True,
                        help="a source of --data to tune on (repeat; source:weight allowed)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)


def run(args) -> int:
    from moesaic.data.loader import TokenBatches
    from moesaic.merge.tune import tune_router

    mixture = ",".join(args.source)
    try:
        batches = TokenBatches(args.data, mixture, seq_len=args.seq_len,
                               global_batch=args.batch, seed=args.seed)
        tune_router(args.merged, args.out, batches.get, steps=args.steps, lr=args.lr,
                    data={"dir": str(args.data), "mixture": mixture, "seq_len": args.seq_len,
                          "batch": args.batch, "seed": args.seed})
    except (MergeRefused, FileExistsError, ValueError) as err:
        print(f"moesaic tune-router: refused: {err}", file=sys.stderr)
        return 2
    return 0
