"""`moesaic screen`: does each expert of a merged model earn its tokens? (moesaic.merge.screen)

    moesaic screen M --data DIR [--rows 64] [--refuse-below 0.5]

Per party expert, on DIR's `public` source (proxy text every party may read): its share of
the router weight, the proxy loss change when it is removed (exactly as `merge remove`), its
loss gain over the public expert on the tokens it takes, its row norm and logit range
against the other parties', and how far it skews the next-token distribution; a trust score
(the smallest of their scores). The report is written beside the model (M.screening.json)
and summarised on the terminal; experts below --refuse-below are named (exit 0: screening a
merged model changes nothing; `moesaic merge ... --screen DIR --policy refuse` leaves them
out of a merge).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from moesaic.cli.args import whole_number
from moesaic.merge.sources import MergeRefused


def register(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("merged", help="a merged checkpoint")
    parser.add_argument("--data", required=True,
                        help="prepared data folder with a 'public' source (moesaic data)")
    parser.add_argument("--rows", type=whole_number(1), default=64,
                        help="proxy rows of the public source's training split")
    parser.add_argument("--seq-len", type=whole_number(1), default=None,
                        help="tokens per row (default: the parties' data.seq_len, else 128)")
    parser.add_argument("--refuse-below", type=float, default=None,
                        help="trust threshold in [0, 1] (default 0.5): experts below it are "
                             "named")


def run(args) -> int:
    from moesaic.merge import calibrate, screen
    from moesaic.merge.sources import committed_meta
    from moesaic.model import checkpoint

    try:
        threshold = screen.check_threshold(
            screen.DEFAULT_THRESHOLD if args.refuse_below is None else args.refuse_below)
        meta = committed_meta(pathlib.Path(args.merged), "merged model")
        if meta.get("kind") != "merged":
            raise MergeRefused(f"{args.merged}: a {meta.get('kind')!r} checkpoint; screen "
                               f"takes a merged model")
        cfg = checkpoint.model_config(meta)
        seq_len = args.seq_len or checkpoint.trained_seq_len([meta]) or 128
        tokens = calibrate.proxy_tokens(args.data, cfg, seq_len=seq_len, rows=args.rows)
        report = screen.screen(args.merged, tokens, log=lambda s: None)
        report.update(threshold=threshold, flagged=screen.below(report, threshold))
        print(screen.format_summary(report, threshold))
        print(f"screening report: {screen.write_report(report, args.merged)}")
    except (MergeRefused, ValueError, FileNotFoundError) as err:
        print(f"moesaic {args.command}: refused: {err}", file=sys.stderr)
        return 2
    return 0
