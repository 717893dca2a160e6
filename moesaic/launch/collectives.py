"""The bytes each collective of a compiled program moves per step, read from its HLO text
(`jax.stages.Compiled.as_text()`, after SPMD partitioning: every shape is one device's).

    totals = collective_bytes(compiled.as_text())
    # {"all-gather": {"count": 96, "operand": 1.2e9, "result": 9.9e9}, "all-to-all": {...}}

For each collective instruction (all-gather, all-reduce, reduce-scatter, all-to-all,
collective-permute, their async -start forms, ragged-all-to-all) the bytes of its operands
and of its result on one device are summed, times the number of times it runs per step: an
instruction inside a `while` body (the scan over layers, the scan over microbatches) counts
its loop's trip count (XLA's `known_trip_count`, nested loops multiplied). A loop without one
counts once and is reported (`unknown_trip_counts`). `count` is executions per step.

Which collective dominates says how a mesh splits the work: FSDP and a replicated expert
dimension gather weights (all-gather results the size of the parameters), expert
parallelism with an explicit dispatch sends tokens (all-to-all operands the size of the routed
activations), data parallelism reduces gradients (all-reduce or reduce-scatter).
"""

from __future__ import annotations

import re
from collections import defaultdict

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
         "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COMMENT = re.compile(r"/\*.*?\*/")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, a tuple's elements summed ("f32[8,16]{1,0}" -> 512)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _DTYPE_BYTES:
            if dtype.startswith("f8") or dtype.startswith("s2") or dtype.startswith("u2"):
                size = 1
            else:
                continue
        else:
            size = _DTYPE_BYTES[dtype]
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * size
    return total


def _close(text: str, depth: int = 0) -> int:
    """The index just past the parenthesis that brings `depth` back to 0 (the text starts at
    that depth)."""
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return i + 1
    return len(text)


def _split_instruction(line: str):
    """(name, result shape, opcode, operand text, rest) of `%x = SHAPE op(args), ...`."""
    name, sep, rhs = line.strip().partition(" = ")
    if not sep:
        return None
    rhs = rhs.strip()
    if rhs.startswith("("):  # a tuple shape: up to its matching parenthesis
        end = _close(rhs)
        shape, rest = rhs[:end], rhs[end:].lstrip()
    else:
        shape, _, rest = rhs.partition(" ")
    opcode, paren, tail = rest.partition("(")
    if not paren:
        return None
    end = _close(tail, 1)
    return name.removeprefix("ROOT ").lstrip("%"), shape, opcode.strip(), tail[:end - 1], \
        tail[end:]


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def collective_bytes(text: str) -> dict:
    """{kind: {"count", "operand", "result"}} per device and step, plus "unknown_trip_counts"
    (loops that ran an unknown number of times, counted once)."""
    comps, entry = _computations(text)
    totals: dict = defaultdict(lambda: {"count": 0, "operand": 0, "result": 0})
    unknown = [0]

    def walk(comp: str, times: int, depth: int = 0):
        if comp not in comps or depth > 64:
            return
        sizes: dict[str, int] = {}
        for line in comps[comp]:
            parts = _split_instruction(_COMMENT.sub("", line))
            if parts is None:
                continue
            name, shape, opcode, operands, rest = parts
            sizes[name] = shape_bytes(shape)
            kind = opcode.removesuffix("-start")
            if kind in KINDS and not opcode.endswith("-done"):
                operand = sum(sizes.get(o.strip().split()[-1].lstrip("%"), 0)
                              for o in operands.split(",") if o.strip())
                result = sizes[name] if not opcode.endswith("-start") else operand
                totals[kind]["count"] += times
                totals[kind]["operand"] += times * operand
                totals[kind]["result"] += times * result
            trip = _TRIP.search(rest)
            for role, callee in _CALLS.findall(rest):
                if role == "body":
                    if trip is None:
                        unknown[0] += 1
                    walk(callee, times * (int(trip.group(1)) if trip else 1), depth + 1)
                elif role == "calls":
                    walk(callee, times, depth + 1)
            for group in _BRANCHES.findall(rest):
                for callee in group.split(","):
                    walk(callee.strip().lstrip("%"), times, depth + 1)

    walk(entry, 1)
    out = {k: dict(v) for k, v in sorted(totals.items())}
    out["unknown_trip_counts"] = unknown[0]
    return out


def report_lines(totals: dict) -> list[str]:
    """The collectives as lines of a plan's report."""
    kinds = [k for k in totals if k != "unknown_trip_counts"]
    if not kinds:
        return ["collectives per step, per device: none"]
    lines = ["collectives per step, per device (from the compiled HLO):"]
    for kind in kinds:
        t = totals[kind]
        lines.append(f"  {kind:20s} {t['count']:6d}x  operands {t['operand'] / 1e9:9.3f} GB  "
                     f"results {t['result'] / 1e9:9.3f} GB")
    if totals.get("unknown_trip_counts"):
        lines.append(f"  ({totals['unknown_trip_counts']} loop(s) without a known trip count "
                     "counted once)")
    return lines
