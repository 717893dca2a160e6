"""`moesaic generate`: text from a model, with a key/value cache (moesaic.eval.generate).

    moesaic generate --model CKPT --prompt "def add(a, b):" --max-new-tokens 64
    moesaic generate --model CKPT --prompts prompts.txt --max-new-tokens 64 \
        [--temperature 0.8 --top-p 0.95 --seed 0] [--batch-size 16] [--json out.json] \
        [--mesh data=1,expert=4]

--prompts reads one prompt a line (blank lines skipped; `\\n` in a line is a newline). Greedy
by default (--temperature 0). Decoding stops at the model's end-of-document token or after
--max-new-tokens; a prompt and its new tokens must fit the context (the data.seq_len the model
trained on, or --context).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from moesaic.cli import mesh as mesh_flags
from moesaic.cli.args import whole_number


def register(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--model", required=True, help="a moesaic checkpoint")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat")
    parser.add_argument("--prompts", help="a text file of prompts, one a line")
    parser.add_argument("--max-new-tokens", type=whole_number(0), required=True)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=whole_number(1), default=16)
    parser.add_argument("--context", type=whole_number(1), default=None,
                        help="longest prompt plus new tokens (default: the model's trained "
                             "data.seq_len)")
    parser.add_argument("--json", help="also write prompts, completions and rates here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reading the model whole against its fingerprint first")
    mesh_flags.add_arguments(parser, dispatch=False)


def read_prompts(prompt_args: list[str], path: str | None) -> list[str]:
    prompts = list(prompt_args)
    if path is not None:
        file = pathlib.Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"--prompts {path!r}: no such file")
        lines = [line.replace("\\n", "\n") for line in file.read_text().splitlines()]
        found = [line for line in lines if line.strip()]
        if not found:
            raise ValueError(f"--prompts {path!r}: the file holds no prompt (one a line)")
        prompts += found
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts FILE")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"--prompt number {empty[0] + 1} is empty")
    return prompts


def run(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args.prompt, args.prompts)
        if args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if args.temperature < 0:
            raise ValueError(f"--temperature {args.temperature}: must be >= 0")
        if not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]")
        from moesaic.data.tokenizer import load_tokenizer
        from moesaic.eval import generate, perplexity
        from moesaic.model import checkpoint

        mesh = mesh_flags.build(args.mesh, mesh_flags.experts_of(args.model))
        if not args.no_verify and checkpoint.is_complete(args.model):
            checkpoint.verify(args.model, "--model")
        model, meta = perplexity.load_model(args.model, mesh=mesh)
        context = args.context or checkpoint.trained_seq_len([meta])
        tokenizer = load_tokenizer(model.cfg.tokenizer)
        ids = [tokenizer.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            if context is not None and len(p) + args.max_new_tokens > context:
                raise ValueError(
                    f"prompt {i + 1} is {len(p)} tokens; with --max-new-tokens "
                    f"{args.max_new_tokens} it needs {len(p) + args.max_new_tokens}, more than "
                    f"the context of {context} (the model's trained data.seq_len; --context "
                    "sets another)")
        out = generate.generate(model, ids, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                eos_id=model.cfg.eos_id, context=context,
                                batch_size=args.batch_size, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"moesaic generate: error: {e}", file=sys.stderr)
        return 2
    texts = [tokenizer.decode(t) for t in out.tokens]
    for prompt, text, eos in zip(prompts, texts, out.stopped_at_eos):
        print(f"--- {prompt!r}{' (eos)' if eos else ''}\n{prompt}{text}")
    rates = (f"prefill {out.prefill_tokens} tokens at {out.prefill_tokens_per_s:.0f} tokens/s, "
             f"decode {out.decode_tokens} tokens at {out.decode_tokens_per_s:.0f} tokens/s "
             "(compilation included)")
    print(rates, file=sys.stderr)
    if args.json:
        record = {"model": args.model, "temperature": args.temperature, "top_p": args.top_p,
                  "seed": args.seed, "completions": [
                      {"prompt": p, "completion": t, "eos": e}
                      for p, t, e in zip(prompts, texts, out.stopped_at_eos)],
                  "prefill_tokens_per_s": out.prefill_tokens_per_s,
                  "decode_tokens_per_s": out.decode_tokens_per_s}
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1))
    return 0
