"""Fine-grained experts: every FFN expert of a merge as m sub-experts of width F/m
(`moesaic merge --fine-grained M`, docs/low-rank.md).

A SwiGLU FFN is a sum over its F hidden units, FFN(x) = sum_h silu(x.g_h) (x.u_h) d_h (g_h, u_h
columns of w_gate, w_up; d_h a row of w_down). Splitting the hidden units into m groups of F/m
gives m sub-FFNs whose sum is the FFN exactly. Each unit of the merge (the base's experts, then
every party, in slot order) becomes m consecutive slots. Its hidden units are grouped by the
direction of their gate columns (a balanced spherical k-means, `group`), so each sub-expert is
a coherent piece; the grouping is recorded per unit and layer as `split/<source>/order`, a
permutation of the F units, group after group, so `remove` and `add` rebuild each unit's FFN
bit for bit and run the same merge.

Routing: the router is built over the units as for an unsplit merge; sub-expert j of unit u
gets u's row plus, for a party, `scale` times the mean of its group's gate columns minus the
mean of all of u's gate columns (derived from the weights alone: x times it is the group's mean
gate pre-activation above the unit's mean; the base's experts keep their rows, so the public
FFN is taken whole or not at all), and u's bias (0 for the public expert's sub-experts,
whose bias the model holds at 0 as it does the public expert's). The model takes top-(k*m)
over the pool and multiplies the weights by m (`model.expert_split`). With scale 0 the m
sub-experts of a unit tie, each gets p_u / m of the softmax, so the top k*m are the top k
units' sub-experts and the output is sum_u p_u FFN_u(x): the unsplit merge.
"""

from __future__ import annotations

import pathlib

import numpy as np

from moesaic.merge import sources as src
from moesaic.merge.sources import Base, MergeRefused, Party, View
from moesaic.model import checkpoint, streaming
from moesaic.model.config import ModelConfig
from moesaic.model.names import (
    BIAS,
    FFN_EXPERT,
    ROUTER,
    STAT_NAMES,
    W_DOWN,
    W_GATE,
    rows_name,
    stat_name,
)

ITERATIONS = 8  # k-means rounds at most (stops when the groups no longer change)


def order_name(source: str) -> str:
    return f"split/{source}/order"


def check(base: Base, parties: list[Party], m: int, *, low_rank_to, calibration) -> None:
    """Refuses, before anything is read or written, a split the merge cannot make."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise MergeRefused(f"--fine-grained {m!r}: the sub-experts per expert must be a whole "
                           f"number of at least 1")
    f = base.cfg.d_ff
    if f % m:
        raise MergeRefused(f"--fine-grained {m}: tensor {W_GATE!r} of the base {base.path} has "
                           f"FFN width {f} (model.d_ff), which {m} does not divide; "
                           f"sub-experts need equal widths (divisors of {f})")
    low = [p.source for p in parties if p.low_rank]
    if low or low_rank_to:
        raise MergeRefused(f"--fine-grained {m}: splits FFN experts only; "
                           + (f"parties {low} are low-rank" if low else "not with --low-rank"))
    if calibration is not None:
        raise MergeRefused(f"--fine-grained {m}: not with --calibrate (its party gate mixes "
                           f"one expert slot per party)")


def balanced(score: np.ndarray, size: int) -> np.ndarray:
    """Each row (hidden unit) to a column (group), at most `size` per group: units with the
    clearest best group choose first, each its best group with room."""
    assign = np.empty(score.shape[0], np.int64)
    room = np.full(score.shape[1], size)
    prefs = np.argsort(-score, axis=1, kind="stable")
    for unit in np.argsort(-score.max(axis=1), kind="stable"):
        j = next(j for j in prefs[unit] if room[j])
        assign[unit], room[j] = j, room[j] - 1
    return assign


def group(gate_df: np.ndarray, m: int) -> np.ndarray:
    """A permutation of the F hidden units of gate (D, F), its m groups of F/m one after the
    other (each in ascending unit order): units whose gate columns point alike share a group.
    Starts from the order along the columns' top principal direction, then balanced
    spherical k-means on the unit-normalised columns."""
    f = gate_df.shape[1]
    if m == 1:
        return np.arange(f, dtype=np.int32)
    g = gate_df.T.astype(np.float64)
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
    centred = g - g.mean(axis=0)
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    v = v if v[np.argmax(np.abs(v))] > 0 else -v  # fixed sign: the same groups on any LAPACK
    size = f // m
    assign = np.empty(f, np.int64)
    assign[np.argsort(centred @ v, kind="stable")] = np.repeat(np.arange(m), size)
    for _ in range(ITERATIONS):
        centres = np.stack([g[assign == j].mean(axis=0) for j in range(m)])
        centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-30)
        new = balanced(g @ centres.T, size)
        if np.array_equal(new, assign):
            break
        assign = new
    return np.concatenate([np.flatnonzero(assign == j) for j in range(m)]).astype(np.int32)


class Units:
    """The units of a merge (base experts, then parties) and their groupings, for one split."""

    def __init__(self, base: Base, parties: list[Party], m: int, scale: float):
        self.m, self.scale, self.base_units = m, float(scale), base.n_experts
        self.names = base.expert_names() + [p.source for p in parties]
        # (view, expert index within it) for each unit's FFN tensors
        self.ffn = {name: [(base.tensors[name], e) for e in range(base.n_experts)]
                    + [(p.own[name], 0) for p in parties] for name in FFN_EXPERT}
        lyr = base.cfg.n_layers
        self.orders = np.zeros((len(self.names), lyr, base.cfg.d_ff), np.int32)
        self.centres = np.zeros((len(self.names), lyr, m, base.cfg.d_model), np.float64)
        for u, (view, e) in enumerate(self.ffn[W_GATE]):
            for layer in range(lyr):
                gate = view.rows(layer, layer + 1)[0, e].astype(np.float64)  # (D, F)
                order = group(gate, m)
                self.orders[u, layer] = order
                means = gate[:, order].reshape(gate.shape[0], m, -1).mean(axis=2).T  # (m, D)
                self.centres[u, layer] = means - gate.mean(axis=1)

    def rows(self, rows: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit rows (L, U, D) and biases (L, U) as sub-expert ones (L, U*m, D), (L, U*m)."""
        sub = np.repeat(rows, self.m, axis=1)
        if self.scale:
            delta = self.scale * self.centres.transpose(1, 0, 2, 3)  # (L, U, m, D)
            delta[:, :self.base_units] = 0  # the public expert is taken whole or not at all
            delta = delta.reshape(sub.shape)
            sub = (sub.astype(np.float64) + delta).astype(rows.dtype)
        sub_bias = np.repeat(bias, self.m, axis=1)
        sub_bias[:, :self.m] = 0  # the public expert's: held at 0 by the model (slot 0 only)
        return sub, sub_bias

    def split(self, name: str) -> streaming.TensorSource:
        """FFN tensor `name` as (L, U*m, ...) sub-experts, a layer at a time."""
        views = self.ffn[name]
        first = views[0][0]
        lyr, _, a, b = first.shape
        hidden = 2 if name == W_DOWN else 3  # the F axis of (L, E, F, D) / (L, E, D, F)
        shape = [lyr, len(views) * self.m, a, b]
        shape[hidden] //= self.m

        def pieces():
            for layer in range(lyr):
                subs = []
                for u, (view, e) in enumerate(views):
                    w = np.take(view.rows(layer, layer + 1)[0, e], self.orders[u, layer],
                                axis=hidden - 2)
                    subs += np.split(w, self.m, axis=hidden - 2)
                yield np.stack(subs)[None]

        return streaming.TensorSource(tuple(shape), first.dtype, pieces, rows_per_chunk=1)

    def tensors(self) -> dict[str, streaming.TensorSource]:
        out = {name: self.split(name) for name in FFN_EXPERT}
        for u, source in enumerate(self.names):
            order = self.orders[u]
            out[order_name(source)] = streaming.TensorSource(order.shape, order.dtype,
                                                             lambda o=order: [o])
        return out

    def experts(self, unit_experts: list[dict]) -> list[dict]:
        """The merged meta's experts, one per slot: the unit's entry on its first sub-expert,
        its source and piece on the others."""
        return [dict(e, piece=0) if j == 0 else {"source": e["source"], "piece": j}
                for e in unit_experts for j in range(self.m)]

    def config(self, cfg: ModelConfig) -> ModelConfig:
        return cfg.replace(n_experts=cfg.n_experts * self.m, top_k=cfg.top_k * self.m,
                           d_ff=cfg.d_ff // self.m, expert_split=self.m)

    def record(self) -> dict:
        return {"fine_grained": {"m": self.m, "scale": self.scale}}


# ---- from a fine-grained merged checkpoint ---------------------------------------------------

class Joined(View):
    """Experts of a fine-grained merged tensor put back together: unit u from its m slots
    [first, first + m) and its recorded order. A `sources.View` of (L, units, ...) whose rows
    are reassembled (its reading in pieces and as a streaming source are View's)."""

    def __init__(self, path, name: str, units: list[tuple[int, str]], m: int):
        super().__init__(path, name)
        self.m = m
        self.units = [(first, checkpoint.TensorReader(path, order)) for first, order in units]
        self.hidden = 2 if name == W_DOWN else 3
        shape = list(self.reader.shape)
        shape[1], shape[self.hidden] = len(units), shape[self.hidden] * m
        self.shape = tuple(shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        for u, (first, order) in enumerate(self.units):
            subs = self.reader[start:stop, first:first + self.m]  # (l, m, ...)
            permuted = np.concatenate(list(np.moveaxis(subs, 1, 0)), axis=self.hidden - 1)
            ranks = order[start:stop]
            for i in range(stop - start):
                unit = np.empty_like(permuted[i])
                index = [slice(None)] * unit.ndim
                index[self.hidden - 2] = ranks[i]
                unit[tuple(index)] = permuted[i]
                out[i, u] = unit
        return out


def parties_of_merged(path) -> tuple[Base, list[Party], dict]:
    """`sources.parties_of_merged`, also for a fine-grained merged checkpoint: each unit's FFN
    put back together from its sub-experts and recorded order, bit for bit."""
    path = pathlib.Path(path)
    meta = src.committed_meta(path, "merged checkpoint")
    record = (meta.get("merge") or {}).get("fine_grained")
    if meta.get("kind") != "merged" or not record:
        return src.parties_of_merged(path)
    base = src.base_of_merged(path, meta)
    m = int(record["m"])
    units = [e for e in meta["experts"] if e.get("piece", 0) == 0]
    eb = base.n_experts
    for name in FFN_EXPERT:
        base.tensors[name] = Joined(path, name, [(u * m, order_name(units[u]["source"]))
                                                 for u in range(eb)], m)
    parties = []
    for u, expert in enumerate(units[eb:], start=eb):
        source = expert["source"]
        own = {n: Joined(path, n, [(u * m, order_name(source))], m) for n in FFN_EXPERT}
        own[ROUTER] = View(path, rows_name(source, ROUTER))
        own[BIAS] = View(path, rows_name(source, BIAS))
        stats = {s: View(path, stat_name(s, source)) for s in STAT_NAMES}
        parties.append(Party(source, path, expert["branch_meta"], own, stats,
                             src.party_ngram(path, source)))
    return base, parties, meta


def options_of_merged(meta: dict) -> dict:
    """The merge's `fine_grained_to` and `fine_grained_scale` keyword arguments, as recorded."""
    record = (meta.get("merge") or {}).get("fine_grained")
    if not record:
        return {}
    return {"fine_grained_to": int(record["m"]), "fine_grained_scale": float(record["scale"])}

