"""Merge cost, as ratios measured in one run:

- time: the merge (verification included: the tensors it streams out as they are are hashed
  and scanned by the write's own read of them, the rest read once to verify and once to
  write) over a plain copy (shutil.copytree, best of three) of the same input checkpoints;
- memory: the peak resident memory the merge adds (sampled every 2 ms with psutil, above the
  process's RSS just before it starts, after the heap the warm-up freed is handed back with
  glibc's malloc_trim, so the merge cannot hide in memory it left behind) over the largest
  single tensor it writes, over the largest tensor it reads, and over one layer of the
  largest tensor it writes (docs/merge.md, "Figures", says what these came to).

For 2, 4 and 8 branches of a model whose expert tensors dominate (d_model 512, d_ff 2048,
12 layers, float32). Each count runs in its own subprocess.

    .venv/bin/python bench/merge.py [--branches 2 4 8] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_inputs(root: pathlib.Path, n_branches: int, layers: int) -> tuple[pathlib.Path, list]:
    import numpy as np
    from flax import nnx

    from moesaic.branch_train import artifact
    from moesaic.model import Decoder, ModelConfig, checkpoint
    from moesaic.model.names import BIAS, FFN_EXPERT, ROUTER, stat_name

    cfg = ModelConfig(vocab_size=264, d_model=512, n_layers=layers, n_heads=8, n_kv_heads=8,
                      d_ff=2048)
    base = root / "base"
    checkpoint.save_model(base, Decoder(cfg, rngs=nnx.Rngs(0)), {"kind": "public"})
    flat = checkpoint.load_tensors(base, checkpoint.tensor_metadata(base))
    hashes = {n: checkpoint.tensor_hash(v) for n, v in flat.items()}
    fingerprint = checkpoint.read_meta(base)["fingerprint"]
    rng = np.random.default_rng(0)
    d = cfg.d_model
    paths = []
    for i in range(n_branches):
        own = {n: flat[n][:, :1] + np.float32(0.01) for n in FFN_EXPERT}
        own[ROUTER] = rng.standard_normal((layers, 1, d)).astype(np.float32)
        own[BIAS] = np.zeros((layers, 1), np.float32)
        x = rng.standard_normal((layers, 64, d)).astype(np.float32)
        stats = {stat_name("x_sum"): x.sum(1),
                 stat_name("xtx"): np.einsum("ltd,lte->lde", x, x),
                 stat_name("mean_hidden"): x.mean(1)}
        path = root / f"branch_{i}"
        artifact.save(path, own, stats, {
            "source": f"p{i}", "base_fingerprint": fingerprint, "frozen_hashes": hashes,
            "base_experts": 1, "model": cfg.replace(n_experts=2, top_k=2).to_dict(),
            "config": {}, "tokens_seen": 0, "stats_tokens": 64, "stats_documents": 1,
            "steps": 0})
        paths.append(path)
    return base, paths


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(n_branches: int, layers: int) -> dict:
    import psutil

    from moesaic.merge import fuse
    from moesaic.model import checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        root = pathlib.Path(tmp)
        base, branches = build_inputs(root, n_branches, layers)
        warm = fuse.merge_paths  # warm the code paths and thread pools on the same inputs
        warm(base, branches[:1], router="learned-rows", top_k=1, out=root / "warm",
             log=lambda s: None)
        shutil.rmtree(root / "warm")
        inputs = [base, *branches]
        in_bytes = sum(dir_bytes(p) for p in inputs)

        copies = []
        for attempt in range(3):  # best of three: one copy is a few tenths of a second
            start = time.perf_counter()
            for p in inputs:
                shutil.copytree(p, root / f"copy{attempt}" / p.name)
            copies.append(time.perf_counter() - start)
        copy_s = min(copies)

        proc = psutil.Process()
        _release_freed_heap()  # else the merge reuses what the warm-up freed, unseen
        before = proc.memory_info().rss
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.002)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        fuse.merge_paths(base, branches, router="learned-rows", top_k=2, out=root / "merged",
                         log=lambda s: None)
        merge_s = time.perf_counter() - start
        done.set()
        sampler.join()
        shapes = checkpoint.tensor_metadata(root / "merged")
        largest_out = max(int(s[1].itemsize) * int(_prod(s[0])) for s in shapes.values())
        largest_in = max(int(s[1].itemsize) * int(_prod(s[0]))
                         for p in inputs for s in checkpoint.tensor_metadata(p).values())
        added = peak[0] - before
        return {"branches": n_branches, "input_mb": in_bytes / 2**20,
                "copy_s": copy_s, "merge_s": merge_s, "time_ratio": merge_s / copy_s,
                "rss_added_mb": added / 2**20, "largest_out_mb": largest_out / 2**20,
                "largest_in_mb": largest_in / 2**20,
                "rss_over_largest_out": added / largest_out,
                "rss_over_largest_in": added / largest_in,
                "rss_over_out_layer": added / (largest_out / layers)}


def _release_freed_heap() -> None:
    """Returns memory freed by earlier work to the system (glibc keeps it in the heap
    otherwise), so the RSS sampled next is what is live."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to release
        pass


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.layers)))
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    print(f"{'branches':>8} {'input MB':>9} {'copy s':>7} {'merge s':>8} {'merge/copy':>10} "
          f"{'+RSS MB':>8} {'/largest out':>12} {'/largest in':>11} {'/out layer':>10}")
    for n in args.branches:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--layers",
                              str(args.layers)], capture_output=True, text=True, env=env,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['branches']:>8} {r['input_mb']:>9.0f} {r['copy_s']:>7.2f} {r['merge_s']:>8.2f} "
              f"{r['time_ratio']:>10.1f} {r['rss_added_mb']:>8.0f} "
              f"{r['rss_over_largest_out']:>12.2f} {r['rss_over_largest_in']:>11.2f} "
              f"{r['rss_over_out_layer']:>10.2f}")


if __name__ == "__main__":
    main()
