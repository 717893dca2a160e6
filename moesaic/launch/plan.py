"""What `moesaic plan` computes: a branch job's train step compiled ahead of time, before a
cluster is booked (the command itself: `moesaic.cli.plan`).

    moesaic plan --config moesaic/configs/olmo2_7b.py:source=code --mesh data=1,fsdp=8 --hbm 80GB

The step is lowered and compiled for abstract arguments (`jax.ShapeDtypeStruct`s carrying
the `NamedSharding` of each array on the asked mesh) on fake CPU devices, so nothing the size
of the model is ever allocated. It prints the per-device memory XLA plans (arguments,
outputs, aliased donations, temporaries), the same split counted by hand (trainable and
frozen parameters, optimizer state, batch) and the sharding of every parameter. A plan whose
per-device need exceeds --hbm is refused: exit code 3 and how much it needs.

The job planned is the branch job of `moesaic branch` (config.branch.mode), set up and
compiled by the trainer's own `setup.set_up` (same layout, shardings and donation): the
model of the base upcycled by one expert, trainable = the owner's expert slice, router row and bias;
AdamW state only for those. The base is the model of --base (its meta.json), else the
config's model section with --base-experts experts, by default chosen so that the model
planned is the config's: an MoE config of n experts names the branch model (olmo2_7b's 2 =
public + own, flexolmo_7x7b's 7), so its base has n - 1; a dense config is the base itself
(FlexOlmo's case), its branch has 2. With config.branch.mode=dense the config's model is
trained as is.

Fake devices need XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is
imported (`has_fake_devices`): this module imports no jax at its top, and when jax is already
imported in this process, the command re-runs itself in a fresh interpreter with the flag set.

On CPU XLA's `peak_memory` ignores temporaries; the need reported is argument + output -
alias + temporaries (docs/launch.md, "Planning memory ahead of time").
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
EXIT_DOES_NOT_FIT = 3
REEXEC_MARK = "MOESAIC_PLAN_CHILD"  # set in the re-run in a fresh interpreter


def parse_bytes(text: str) -> int:
    """"80GB" -> 80e9, "16GiB" -> 16 * 2**30, "1024" -> 1024 (GB is decimal, GiB binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--hbm {text!r}: expected a size such as 80GB, 16GiB or 1024")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def parse_mesh(text: str) -> dict[str, int]:
    """"data=1,fsdp=8" -> {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}."""
    mesh = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name not in mesh or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs with sizes >= 1 over "
                             f"the axes {tuple(mesh)}, e.g. data=1,fsdp=8")
        mesh[name] = int(value)
    return mesh


def human(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def default_base_experts(config) -> int:
    """The base's experts that make the model planned the config's own (see the module
    docstring): n - 1 for an MoE config of n, 1 for a dense one; n in dense mode."""
    n = int(config.model.n_experts)
    return n if str(config.branch.mode) == "dense" else max(1, n - 1)


# ---- fake devices ----------------------------------------------------------------------

def fake_device_flags(flags: str, count: int) -> str:
    """XLA_FLAGS `flags` asking for `count` fake CPU devices (any earlier count replaced)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    return f"{flags} --xla_force_host_platform_device_count={count}".strip()


def has_fake_devices(count: int) -> bool:
    """True when jax can give `count` CPU devices here (setting the flag if jax is not
    imported yet); False when this process must re-run itself (`REEXEC_MARK` set in the
    re-run, where too few devices is an error)."""
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = fake_device_flags(os.environ.get("XLA_FLAGS", ""), count)
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    try:
        cpus = jax.devices("cpu")
    except RuntimeError:  # JAX_PLATFORMS names no cpu backend
        cpus = []
    if len(cpus) >= count:
        return True
    if os.environ.get(REEXEC_MARK):
        raise SystemExit(f"moesaic plan: asked for {count} fake CPU devices, got {len(cpus)}")
    return False


# ---- the plan --------------------------------------------------------------------------

class MemoryReport:
    """What every plan reports, for a dataclass with `by_hand`, `xla` and `collectives`."""
    need_note = "argument + output - alias + temp"

    @property
    def needed(self) -> int:
        x = self.xla
        return x["argument"] + x["output"] - x["alias"] + x["temp"]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "needed": self.needed}

    def memory_lines(self, hbm: int | None) -> list[str]:
        """Per-device memory by hand and by XLA, the collectives, and the verdict."""
        from moesaic.launch.collectives import report_lines

        lines = ["per device, counted from the shardings:"]
        lines += [f"  {k:10s} {human(v):>10s}" for k, v in self.by_hand.items()]
        lines += ["per device, planned by XLA:"]
        lines += [f"  {k:10s} {human(v):>10s}" for k, v in self.xla.items()]
        lines += report_lines(self.collectives)
        verdict = f"needs {human(self.needed)} per device ({self.need_note})"
        if hbm is not None:
            verdict += (f"; fits {human(hbm)}" if self.needed <= hbm
                        else f"; does NOT fit {human(hbm)}")
        return [*lines, verdict]


def xla_memory(compiled) -> dict[str, int]:
    """The per-device bytes XLA plans for a compiled program."""
    memory = compiled.memory_analysis()
    return {"argument": int(memory.argument_size_in_bytes),
            "output": int(memory.output_size_in_bytes),
            "alias": int(memory.alias_size_in_bytes), "temp": int(memory.temp_size_in_bytes)}


@dataclasses.dataclass
class Plan(MemoryReport):
    mesh: dict[str, int]
    experts: int  # of the branch model
    base_experts: int  # of the base it upcycles (= experts in dense mode)
    counts: dict[str, int]  # trainable / frozen parameter counts
    by_hand: dict[str, int]  # per-device bytes: trainable, frozen, optimizer, batch
    xla: dict[str, int]  # per-device bytes: argument, output, alias, temp
    parameters: list[dict]  # name, kind, shape, dtype, spec, bytes per device
    compile_seconds: float
    collectives: dict = dataclasses.field(default_factory=dict)  # launch.collectives
    start: dict = dataclasses.field(default_factory=dict)  # launch.plan_start

    @property
    def needed(self) -> int:
        """The job's need per device: its step's, or its start's when that is larger."""
        return max(MemoryReport.needed.fget(self), self.start.get("needed", 0))

    @property
    def need_note(self) -> str:
        if self.start.get("needed", 0) > MemoryReport.needed.fget(self):
            return "the start's, above the step's argument + output - alias + temp"
        return MemoryReport.need_note

    def start_lines(self) -> list[str]:
        if not self.start:
            return []
        parts = ", ".join(f"{k} {human(v)}" for k, v in self.start.items() if k != "needed")
        step = MemoryReport.needed.fget(self)
        return ["", f"start (base loaded, router statistics): {human(self.start['needed'])} "
                f"per device ({parts}); the step: {human(step)}"]

    def report(self, hbm: int | None) -> str:
        base = (f" (a base of {self.base_experts} plus the own)"
                if self.experts > self.base_experts else "")
        lines = [f"branch step on mesh {self.mesh} ({math.prod(self.mesh.values())} devices), "
                 f"{self.experts} experts{base}: {self.counts['trainable']:,} trainable, "
                 f"{self.counts['frozen']:,} frozen parameters "
                 f"(compiled in {self.compile_seconds:.1f} s)", "", "parameters:"]
        for p in self.parameters:
            lines.append(f"  {p['kind']:6s} {p['name']:22s} {str(tuple(p['shape'])):24s} "
                         f"{p['dtype']:8s} {str(tuple(p['spec'])):30s} "
                         f"{human(p['bytes_per_device']):>10s}/device")
        return "\n".join([*lines, *self.start_lines(), "", *self.memory_lines(hbm)])


def per_device_bytes(shape: tuple[int, ...], dtype, sharding) -> int:
    import numpy as np

    return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * \
        np.dtype(dtype).itemsize


def _base_config(config, base: str, base_experts: int):
    """The model config of the base planned: --base's (run the job's way), else the config's
    model section with `base_experts` experts."""
    from moesaic.branch_train import base_model
    from moesaic.model import checkpoint
    from moesaic.model.config import ModelConfig

    if base:
        return base_model.job_model_config(
            checkpoint.model_config(checkpoint.read_meta(base)), config)
    if base_experts < 1:
        raise ValueError(f"--base-experts={base_experts}: must be at least 1 (1: dense)")
    model_cfg = ModelConfig.from_config(config.model)
    return model_cfg.replace(n_experts=base_experts, top_k=min(model_cfg.top_k, base_experts))


def _branch_kind(config) -> str:
    """The job kind `moesaic branch` runs for config.branch.mode."""
    from moesaic.branch_train import kinds

    mode = str(config.branch.mode)
    if mode not in kinds.BRANCH_MODES:
        raise ValueError(f"config.branch.mode={mode!r}: one of {sorted(kinds.BRANCH_MODES)}")
    return kinds.BRANCH_MODES[mode]


def branch_layout(config, *, base: str = "", base_experts: int = 1):
    """The `upcycle.ParamLayout` of the branch job `moesaic branch` would run."""
    from moesaic.branch_train import kinds

    base_cfg = _base_config(config, base, base_experts)
    return kinds.kind_of(_branch_kind(config)).layout(config, base_cfg)


def check_expert_axis(n_experts: int, mesh_shape: dict[str, int]) -> None:
    """An expert axis the model's experts cannot fill (a one-line input error, before the
    fake devices compile anything; `expert_parallel.check_expert_axis`)."""
    from moesaic.configs.expert_axis import check_expert_axis as check

    check(n_experts, int(mesh_shape.get("expert", 1)), "--mesh")


def check_microbatches(config, mesh_shape: dict[str, int]) -> None:
    """config.train.microbatches against the batch and `mesh_shape`, as `setup.set_up` checks
    it (a one-line input error, before the fake devices compile anything)."""
    from moesaic.branch_train import setup

    setup.check_microbatches(config.train.get("microbatches", 1),
                             int(config.data.global_batch), mesh_shape,
                             tuple(tuple(r) for r in config.rules))


def make_plan(config, mesh_shape: dict[str, int], *, base: str = "",
              base_experts: int = 1) -> Plan:
    """Lowers and compiles the branch train step for abstract sharded arguments."""
    import time

    import jax
    import jax.numpy as jnp

    from moesaic.branch_train import setup
    from moesaic.model.sharding import make_mesh

    base_cfg = _base_config(config, base, base_experts)
    devices = math.prod(mesh_shape.values())
    mesh = make_mesh(dict(mesh_shape), devices=jax.devices("cpu")[:devices])
    # The step `moesaic branch` runs, with its shardings and donation.
    sc, step_fn = setup.set_up(config, _branch_kind(config), mesh, base_cfg)
    layout = sc.layout

    def abstract(shapes, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)

    args = (abstract(sc.trainable_shapes, sc.trainable_shardings),
            abstract(sc.opt_shapes, sc.opt_shardings),
            abstract(sc.frozen_shapes, sc.frozen_shardings),
            jax.ShapeDtypeStruct(sc.batch_shape, jnp.int32, sharding=sc.batch_sharding),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=sc.replicated))
    start = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    seconds = time.perf_counter() - start

    def total(tree) -> int:
        return sum(per_device_bytes(a.shape, a.dtype, a.sharding) for a in jax.tree.leaves(tree))

    by_hand = {"trainable": total(args[0]), "frozen": total(args[2]),
               "optimizer": total(args[1]), "batch": total(args[3]) + total(args[4])}
    xla = xla_memory(compiled)
    parameters = [  # a frozen tensor held quantized: its codes' spec, codes and scales' bytes
        {"name": name, "kind": kind, "shape": list(a.shape),
         "dtype": getattr(a, "kind", None) or str(a.dtype),
         "spec": [s if s is None or isinstance(s, str) else list(s)
                  for s in jax.tree.leaves(a)[0].sharding.spec],
         "bytes_per_device": total(a)}
        for kind, tree in (("train", args[0]), ("frozen", args[2]))
        for name, a in tree.items()]
    from moesaic.launch.collectives import collective_bytes
    from moesaic.launch.plan_start import start_memory

    return Plan(dict(mesh_shape), layout.cfg.n_experts,
                layout.base_experts or layout.cfg.n_experts, layout.counts(), by_hand, xla,
                parameters, seconds, collective_bytes(compiled.as_text()),
                start_memory(sc, base_cfg))
