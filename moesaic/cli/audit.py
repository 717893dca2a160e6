"""`moesaic audit extraction`: how much of a party's training text a model reproduces verbatim
(FlexOlmo, section 5.3; moesaic.eval.audit). Rates only, never text.

    moesaic audit extraction --model CKPT --data DATA_DIR --source math \
        [--samples 64 --prefix-len 32 --match-len 32 --seed 0] [--json out.json]

Run by the party, on its own data: --data and --source name its prepared training split.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from moesaic.cli.args import whole_number


def register(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("what", choices=("extraction",), help="the audit to run")
    parser.add_argument("--model", required=True, help="a moesaic checkpoint")
    parser.add_argument("--data", required=True, help="DATA_DIR of the party's prepared data")
    parser.add_argument("--source", required=True, help="the party's source in DATA_DIR")
    parser.add_argument("--samples", type=whole_number(1), default=64,
                        help="training documents sampled, one prefix each (default 64)")
    parser.add_argument("--prefix-len", type=whole_number(1), default=32)
    parser.add_argument("--match-len", type=whole_number(1), default=32,
                        help="tokens generated and compared with the document's next ones")
    parser.add_argument("--loose", type=float, default=0.9,
                        help="loose match: at least this share survives the edit distance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=whole_number(1), default=16)
    parser.add_argument("--json", help="also write the rates to this file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reading the model whole against its fingerprint first")


def run(args: argparse.Namespace) -> int:
    try:
        if not 0 < args.loose <= 1:
            raise ValueError(f"--loose {args.loose}: a share in (0, 1]")
        from moesaic.data.loader import load_manifest
        from moesaic.data.tokenizer import check_tokenizer
        from moesaic.eval import audit, perplexity
        from moesaic.model import checkpoint

        load_manifest(args.data, args.source)  # a missing source is named before the model
        if not args.no_verify and checkpoint.is_complete(args.model):
            checkpoint.verify(args.model, "--model")
        model, meta = perplexity.load_model(args.model)
        check_tokenizer(model.cfg, pathlib.Path(args.data) / args.source)
        context = checkpoint.trained_seq_len([meta])
        if context is not None and args.prefix_len + args.match_len > context:
            raise ValueError(f"--prefix-len {args.prefix_len} plus --match-len "
                             f"{args.match_len} exceed the model's context of {context}")
        result = audit.extraction(model, args.data, args.source, n=args.samples,
                                  prefix_len=args.prefix_len, match_len=args.match_len,
                                  seed=args.seed, batch_size=args.batch_size,
                                  loose=args.loose, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"moesaic audit: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.source}'s training documents: {result.samples} prefixes of "
          f"{result.prefix_len} tokens, next {result.match_len} tokens greedy")
    print(f"  extracted verbatim: {result.exact_rate:.2%} ({result.exact})")
    print(f"  loosely (edit distance <= {1 - result.loose_share:.0%}): "
          f"{result.loose_rate:.2%} ({result.loose})")
    if args.json:
        record = {"model": args.model, "source": args.source, "seed": args.seed,
                  **result.to_dict()}
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1))
    return 0
