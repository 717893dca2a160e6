"""`moesaic eval`: held-out perplexity, bits per byte and routing statistics per domain.

    moesaic eval --model CKPT --data DATA_DIR [--sources code,math] [--max-sequences N] \
        [--seq-len 128] [--batch-size 8] [--json out.json] [--mesh data=1,expert=4]
    moesaic eval --ensemble btm|cbtm --expert code=CKPT --expert math=CKPT --data DATA_DIR \
        [--top-k 1] [--stride 16]

The second form scores an ensemble of separately trained models (moesaic.eval.ensembles); for
c-BTM the expert names must be source names of DATA_DIR (their training text gives the
centroids). Every model is checked against the tokenizer of the data it reads, and c-BTM
decodes text with that tokenizer (loaded from the experts' model.tokenizer).

The table's "average" row is the mean of the domain rows over --average-over (default: every
domain evaluated, public included); its label names them. For an MoE model, the routing
printed per domain and layer is each expert's share of router weight (the weights of the
top-k experts chosen, summed over the domain's tokens, as the demo's heatmaps show); --json
also keeps each expert's share of top-k slots (token_share), which counts an expert chosen
with a tiny weight as fully as one chosen with all of it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from moesaic.cli import mesh as mesh_flags
from moesaic.cli.args import whole_number

DEFAULT_SEQ_LEN = 128


def register(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--model", help="a moesaic checkpoint (pretrain, branch model, merge)")
    parser.add_argument("--ensemble", choices=("btm", "cbtm"),
                        help="score an ensemble of --expert models instead of --model")
    parser.add_argument("--expert", action="append", default=[], metavar="NAME=CKPT",
                        help="an ensemble member; repeat")
    parser.add_argument("--top-k", type=whole_number(1), default=None,
                        help="ensemble experts kept per token (default 1; an MoE --model "
                             "routes with its own top_k)")
    parser.add_argument("--stride", type=whole_number(1), default=None,
                        help="c-BTM: recompute the prefix's weights every this many tokens "
                             "(default 16)")
    parser.add_argument("--data", required=True, help="DATA_DIR of prepared sources")
    parser.add_argument("--sources", default="",
                        help="comma-separated sources (default: every source in DATA_DIR)")
    parser.add_argument("--seq-len", type=whole_number(0), default=0,
                        help=f"default: the checkpoint's data.seq_len, else {DEFAULT_SEQ_LEN}")
    parser.add_argument("--max-sequences", type=whole_number(1), default=None,
                        help="held-out sequences per domain, evenly spaced over the split "
                             "(default: all)")
    parser.add_argument("--batch-size", type=whole_number(1), default=8)
    parser.add_argument("--average-over", default="",
                        help="comma-separated sources the average row means over (default: "
                             "every source evaluated, public included)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reading each model whole against its fingerprint first")
    mesh_flags.add_arguments(parser)


def _seq_len_of(path: str) -> int:
    from moesaic.model import checkpoint

    if not checkpoint.is_complete(path):
        return DEFAULT_SEQ_LEN  # loading the model then says what is wrong with the path
    meta = checkpoint.read_meta(path)
    return checkpoint.trained_seq_len([meta]) or DEFAULT_SEQ_LEN


def _experts(specs: list[str]) -> dict[str, str]:
    experts = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--expert {spec!r}: want NAME=CHECKPOINT")
        if name in experts:
            raise ValueError(f"--expert {name!r} given twice")
        experts[name] = path
    return experts


def _average_over(text: str, sources: list[str]) -> list[str]:
    """The domains the average row means over: --average-over, else every one evaluated."""
    over = [s for s in text.split(",") if s] or list(sources)
    unknown = [s for s in over if s not in sources]
    if unknown:
        raise ValueError(f"--average-over {', '.join(unknown)}: not evaluated; the sources "
                         f"evaluated are {', '.join(sources)}")
    return over


def averages(results: dict[str, dict], over: list[str]) -> dict[str, float]:
    """The mean of nll, ppl and bpb over the domains `over`."""
    return {k: float(np.mean([results[d][k] for d in over])) for k in ("nll", "ppl", "bpb")}


def format_results(results: dict[str, dict], over: list[str] | None = None) -> str:
    over = list(results) if over is None else over
    lines = [f"{'domain':>10} {'nll':>8} {'ppl':>9} {'bpb':>8} {'tokens':>9}"]
    for domain, m in results.items():
        lines.append(f"{domain:>10} {m['nll']:8.4f} {m['ppl']:9.3f} {m['bpb']:8.4f} "
                     f"{m['tokens']:9d}")
    mean = averages(results, over)
    which = "every domain" if over == list(results) else "--average-over"
    lines.append(f"{'average':>10} {mean['nll']:8.4f} {mean['ppl']:9.3f} {mean['bpb']:8.4f}"
                 f"  mean over {', '.join(over)} ({which})")
    for domain, m in results.items():
        routing = m.get("routing")
        if not routing:
            continue
        experts = routing.get("experts") or []
        if "weight_share" in routing or "token_share" in routing:
            key = "weight_share" if "weight_share" in routing else "token_share"
            what = "router weight" if key == "weight_share" else "top-k slots"
            lines.append(f"routing on {domain}: each expert's share of {what} per layer "
                         f"({', '.join(experts)})")
            for layer, shares in enumerate(routing[key]):
                lines.append(f"{'':>4}layer {layer:>2}: " + " ".join(f"{s:6.3f}" for s in shares))
        if "ensemble_weight" in routing:
            lines.append(f"ensemble weights on {domain}: " + ", ".join(
                f"{e} {w:.3f}" for e, w in zip(experts, routing["ensemble_weight"])))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from moesaic.eval import ensembles, perplexity

    try:
        sources = [s for s in args.sources.split(",") if s] or perplexity.prepared_sources(
            args.data)
        over = _average_over(args.average_over, sources)
        if args.ensemble:
            if args.mesh or args.dispatch != "dropless":
                raise ValueError("--mesh and --dispatch run one --model expert-parallel, "
                                 "not an ensemble")
            if args.model:
                raise ValueError("give --model or --ensemble with --expert, not both")
            experts = _experts(args.expert)
            if len(experts) < 2:
                raise ValueError(f"--ensemble {args.ensemble}: give at least two --expert")
            from moesaic.model import checkpoint

            lengths = {name: _seq_len_of(path) for name, path in experts.items()
                       if checkpoint.is_complete(path)}  # a bad path is named when it is loaded
            if not args.seq_len and len(set(lengths.values())) > 1:
                raise ValueError(f"the experts were trained on different data.seq_len "
                                 f"{lengths}; pass --seq-len")
            seq_len = args.seq_len or next(iter(lengths.values()), DEFAULT_SEQ_LEN)
            # c-BTM's router also reads the experts' own sources (their training text).
            if args.ensemble == "cbtm":
                prepared = perplexity.prepared_sources(args.data)
                unknown = [name for name in experts if name not in prepared]
                if unknown:
                    raise ValueError(f"--ensemble cbtm: --expert {', '.join(unknown)}: an "
                                     "expert's name must be the source of --data it trained "
                                     f"on (its centroid is that text); sources: "
                                     f"{', '.join(prepared)}")
            checked = [*sources, *(s for s in experts
                                   if args.ensemble == "cbtm" and s not in sources)]
            if not args.no_verify:  # a path that is no checkpoint is named when it loads
                for name, path in experts.items():
                    if checkpoint.is_complete(path):
                        checkpoint.verify(path, f"--expert {name}")
            models = ensembles.load_experts(experts, data_dir=args.data, sources=checked)
            top_k = args.top_k or 1
            if args.ensemble == "btm":
                if args.stride is not None:
                    raise ValueError("--stride is c-BTM's; BTM reweighs at every token")
                scorer = ensembles.btm(models, top_k=top_k)
            else:
                router = ensembles.TfidfCentroids.from_data(
                    args.data, experts, tokenizer=ensembles.experts_tokenizer(models))
                scorer = ensembles.cbtm(models, router, top_k=top_k, stride=args.stride or 16)
            label = f"{args.ensemble}({', '.join(experts)})"
            results = perplexity.evaluate_scorer(
                scorer, args.data, sources, seq_len=seq_len, max_sequences=args.max_sequences,
                batch_size=args.batch_size, progress=not args.no_progress, name=args.ensemble)
        else:
            if args.expert:
                raise ValueError("--expert names an ensemble member; add --ensemble btm|cbtm")
            if not args.model:
                raise ValueError("give --model CHECKPOINT (or --ensemble with --expert)")
            ignored = [f for f, v in (("--top-k", args.top_k), ("--stride", args.stride)) if v]
            if ignored:
                raise ValueError(f"{', '.join(ignored)} set an ensemble (--ensemble); an MoE "
                                 "--model routes with the top_k it was merged with")
            mesh = mesh_flags.build(args.mesh, mesh_flags.experts_of(args.model))
            if not args.no_verify:
                from moesaic.model import checkpoint

                if checkpoint.is_complete(args.model):  # else named when it loads
                    checkpoint.verify(args.model, "--model")
            seq_len = args.seq_len or _seq_len_of(args.model)
            label = args.model
            results = perplexity.evaluate(
                args.model, args.data, sources, seq_len=seq_len,
                max_sequences=args.max_sequences, batch_size=args.batch_size,
                progress=not args.no_progress, mesh=mesh, dispatch=args.dispatch)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"moesaic eval: error: {e}", file=sys.stderr)
        return 2
    print(f"{label}: held-out, seq_len {seq_len}")
    print(format_results(results, over))
    if args.json:
        out = {"system": label, "seq_len": seq_len, "domains": results,
               "average": averages(results, over), "average_over": over}
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
