"""The extraction audit (moesaic.eval.audit) of a private (DP-SGD) branch against a non-private
one trained identically otherwise, on a party's documents chosen to be memorised.

    python bench/dp_audit.py [--steps 150] [--clip-norm 1.0] [--noise 8] [--delta 1e-5]
                             [--docs 4] [--lr 1e-2]

The party holds --docs short documents of random letters, each exactly one training row
(PREFIX + MATCH bytes and eos: the row of seq_len 16); a one-layer model of width 32 trains on
all of them every step (the full batch: sampling rate 1) for --steps steps of the trainer's
own step (moesaic.branch_train.setup), AdamW at --lr with the config's warmup and cosine.
Both runs start from the same initial weights and differ only in the step: the plain one, or
moesaic.branch_train.dp.private_step (each row's gradient clipped to --clip-norm, Gaussian
noise of --noise times the clip norm). The audit then cuts each document's first PREFIX bytes
and asks for the next MATCH greedily: the exact and loose (edit distance <= 10%) extraction
rates of both models are printed, with the private run's epsilon at --delta (the DP-SGD
accountant, RDP, as the branch job reports it; PLD beside it). --noise takes a list
(--noise 1,8) to audit several private runs against the same non-private one.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

from moesaic.branch_train import dp, setup
from moesaic.configs import tiny
from moesaic.data.prepare import write_source
from moesaic.data.tokenizer import BYTES
from moesaic.eval import audit
from moesaic.model import checkpoint
from moesaic.model.sharding import make_mesh
from moesaic.model.transformer import Decoder

PREFIX, MATCH = 8, 8  # a row of seq_len 16 holds one document and its eos
SHAPES = {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
          "model.d_ff": 64, "data.seq_len": PREFIX + MATCH, "train.warmup_steps": 1}


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model's audit: noise 0 is the non-private run."""
    noise_multiplier: float
    exact_rate: float
    loose_rate: float
    final_loss: float
    epsilon: float | None = None  # RDP, at the delta of the settings
    epsilon_pld: float | None = None


def party_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnop") for _ in range(PREFIX + MATCH))
            for _ in range(n)]


def train(docs: list[str], steps: int, lr: float, private: dp.DpSettings | None
          ) -> tuple[Decoder, float]:
    """(model, last step's loss) after `steps` full-batch steps on `docs` from the seed-0
    initial weights, by the trainer's plain step or its DP-SGD step."""
    config = tiny.get_config()
    for key, value in {**SHAPES, "data.global_batch": len(docs), "train.steps": steps,
                       "train.lr": lr}.items():
        section, field = key.split(".")
        config[section][field] = value
    sc, plain = setup.set_up(config, "pretrain", make_mesh({"data": 1}))
    step = plain if private is None else jax.jit(dp.private_step(sc, private, seed=0))
    flat = checkpoint.flatten(nnx.state(Decoder(sc.layout.cfg, rngs=nnx.Rngs(0)), nnx.Param))
    trainable = {n: flat[n] for n in sc.trainable_shapes}
    opt_state = sc.optimizer.init(trainable)
    rows = np.array([[*d.encode(), BYTES.eos_id] for d in docs], np.int32)
    metrics = {"loss": np.nan}
    for s in range(steps):
        trainable, opt_state, metrics = step(trainable, opt_state, {}, rows, np.int32(s))
    return sc.layout.model(trainable, {}), float(metrics["loss"])


def compare(*, steps: int = 150, clip_norm: float = 1.0, noises: tuple[float, ...] = (8.0,),
            delta: float = 1e-5, n_docs: int = 4, lr: float = 1e-2) -> list[Run]:
    """The non-private run, then one private run per noise multiplier."""
    if steps < 1 or n_docs < 1 or clip_norm <= 0 or any(s <= 0 for s in noises):
        raise ValueError("steps and docs at least 1, clip norm and noise multipliers above 0")
    docs = party_documents(n_docs)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        write_source(tmp, "party", {"train": lambda: docs, "heldout": lambda: docs},
                     tokenizer=BYTES, origin={"kind": "bench"})
        for noise in (0.0, *noises):
            private = dp.DpSettings(clip_norm, noise, delta) if noise else None
            model, loss = train(docs, steps, lr, private)
            got = audit.extraction(model, pathlib.Path(tmp), "party", n=n_docs,
                                   prefix_len=PREFIX, match_len=MATCH)
            eps = {} if private is None else dict(
                epsilon=dp.epsilon(noise, n_docs, n_docs, steps, delta),
                epsilon_pld=dp.epsilon(noise, n_docs, n_docs, steps, delta, accountant="pld"))
            runs.append(Run(noise, got.exact_rate, got.loose_rate, loss, **eps))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--noise", default="8", help="noise multipliers, comma-separated")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    try:
        noises = tuple(float(s) for s in args.noise.split(","))
        runs = compare(steps=args.steps, clip_norm=args.clip_norm, noises=noises,
                       delta=args.delta, n_docs=args.docs, lr=args.lr)
    except ValueError as e:
        print(f"dp_audit: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.docs} documents of {PREFIX + MATCH} bytes, full batch, {args.steps} steps, "
          f"lr {args.lr}; audit: prefix {PREFIX}, next {MATCH} tokens greedy")
    print(f"{'run':<28}{'exact':>8}{'loose':>8}{'loss':>8}  epsilon (RDP / PLD) at delta "
          f"{args.delta:g}")
    for r in runs:
        name = ("non-private" if r.epsilon is None else
                f"DP clip {args.clip_norm:g} noise {r.noise_multiplier:g}")
        eps = "" if r.epsilon is None else f"  {r.epsilon:.2f} / {r.epsilon_pld:.2f}"
        print(f"{name:<28}{r.exact_rate:>8.0%}{r.loose_rate:>8.0%}{r.final_loss:>8.3f}{eps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
