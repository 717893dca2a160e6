"""`moesaic merge`: fuse branches into one MoE; remove or add an expert.

    moesaic merge --base B --branch P1 --branch P2 --router learned-rows --top-k 2 --out M
    moesaic merge remove M --source P --out M2
    moesaic merge add M --branch P3 --out M3
    moesaic merge soup --branch D1 --branch D2 [--weights-data DIR] --out S
    moesaic merge btx --branch D1 --branch D2 --router centroid --top-k 2 --out X

Router kinds: learned-rows, centroid, ridge, random, contrast (moesaic.routing). A refusal
(an input that fails verification) prints what is wrong and where, writes nothing, and
exits 2. The base must be the public model the branches started from, never a merged one:
`merge add` is how a party joins a merged model.

    moesaic tune-router M --data DIR --source S [--source S2] --steps N --out M2

tune-router trains the router rows only, everything else frozen, on data the caller provides
(moesaic.merge.tune), after reading the merged model whole against its fingerprint
(--no-verify skips it). merge, remove and add always verify every input (the base's and each
party's tensors against the fingerprints recorded for them, NaN and Inf refused): that check
is what makes a merge exact, so it has no --no-verify. A damaged input or a full disk is a
refusal too.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from moesaic.cli import mesh as mesh_flags
from moesaic.cli.args import whole_number
from moesaic.merge.sources import MergeRefused
from moesaic.model import checkpoint
from moesaic.routing.registry import KINDS

ACTIONS = ("remove", "add", "soup", "btx")


def _router_option(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=NUMBER, e.g. margin=2") from None


def _router_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--router", choices=sorted(KINDS), required=required,
                        help="how the router rows are built")
    parser.add_argument("--top-k", type=whole_number(1), default=None,
                        help="experts per token (merge: 1; remove/add: the merged model's; "
                             "btx: 2)")
    parser.add_argument("--public-stats", default=None,
                        help="checkpoint with stats/{x_sum,xtx,mean_hidden} of public data "
                             "(the public expert's class for centroid, ridge and contrast)")
    parser.add_argument("--public-data", default=None,
                        help="prepared data folder: compute the public stats from its "
                             "'public' source under the base model")
    parser.add_argument("--ridge-lambda", type=float, default=None)
    parser.add_argument("--router-scale", type=float, default=None,
                        help="multiplies centroid / ridge rows (softmax temperature)")
    parser.add_argument("--seed", type=int, default=None, help="random router seed")
    parser.add_argument("--router-option", action="append", default=None, metavar="NAME=X",
                        type=_router_option,
                        help="a number for the router kind, e.g. contrast's margin=2 or "
                             "selectivity=2 (repeat)")


def _tune_router_args(parser: argparse.ArgumentParser) -> None:
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
    mesh_flags.add_arguments(parser)
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reading the merged model whole against its fingerprint")


def register(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "tune-router":
        _tune_router_args(parser)
        return
    parser.add_argument("action", nargs="?", default="merge", choices=("merge", *ACTIONS),
                        help="merge (default), remove, add, soup or btx")
    parser.add_argument("merged", nargs="?", default=None,
                        help="the merged checkpoint (remove / add)")
    parser.add_argument("--base", help="the public checkpoint every branch started from")
    parser.add_argument("--branch", action="append", default=[],
                        help="a branch artifact (repeat); dense branches for soup / btx")
    parser.add_argument("--source", help="remove: the party to opt out")
    parser.add_argument("--out", required=True, help="where to write (must not exist)")
    parser.add_argument("--weights-data", default=None,
                        help="soup: data folder; weight each branch by its loss there")
    parser.add_argument("--weights-source", default=None,
                        help="soup: which source of --weights-data to score on (default: "
                             "public)")
    parser.add_argument("--weighting", choices=("softmax", "inverse"), default=None,
                        help="soup: exp(-loss) softmax (default) or inverse-loss weights")
    _router_args(parser, required=False)
    parser.add_argument("--low-rank", type=whole_number(1), default=None, metavar="R",
                        help="every FFN party as a rank-R low-rank expert: the truncated SVD "
                             "of its difference from the public FFN (docs/low-rank.md)")
    parser.add_argument("--fine-grained", type=int, default=None, metavar="M",
                        help="every FFN expert as M sub-experts of width d_ff/M (its hidden "
                             "units grouped by gate direction), top-k times M; remove/add keep "
                             "it (docs/low-rank.md)")
    parser.add_argument("--fine-grained-scale", type=float, default=None, metavar="S",
                        help="--fine-grained: weight of each sub-expert's own router part, its "
                             "group's mean gate column (default 0: the unsplit merge exactly)")
    parser.add_argument("--calibrate", default=None, metavar="DATA",
                        help="prepared data folder: add the party gate (a bigram posterior "
                             "over the parties, from their counts), its temperature chosen on "
                             "the folder's 'public' source (moesaic.merge.calibrate); kept in "
                             "the model and rebuilt by remove/add")
    parser.add_argument("--calibrate-option", action="append", default=None, metavar="NAME=X",
                        type=_router_option,
                        help="a calibration setting: temperatures=T (one temperature instead "
                             "of the grid 0.5, 1, 2, 4) or alpha=A (count smoothing)")
    parser.add_argument("--screen", default=None, metavar="DATA",
                        help="prepared data folder: screen every expert on its 'public' source "
                             "(moesaic.merge.screen); report beside --out")
    parser.add_argument("--policy", choices=("warn", "down-weight", "refuse"), default=None,
                        help="--screen: what happens to a party below --refuse-below (default "
                             "warn)")
    parser.add_argument("--refuse-below", type=float, default=None, metavar="T",
                        help="--screen: trust threshold in [0, 1] (default 0.5)")


def _options(args) -> dict:
    out = dict(args.router_option or [])
    if args.ridge_lambda is not None:
        out["ridge_lambda"] = args.ridge_lambda
    if args.router_scale is not None:
        out["scale"] = args.router_scale
    if args.seed is not None:
        out["seed"] = args.seed
    return out


ROUTER_FLAGS = {"router": "--router", "public_stats": "--public-stats",
                "public_data": "--public-data", "ridge_lambda": "--ridge-lambda",
                "router_scale": "--router-scale", "seed": "--seed",
                "router_option": "--router-option"}
FLAGS = {"merged": "M", "base": "--base", "branch": "--branch", "source": "--source",
         "top_k": "--top-k", "low_rank": "--low-rank", "fine_grained": "--fine-grained",
         "fine_grained_scale": "--fine-grained-scale", "weights_data": "--weights-data",
         "weights_source": "--weights-source", "weighting": "--weighting",
         "calibrate": "--calibrate", "calibrate_option": "--calibrate-option",
         "screen": "--screen", "policy": "--policy", "refuse_below": "--refuse-below",
         **ROUTER_FLAGS}
# What each action reads; a flag it does not read is refused, never ignored.
USES = {"merge": {"base", "branch", "top_k", "calibrate", "calibrate_option", "screen",
                  "policy", "refuse_below", *ROUTER_FLAGS},
        "remove": {"merged", "source", "top_k"},
        "add": {"merged", "branch", "top_k"},
        "soup": {"branch", "weights_data", "weights_source", "weighting"},
        "btx": {"branch", "top_k", "router", "ridge_lambda", "router_scale", "seed",
                "router_option"}}
USES["merge"].update(("low_rank", "fine_grained", "fine_grained_scale"))  # remove/add keep them
WHY = {"remove": "it rebuilds the router with the kind, options and statistics the model was "
                 "merged with",
       "add": "it rebuilds the router with the kind, options and statistics the model was "
              "merged with; the new party's statistics come with its artifact",
       "soup": "a soup is a weighted mean of whole models: it has no router and no experts",
       "btx": "a BTX model has no public expert, and its dense branches are given with "
              "--branch",
       "merge": "a merge starts from --base and the --branch artifacts"}


def _refuse_unused(args) -> None:
    given = [key for key in FLAGS if getattr(args, key) not in (None, [])]
    unused = [FLAGS[key] for key in given if key not in USES[args.action]]
    if unused:
        command = "merge" if args.action == "merge" else f"merge {args.action}"
        raise MergeRefused(f"{command} takes no {', '.join(unused)}: {WHY[args.action]}")
    if args.action == "soup" and not args.weights_data and (args.weights_source
                                                            or args.weighting):
        raise MergeRefused("merge soup: --weights-source and --weighting weight the soup by "
                           "each branch's loss on --weights-data, which is not given (without "
                           "it the soup is uniform)")


def _public_stats(args, base_path):
    """(path of public stats or None, temporary folder to remove afterwards or None)."""
    if args.public_stats and args.public_data:
        raise MergeRefused("give --public-stats or --public-data, not both")
    if args.public_data:
        from moesaic.merge.public_stats import compute_public_stats
        from moesaic.merge.sources import open_branch
        branches = [open_branch(b) for b in args.branch or []]
        kinds = {b.router_input for b in branches}
        # The sums must be of sequences as long as the parties' (prefix means depend on it).
        seq_len = checkpoint.trained_seq_len(b.meta for b in branches) or 128
        path = compute_public_stats(base_path, args.public_data,
                                    router_input=kinds.pop() if len(kinds) == 1 else "token",
                                    seq_len=seq_len)
        return path, path.parent
    return args.public_stats, None


def _calibration(args):
    """The calibration request of `merge --calibrate DATA`, or None."""
    if args.calibrate_option and not args.calibrate:
        raise MergeRefused("--calibrate-option without --calibrate DATA")
    if not args.calibrate:
        return None
    from moesaic.merge import calibrate
    from moesaic.merge.sources import open_branch

    metas = [open_branch(b).meta for b in args.branch]
    seq_len = checkpoint.trained_seq_len(metas) or 128
    base_cfg = checkpoint.model_config(checkpoint.read_meta(args.base))
    return calibrate.request_from_data(args.calibrate, base_cfg, seq_len=seq_len,
                                       options=dict(args.calibrate_option or []))


def _screening(args):
    """`merge --screen DATA`: a merge function that screens (moesaic.merge.screen), or None."""
    if not args.screen:
        if args.policy or args.refuse_below is not None:
            raise MergeRefused("--policy and --refuse-below act on --screen DATA, not given")
        return None
    import functools

    from moesaic.merge import calibrate, screen
    from moesaic.merge.sources import open_branch

    threshold = screen.check_threshold(screen.DEFAULT_THRESHOLD if args.refuse_below is None
                                       else args.refuse_below)
    metas = [open_branch(b).meta for b in args.branch]
    seq_len = checkpoint.trained_seq_len(metas) or 128
    base_cfg = checkpoint.model_config(checkpoint.read_meta(args.base))
    tokens = calibrate.proxy_tokens(args.screen, base_cfg, seq_len=seq_len)
    return functools.partial(screen.screened_merge, tokens=tokens,
                             policy=args.policy or "warn", threshold=threshold)


def _fine_grained(args) -> dict:
    if args.fine_grained_scale is not None and args.fine_grained is None:
        raise MergeRefused("--fine-grained-scale without --fine-grained M")
    if args.fine_grained is None:
        return {}
    if args.screen:
        raise MergeRefused("--fine-grained with --screen: screening scores one expert slot per "
                           "party, a fine-grained merge has --fine-grained of them")
    return {"fine_grained_to": args.fine_grained,
            "fine_grained_scale": args.fine_grained_scale or 0.0}


def _run(args) -> None:
    from moesaic.merge import fuse

    _refuse_unused(args)
    if args.action == "merge":
        missing = [flag for flag, value in (("--base", args.base), ("--router", args.router),
                                            ("--branch", args.branch)) if not value]
        if missing:
            raise MergeRefused(f"merge needs {', '.join(missing)} (--base: the public model, "
                               "--router: a kind, --branch: each party's artifact)")
        from moesaic.merge.sources import open_base
        open_base(args.base)  # refuse a merged base before computing public statistics
        calibration = _calibration(args)
        screening = _screening(args)
        public, scratch = _public_stats(args, args.base)
        try:
            merge = fuse.merge_paths if screening is None else screening
            merge(args.base, args.branch, router=args.router, top_k=args.top_k or 1,
                  out=args.out, public_stats=public, low_rank_to=args.low_rank,
                  options=_options(args), calibration=calibration,
                  **_fine_grained(args))
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    elif args.action == "remove":
        if not args.merged or not args.source:
            raise MergeRefused("usage: moesaic merge remove M --source P --out M2")
        fuse.remove(args.merged, args.source, out=args.out, top_k=args.top_k)
    elif args.action == "add":
        if not args.merged or not args.branch:
            raise MergeRefused("usage: moesaic merge add M --branch P3 --out M3")
        fuse.add(args.merged, args.branch, out=args.out, top_k=args.top_k)
    elif args.action == "soup":
        _soup(args)
    else:
        _btx(args, _options(args))


def _soup(args) -> None:
    from moesaic.merge import baselines

    sample = None
    if args.weights_data:
        from moesaic.data.loader import heldout_sequences
        sample = heldout_sequences(args.weights_data, args.weights_source or "public",
                                   seq_len=128, max_sequences=32).tokens
    baselines.soup(args.branch, args.out, sample_bt1=sample,
                   weighting=args.weighting or "softmax")


def _btx(args, options: dict) -> None:
    from moesaic.merge import baselines

    if not args.router:
        raise MergeRefused("btx needs --router (centroid, ridge or random)")
    baselines.btx(args.branch, args.out, router=args.router, top_k=args.top_k or 2,
                  options=options)


def _tune_router(args) -> None:
    from moesaic.merge.tune import tune_router_on_data

    mesh = mesh_flags.build(args.mesh, mesh_flags.experts_of(args.merged))
    if not args.no_verify and checkpoint.is_complete(args.merged):  # else named when read
        checkpoint.verify(args.merged, "merged model")
    seq_len = (args.seq_len
               or checkpoint.trained_seq_len([checkpoint.read_meta(args.merged)]) or 128)
    tune_router_on_data(args.merged, args.out, args.data, ",".join(args.source),
                        seq_len=seq_len, batch=args.batch, seed=args.seed,
                        steps=args.steps, lr=args.lr, mesh=mesh, dispatch=args.dispatch)


def run(args) -> int:
    try:
        if args.command == "tune-router":
            _tune_router(args)
        else:
            _run(args)
    except (MergeRefused, ValueError, OSError) as err:
        from moesaic.cli import refusals

        if refusals.disk_full(err):
            err = refusals.disk_full_message(err, f"--out {args.out}")
        elif not isinstance(err, (MergeRefused, ValueError, FileExistsError,
                                  FileNotFoundError)):
            raise
        print(f"moesaic {args.command}: refused: {err}", file=sys.stderr)
        return 2
    return 0
