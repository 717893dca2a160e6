"""The cost of verifying a checkpoint on load, as ratios measured in one run.

A command that reads a checkpoint first reads it whole against the fingerprint in its
meta.json (`checkpoint.verify`: every tensor hashed and scanned for NaN/Inf, a stored chunk at
a time), then loads it. For each checkpoint this prints the time of the load alone, of the
verification alone, and their ratio (verify / load; the command costs (verify + load) / load
of what it cost before). Both read from the page cache (one warm-up read first), best of
--repeat each, alternated.

Checkpoints: the paths given, and with --merge-inputs the inputs bench/merge.py builds (a base
of d_model 512, d_ff 2048, float32, and its branch artifacts) and their merged model. A model
is loaded as the commands load it (`checkpoint.load`, onto a device); a branch artifact, which
is no model, with `checkpoint.load_tensors`.

    .venv/bin/python bench/verify.py [PATH ...] [--merge-inputs] [--layers 12] [--branches 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure(path: pathlib.Path, repeat: int) -> dict:
    import jax

    from moesaic.model import checkpoint

    meta = checkpoint.read_meta(path)
    if "model" in meta and meta.get("kind") != "branch":
        def load():
            model, _ = checkpoint.load(path, meta=meta)
            jax.block_until_ready(jax.tree.leaves(model))
    else:
        def load():
            checkpoint.load_tensors(path, checkpoint.tensor_metadata(path))

    def verify():
        checkpoint.verify(path)

    load(), verify()  # warm: page cache, thread pools, the model's abstract init
    best = {load: float("inf"), verify: float("inf")}
    for _ in range(repeat):  # alternated, so a slow moment of the machine hits both
        for fn in best:
            start = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - start)
    load_s, verify_s = best[load], best[verify]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"path": str(path), "kind": meta.get("kind"), "mb": size / 2**20,
            "load_s": load_s, "verify_s": verify_s, "ratio": verify_s / load_s}


def _merge_inputs(root: pathlib.Path, layers: int, branches: int) -> list[pathlib.Path]:
    spec = importlib.util.spec_from_file_location("bench_merge", ROOT / "bench" / "merge.py")
    bench_merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_merge)
    from moesaic.merge import fuse

    base, paths = bench_merge.build_inputs(root, branches, layers)
    fuse.merge_paths(base, paths, router="learned-rows", top_k=2, out=root / "merged",
                     log=lambda s: None)
    return [base, *paths[:1], root / "merged"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=pathlib.Path)
    parser.add_argument("--merge-inputs", action="store_true",
                        help="also bench/merge.py's inputs and their merged model")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--branches", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'checkpoint':<48} {'kind':>7} {'MB':>7} {'load s':>7} {'verify s':>8} "
          f"{'verify/load':>11}")
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        paths = list(args.paths)
        if args.merge_inputs:
            paths += _merge_inputs(pathlib.Path(tmp), args.layers, args.branches)
        for path in paths:
            r = measure(path, args.repeat)
            name = r["path"] if len(r["path"]) <= 48 else "..." + r["path"][-45:]
            print(f"{name:<48} {r['kind']:>7} {r['mb']:>7.1f} {r['load_s']:>7.3f} "
                  f"{r['verify_s']:>8.3f} {r['ratio']:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
