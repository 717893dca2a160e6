"""Decoding with the KV cache (moesaic.eval.generate) against transformers' `generate` on the
same tiny FlexOlmo, and the prefill rate against the training step's.

    python bench/generate.py [--config tiny] [--experts 4 --top-k 2] [--batch 8]
                             [--prompt-len 64] [--new-tokens 64] [--repeats 3]

The model is a fresh moesaic model of the config (with --experts E a MoE of E experts),
saved and exported to a FlexOlmoForCausalLM folder (moesaic.interop.hf_export), so both run
the same weights; greedy decoding of the same random prompts (no eos stop) by both, and the
share of completions they agree on (float32 near ties may differ). Everything warm (compiled
once before timing), best of --repeats, on this machine in this run:
  decode    new tokens per second: ours / transformers' (greedy, use_cache=True, torch CPU)
  prefill   prompt tokens per second of our prefill / tokens per second of the trainer's
            step (bench/train_step.py's `step_runner`) at batch x (prompt + new tokens)
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from train_step import CONFIGS, best_of, step_runner  # bench/train_step.py, beside this script

from moesaic.eval import generate as gen
from moesaic.model import checkpoint
from moesaic.model.config import ModelConfig
from moesaic.model.transformer import Decoder


def ours(model: Decoder, prompts: list[np.ndarray], new: int, repeats: int):
    """(decode tokens/s, prefill tokens/s, completions) of our decoder, warm."""
    run = lambda: gen.generate(model, prompts, max_new_tokens=new,  # noqa: E731
                               batch_size=len(prompts))
    out = run()  # compiles
    best = {"decode": 0.0, "prefill": 0.0}
    for _ in range(repeats):
        out = run()
        best["decode"] = max(best["decode"], out.decode_tokens_per_s)
        best["prefill"] = max(best["prefill"], out.prefill_tokens_per_s)
    return best["decode"], best["prefill"], out.tokens


def theirs(folder: pathlib.Path, prompts: list[np.ndarray], new: int, repeats: int):
    """(decode tokens/s, completions) of transformers' greedy generate with its cache."""
    import torch
    from transformers import FlexOlmoForCausalLM

    model = FlexOlmoForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor(np.stack(prompts), dtype=torch.long)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
              pad_token_id=model.config.pad_token_id)

    def decode_seconds():
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                           pad_token_id=model.config.pad_token_id)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, **kw)
            return time.perf_counter() - start - prefill, out

    decode_seconds()
    best, out = float("inf"), None
    for _ in range(repeats):
        seconds, out = decode_seconds()
        best = min(best, seconds)
    return ids.shape[0] * (new - 1) / best, [row[ids.shape[1]:].numpy() for row in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = CONFIGS[args.config].get_config()
    config.model.update(n_experts=args.experts, top_k=args.top_k)
    config.data.global_batch, config.data.seq_len = args.batch, args.prompt_len + args.new_tokens
    cfg = ModelConfig.from_config(config.model)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, args.prompt_len).astype(np.int32)
               for _ in range(args.batch)]
    print(f"{args.config} E={cfg.n_experts} k={cfg.top_k} d={cfg.d_model} L={cfg.n_layers}, "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens "
          f"({jax.devices()[0].platform})", flush=True)
    decode, prefill, mine = ours(model, prompts, args.new_tokens, args.repeats)
    step = best_of(step_runner(config), args.repeats)
    train_rate = args.batch * config.data.seq_len / step
    print(f"ours: decode {decode:,.0f} tokens/s, prefill {prefill:,.0f} tokens/s = "
          f"{prefill / train_rate:.2f}x the training step's {train_rate:,.0f} tokens/s",
          flush=True)
    if importlib.util.find_spec("transformers") is None:
        print("transformers not installed (the `hf` extra): no comparison")
        return
    from moesaic.interop.hf_export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp)
        checkpoint.save_model(path / "model", model)
        export_hf(path / "model", path / "hf", log=lambda _: None)
        hf_decode, hf_tokens = theirs(path / "hf", prompts, args.new_tokens, args.repeats)
    same = np.mean([np.array_equal(a, b) for a, b in zip(mine, hf_tokens)])
    print(f"transformers generate: decode {hf_decode:,.0f} tokens/s; ours / theirs "
          f"{decode / hf_decode:.2f}x; identical greedy completions {same:.0%}")


if __name__ == "__main__":
    main()
