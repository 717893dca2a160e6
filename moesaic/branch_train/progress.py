"""What a training job shows and records: the parameter overview at start, a progress bar
with loss and tokens/s, WORKDIR/metrics.jsonl (one JSON object per logged step, with the
model FLOP utilisation `mfu` where the device's peak is known: `profiling`) and
TensorBoard event files in WORKDIR/tb (tensorboardX, no TensorFlow). Process 0 writes;
the others stay quiet.

On resume the JSONL keeps only the lines up to the restored step, so the file always
holds one loss curve, the same as an uninterrupted run's. A job killed while appending can
leave its last line cut short: that line (and only the last one) is dropped with a warning.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Mapping

import jax
import numpy as np
from tqdm import tqdm

from moesaic.branch_train.upcycle import ParamLayout


def parameter_overview(layout: ParamLayout, trainable_shardings: Mapping,
                       frozen_shardings: Mapping) -> str:
    """A table: every trainable and frozen array, its shape and its PartitionSpec."""
    counts = layout.counts()
    lines = [f"parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen "
             f"({layout.cfg.n_experts} experts, top-{layout.cfg.top_k})"]
    for kind, shapes, shardings in (("train", layout.trainable_shapes(), trainable_shardings),
                                    ("frozen", layout.frozen_shapes(), frozen_shardings)):
        for name, s in shapes.items():
            spec = tuple(jax.tree.leaves(shardings[name])[0].spec)  # a quantized one's codes
            lines.append(f"  {kind:6s} {name:22s} {str(tuple(s.shape)):22s} "
                         f"{int(np.prod(s.shape)):>12,}  {spec}")
    return "\n".join(lines)


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when
    it can (seconds of start-up) only to accept torch tensors, which a JAX job never has."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    def __init__(self, workdir: str | pathlib.Path, *, start_step: int, total_steps: int,
                 tokens_per_step: int, show_progress: bool = True,
                 flops_per_token: float = 0.0, peak_flops: float | None = None):
        self.enabled = jax.process_index() == 0
        self.tokens_per_step = tokens_per_step
        # model FLOPs per token, and the peak FLOP/s of all the job's devices (None: no MFU)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.total_steps = total_steps
        self.show_progress = show_progress  # without the bar, each record is printed as a line
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._last = (start_step, time.perf_counter())
        self._bar = None
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in _records(self.path) if r["step"] <= start_step]
        fresh = self.path.with_name(self.path.name + ".partial")  # killed here: history kept
        fresh.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(fresh, self.path)
        self._tb = _summary_writer()(str(pathlib.Path(workdir) / "tb"), purge_step=start_step + 1)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                         disable=not show_progress, dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> dict:
        """Records the metrics of `step` (after step `step` ran); adds tokens/s since the
        last call. Returns the record."""
        now = time.perf_counter()
        last_step, last_time = self._last
        self._last = (step, now)
        rate = (step - last_step) * self.tokens_per_step / max(now - last_time, 1e-9)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()},
                  "tokens_per_s": rate}
        if self.peak_flops:
            record["mfu"] = rate * self.flops_per_token / self.peak_flops
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step":
                    self._tb.add_scalar(f"train/{key}", value, step)
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:,.0f}")
            if not self.show_progress:
                mfu = f"  MFU {record['mfu']:.1%}" if "mfu" in record else ""
                print(f"step {step}/{self.total_steps}  loss {record['loss']:.4f}  "
                      f"tokens/s {rate:,.0f}{mfu}", flush=True)
        return record

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()


def _records(path: pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl (none when it does not exist). A last line that is not
    JSON was cut short by a kill mid-write: dropped with a warning. Any other bad line is an
    error: the file was damaged otherwise."""
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1)
             if line.strip()]
    records = []
    for k, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if k < len(lines) - 1:
                raise ValueError(f"{path}:{n}: not a JSON record ({err.msg}) and not the last "
                                 "line; the metrics file is damaged, move it away to go on"
                                 ) from None
            warnings.warn(f"{path}:{n}: the last line is cut short (a job killed while "
                          f"writing it?); dropped: {line[:80]!r}", stacklevel=3)
    return records


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (a cut-short last line dropped, see `_records`)."""
    return _records(pathlib.Path(workdir) / "metrics.jsonl")
