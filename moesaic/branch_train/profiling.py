"""Where a training job's time goes: a `jax.profiler` trace of chosen steps, and the model FLOP
utilisation (MFU) every logged step records in metrics.jsonl.

    --config.train.profile_steps=10,12   trace steps 10 to 12 into WORKDIR/profile
                                         (TensorBoard's profile tab, or Perfetto)
    --config.train.peak_tflops=989       the peak one device is measured against; 0 (the
                                         default): the device kind's from `PEAK_TFLOPS`

MFU = model FLOPs per token x tokens/s / (peak FLOP/s per device x devices). The model FLOPs
are counted from the shapes (`model_flops_per_token`), not read from the compiled step: XLA's
cost analysis counts a scanned layer once, and the step's remat recomputation is work the
hardware does beyond the model's (MFU, not hardware utilisation, as in PaLM appendix B). On
a CPU, or a device the table does not know, no MFU is logged unless train.peak_tflops says.
"""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

from moesaic.branch_train.upcycle import ParamLayout
from moesaic.model.names import COMPUTE_READ, EMBED, EXPERT_TENSORS, ROUTER

# Dense bfloat16 peak TFLOP/s of one device (no sparsity), by `device_kind`, first match wins:
# the vendors' data sheets (NVIDIA H100/H200/A100/B200, Google Cloud TPU system architecture).
PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"GH200|H200|H100|H800", 989.0),  # SXM
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"TPU v4", 275.0),
    (r"TPU v5 ?(lite|e)", 197.0),  # v5e reports "TPU v5 lite"
    (r"TPU v5", 459.0),  # v5p
    (r"TPU v6", 918.0),  # v6e (Trillium) reports "TPU v6 lite"
)


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """The bf16 peak of one device of `device_kind` in TFLOP/s: `override` when > 0, else
    the table's; None for a CPU or a device it does not know."""
    if override > 0:
        return float(override)
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_kind):
            return tflops
    return None


def model_flops_per_token(layout: ParamLayout, seq_len: int) -> float:
    """Training FLOPs per token of the job `layout` describes: 2 N forward and 2 N for the
    gradients of the activations over the N matmul parameters a token meets (attention,
    lm_head, router, top_k of the experts, each expert taken as routed top_k / experts of
    the tokens), 2 N' for the weight gradients of the N' of them that train, and the
    attention scores, 12 x layers x seq_len x heads x head_dim (PaLM's count, causal mask
    not halved). For a job that trains everything this is PaLM's 6 N + 12 L T H Q."""
    cfg = layout.cfg
    routed = cfg.top_k / cfg.n_experts

    def matmul_params(shapes) -> float:
        total = 0.0
        for name, s in shapes.items():
            if name == EMBED or (name not in COMPUTE_READ and name != ROUTER):
                continue  # the embedding is a lookup; norms and biases are not matmuls
            share = routed if name in EXPERT_TENSORS and name != ROUTER else 1.0
            total += float(np.prod(s.shape)) * share
        return total

    trained = matmul_params(layout.trainable_shapes())
    active = trained + matmul_params(layout.frozen_shapes())
    attention = 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_size
    return 4.0 * active + 2.0 * trained + attention


def parse_profile_steps(value) -> tuple[int, int] | None:
    """config.train.profile_steps: "" (no trace), "A,B" (steps A to B, counted from 1 as
    metrics.jsonl counts them) or "A" (step A alone)."""
    text = str(value or "").strip()
    if not text:
        return None
    parts = text.split(",")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"config.train.profile_steps={value!r}: expected 'FIRST,LAST' (steps "
                         "counted from 1, e.g. '10,12'), one step 'N', or '' for no trace")
    first, last = int(parts[0]), int(parts[-1])
    if not 1 <= first <= last:
        raise ValueError(f"config.train.profile_steps={value!r}: need 1 <= FIRST <= LAST")
    return first, last


class StepProfiler:
    """Traces the steps of config.train.profile_steps into WORKDIR/profile:

        profiler.before(n)   # about to run step n (from 1)
        ... the step ...
        profiler.after(n, outputs)   # waits for `outputs` on the trace's last step
        profiler.close()     # a trace the loop left open (stopped early) is finished
    """

    def __init__(self, workdir: str | pathlib.Path, steps):
        self.window = parse_profile_steps(steps)
        self.directory = pathlib.Path(workdir) / "profile"
        self.active = False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0] and not self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)  # the traced steps' device work, not only dispatch
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if jax.process_index() == 0:
                print(f"profile of steps {self.window[0]}-{self.window[1]} in {self.directory}",
                      flush=True)


def mfu_terms(layout: ParamLayout, seq_len: int, mesh, peak_override: float = 0.0) -> dict:
    """`MetricsLog`'s flops_per_token and peak_flops (all of `mesh`'s devices; None where
    the peak is unknown, e.g. on a CPU without train.peak_tflops)."""
    kind = mesh.devices.flat[0].device_kind
    tflops = peak_tflops(kind, peak_override)
    return {"flops_per_token": model_flops_per_token(layout, seq_len),
            "peak_flops": tflops * 1e12 * mesh.devices.size if tflops else None}
