"""What a merge reads: the base and the parties, as views on stored tensors, never loaded whole.

A `View` is a stored tensor (or an expert slice of one) read a block of layers at a time
along axis 0, so a merge of tensors larger than memory holds one layer of one tensor at once.

The base and each party can come from two places, read the same way:
  - a base checkpoint and branch artifacts (moesaic.branch_train.artifact), for a fresh merge;
  - a merged checkpoint, which keeps every input it was built from (the base's experts as
    its first experts, each party's expert slot, learned rows under rows/<source>/ and
    statistics under stats/<source>/), for `remove` and `add`.
So remove/add re-run the very same merge on the same values, which is why they reproduce a
merge made at once bit for bit.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

from moesaic.branch_train import artifact
from moesaic.model import checkpoint, fingerprint, lora, streaming
from moesaic.model.config import ModelConfig
from moesaic.model.names import (
    BIAS,
    FFN_EXPERT,
    NGRAM_NAMES,
    ROUTER,
    STAT_NAMES,
    ngram_name,
    rows_name,
    stat_name,
)

PUBLIC = "public"
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PIECE_BYTES = 64 << 20  # rows read per block of a tensor without a layer axis


class View:
    """A stored tensor, optionally restricted to experts [lo, hi) of axis 1.

    `scans` {algorithm: (tensor hash, first NaN/Inf index or None)} records what verifying
    it found, so it is read for that once. While `tap(algorithm)` is set, the rows read in
    order from row 0 (the merge's writer streaming this view out) are hashed and scanned on
    the way, and `scans` gets the result when the last row has been read: verification and
    the write share one read (moesaic.merge.verify). `deferred`: its check waits for that."""

    def __init__(self, path: str | pathlib.Path, name: str, experts: tuple[int, int] | None = None):
        self.reader = checkpoint.TensorReader(path, name)
        self.path, self.name, self.experts = pathlib.Path(path), name, experts
        shape = list(self.reader.shape)
        if experts is not None:
            shape[1] = experts[1] - experts[0]
        self.shape, self.dtype = tuple(shape), self.reader.dtype
        self.scans: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        self.deferred = False
        self._tap: tuple[str, fingerprint.Scan] | None = None

    def tap(self, algorithm: str) -> None:
        """Hash and scan the rows read from now on, when read in order from row 0."""
        if self.shape and algorithm not in self.scans:
            self._tap = (algorithm, fingerprint.Scan(self.dtype, self.shape, algorithm))

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.experts is None:
            block = self.reader[start:stop]
        else:
            block = self.reader[start:stop, self.experts[0]:self.experts[1]]
        if self._tap is not None and start == self._tap[1].start and len(block):
            algorithm, running = self._tap
            running.update(block)
            if running.start >= self.shape[0]:
                self.scans[algorithm], self._tap = running.result(), None
        return block

    def read(self) -> np.ndarray:
        if not self.shape:
            return self.reader.read()
        return self.rows(0, self.shape[0])

    def row_block(self) -> int:
        """Rows per piece: as many as fit in PIECE_BYTES, at least one (for a stacked tensor
        whose layer is larger than that, one layer)."""
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        return max(1, min(self.shape[0], PIECE_BYTES // max(row_bytes, 1)))

    def pieces(self):
        """Blocks of `row_block` rows in order. A tensor stored as one chunk is decoded once
        and sliced (reading it by rows would decode the whole chunk for every block)."""
        if not self.shape:
            yield self.read()
            return
        step = self.row_block()
        whole = self.read() if self.reader.rows_per_chunk >= self.shape[0] > step else None
        for start in range(0, self.shape[0], step):
            stop = min(start + step, self.shape[0])
            yield whole[start:stop] if whole is not None else self.rows(start, stop)

    def source(self) -> streaming.TensorSource:
        """This tensor as a streaming-write source (chunks of `row_block` rows)."""
        return streaming.TensorSource(self.shape, self.dtype, self.pieces,
                               rows_per_chunk=self.row_block() if self.shape else None)

    def __repr__(self) -> str:
        return f"{self.path}:{self.name}"


def stack_experts(views: list[View]) -> streaming.TensorSource:
    """The tensors concatenated along the expert axis (1), produced one layer of one view at
    a time and stored in chunks of one layer of one expert: what is held does not grow with
    the number of experts."""
    shape = list(views[0].shape)
    shape[1] = sum(v.shape[1] for v in views)

    def pieces():
        for layer in range(shape[0]):
            for view in views:
                yield view.rows(layer, layer + 1)

    return streaming.TensorSource(tuple(shape), views[0].dtype, pieces, rows_per_chunk=1,
                                  cols_per_chunk=1)


@dataclasses.dataclass
class Base:
    """The public model every party started from."""

    path: pathlib.Path
    cfg: ModelConfig
    fingerprint: str  # as recorded; verified against the tensors by `verify`
    tensors: dict[str, View]  # every base parameter
    origin: str  # "checkpoint" or "merged"
    hash: str = checkpoint.LEGACY_HASH  # the tensor hash its fingerprint is over

    @property
    def n_experts(self) -> int:
        return self.cfg.n_experts

    def expert_names(self) -> list[str]:
        """Names of the base's experts in the merged model: public, or public_0.. ."""
        if self.n_experts == 1:
            return [PUBLIC]
        return [f"{PUBLIC}_{j}" for j in range(self.n_experts)]


@dataclasses.dataclass
class Party:
    """One party's contribution: its expert, its learned router row and bias, its stats."""

    source: str
    path: pathlib.Path
    meta: dict  # the branch artifact's meta (kept in the merged checkpoint's meta)
    own: dict[str, View]  # EXPERT_TENSORS (low-rank: A, B, row, bias), expert axis of size 1
    stats: dict[str, View]  # STAT_NAMES -> (L, D) / (L, D, D)
    ngram: dict[str, View] | None = None  # NGRAM_NAMES -> its bigram counts, when it has them

    @property
    def stats_tokens(self) -> int:
        return int(self.meta.get("stats_tokens", 0))

    @property
    def low_rank(self) -> bool:
        """A low-rank expert (`moesaic.model.lora`): its own tensors are A and B of each
        target, not an FFN."""
        return bool((self.meta.get("model") or {}).get("lora_experts"))

    @property
    def router_input(self) -> str:
        """What the party's router row scores (the branch model's model.router_input)."""
        return str(self.meta.get("model", {}).get("router_input", "token"))


@dataclasses.dataclass
class PublicStats:
    """Router statistics of public data (for the public expert's centroid / ridge class)."""

    path: pathlib.Path
    stats: dict[str, View]
    tokens: int
    router_input: str = "token"  # the router input the sums are of (model.router_input)
    fingerprint: str | None = None  # as recorded, when it covers only these three tensors
    base_fingerprint: str | None = None  # the model they were computed under, when recorded
    hash: str = checkpoint.LEGACY_HASH  # the tensor hash `fingerprint` is over


# ---- from a base checkpoint and branch artifacts ------------------------------------------

def seq_len_record(metas) -> dict:
    """{"config": {"data": {"seq_len": L}}} for a merged model's meta when its inputs agree on
    L (what `moesaic eval` and `tune-router` read for their default --seq-len), else {}."""
    length = checkpoint.trained_seq_len(metas)
    return {} if length is None else {"config": {"data": {"seq_len": length}}}


def uncommitted_reason(path: pathlib.Path) -> str | None:
    partial = path.with_name(path.name + ".partial")
    if not path.exists():
        aside = checkpoint.aside_path(path)
        if aside.exists():
            return f"{path} does not exist: an overwrite of it was interrupted (the previous " \
                   f"checkpoint is in {aside.name}, the new one in {partial.name})"
        if partial.exists():
            return f"{path} was never committed (only {partial.name} exists: the job that " \
                   f"wrote it did not finish)"
        return f"{path} does not exist"
    if not checkpoint.is_complete(path):
        hint = checkpoint.inner_checkpoint_hint(path)
        if hint:  # a finished job's workdir, one level above its output
            return f"{path} is not a checkpoint but holds one{hint}"
        return f"{path} is not a committed checkpoint (no {checkpoint.META} or " \
               f"{checkpoint.PARAMS}/): the job that wrote it did not finish"
    return None


def committed_meta(path: pathlib.Path, label: str) -> dict:
    """The meta of a committed checkpoint, or MergeRefused naming `label`."""
    reason = uncommitted_reason(path)
    if reason:
        raise MergeRefused(f"{label}: {reason}")
    return checkpoint.read_meta(path)


def open_base(path: str | pathlib.Path) -> Base:
    path = pathlib.Path(path)
    meta = committed_meta(path, "base")
    if "model" not in meta:
        raise MergeRefused(f"base {path}: a {meta.get('kind')!r} checkpoint, not a model")
    if meta.get("kind") == "merged":
        raise MergeRefused(f"base {path}: a merged checkpoint; a merge over it would keep only "
                           f"its base and drop its parties {merged_parties(meta)}. To add a "
                           f"party: moesaic merge add {path} --branch B --out OUT; to merge "
                           f"afresh, pass the public base its parties started from")
    stored = checkpoint.tensor_metadata(path)
    return Base(path, checkpoint.model_config(meta), meta["fingerprint"],
                {n: View(path, n) for n in stored}, "checkpoint", checkpoint.hash_algorithm(meta))


def open_branch(path: str | pathlib.Path) -> Party:
    path = pathlib.Path(path)
    meta = committed_meta(path, f"branch {path}")
    if meta.get("kind") != artifact.KIND:
        raise MergeRefused(f"branch {path}: a {meta.get('kind')!r} checkpoint, not a branch "
                           f"artifact (kind {artifact.KIND!r})")
    missing = [k for k in artifact.REQUIRED_META if k not in meta]
    stored = checkpoint.tensor_metadata(path)
    own_names = artifact.own_tensor_names(meta)
    missing += [n for n in (*own_names, *artifact.STATS) if n not in stored]
    if missing:
        raise MergeRefused(f"branch {path}: incomplete artifact, missing {missing}")
    source = str(meta["source"])
    if not SOURCE_NAME.match(source) or source.startswith(PUBLIC):
        raise MergeRefused(f"branch {path}: source name {source!r} is not usable (letters, "
                           f"digits, _ . -; not starting with {PUBLIC!r})")
    own = {n: View(path, n) for n in own_names}
    stats = {s: View(path, stat_name(s)) for s in STAT_NAMES}
    return Party(source, path, meta, own, stats, party_ngram(path, None, stored))


def party_ngram(path: pathlib.Path, source: str | None, stored=None) -> dict[str, View] | None:
    """A party's bigram counts (`moesaic.routing.ngram`) in a branch artifact (source None)
    or a merged checkpoint, or None when it has none."""
    stored = checkpoint.tensor_metadata(path) if stored is None else stored
    found = {s: ngram_name(s, source) for s in NGRAM_NAMES}
    if not all(name in stored for name in found.values()):
        return None
    return {s: View(path, name) for s, name in found.items()}


def open_public_stats(path: str | pathlib.Path) -> PublicStats:
    """A checkpoint holding stats/{x_sum,xtx,mean_hidden} of public data (for instance a
    branch artifact's layout, or `moesaic.routing.stats` output saved with checkpoint.save) and
    meta "stats_tokens"."""
    path = pathlib.Path(path)
    meta = committed_meta(path, "public stats")
    stored = checkpoint.tensor_metadata(path)
    missing = [stat_name(s) for s in STAT_NAMES if stat_name(s) not in stored]
    if missing:
        raise MergeRefused(f"public stats {path}: missing {missing}")
    only_stats = set(stored) == {stat_name(s) for s in STAT_NAMES}
    # `moesaic merge --public-data` records the router input at the top; a branch artifact
    # in its model config; a stats checkpoint that records neither is of the token itself.
    kind = meta.get("router_input") or (meta.get("model") or {}).get("router_input", "token")
    return PublicStats(path, {s: View(path, stat_name(s)) for s in STAT_NAMES},
                       int(meta.get("stats_tokens", 0)), str(kind),
                       meta.get("fingerprint") if only_stats else None,
                       meta.get("base_fingerprint"), checkpoint.hash_algorithm(meta))


# ---- from a merged checkpoint ---------------------------------------------------------------

def merged_parties(meta: dict) -> list[str]:
    return [e["source"] for e in meta.get("experts", []) if not e["source"].startswith(PUBLIC)]


def base_of_merged(path: pathlib.Path, meta: dict) -> Base:
    """The base a merged checkpoint was built from: its shared tensors, its first experts,
    and (for an MoE base) the base router rows kept under rows/public/."""
    merge = meta["merge"]
    cfg = ModelConfig.from_config(merge["base_model"])
    stored = checkpoint.tensor_metadata(path)
    tensors = {}
    for name in merge["base_tensors"]:
        if name in FFN_EXPERT:
            tensors[name] = View(path, name, (0, cfg.n_experts))
        elif name in (ROUTER, BIAS):
            tensors[name] = View(path, rows_name(PUBLIC, name))
        elif name in stored:
            tensors[name] = View(path, name)
        else:
            raise MergeRefused(f"merged checkpoint {path}: base tensor {name!r} missing")
    return Base(path, cfg, meta["base_fingerprint"], tensors, "merged",
                checkpoint.hash_algorithm({"hash": merge.get("base_hash",
                                                             checkpoint.LEGACY_HASH)}))


def parties_of_merged(path: str | pathlib.Path) -> tuple[Base, list[Party], dict]:
    """(base, parties, meta) of a merged checkpoint: everything needed to merge again."""
    path = pathlib.Path(path)
    meta = committed_meta(path, "merged checkpoint")
    if meta.get("kind") != "merged":
        raise MergeRefused(f"{path}: a {meta.get('kind')!r} checkpoint, not a merged one")
    base = base_of_merged(path, meta)
    stored = checkpoint.tensor_metadata(path)
    parties = []
    ffn_slots = meta["model"]["n_experts"] - meta["model"].get("lora_experts", 0)
    for slot, expert in enumerate(meta["experts"]):
        if expert["source"].startswith(PUBLIC):
            continue
        source = expert["source"]
        if slot >= ffn_slots:  # a low-rank expert: its A and B at slot - ffn_slots
            lr = slot - ffn_slots
            targets = expert["branch_meta"]["model"]["lora_targets"]
            own = {n: View(path, n, (lr, lr + 1)) for n in lora.tensor_names(targets)}
        else:
            own = {n: View(path, n, (slot, slot + 1)) for n in FFN_EXPERT}
        own[ROUTER] = View(path, rows_name(source, ROUTER))
        own[BIAS] = View(path, rows_name(source, BIAS))
        stats = {s: View(path, stat_name(s, source)) for s in STAT_NAMES}
        parties.append(Party(source, path, expert["branch_meta"], own, stats,
                             party_ngram(path, source, stored)))
    return base, parties, meta


def public_stats_of_merged(path: str | pathlib.Path, meta: dict) -> PublicStats | None:
    if not meta["merge"].get("public_stats"):
        return None
    return PublicStats(pathlib.Path(path),
                       {s: View(path, stat_name(s, PUBLIC)) for s in STAT_NAMES},
                       int(meta["merge"]["public_stats_tokens"]),
                       str(meta["model"].get("router_input", "token")),
                       meta["merge"].get("public_stats_fingerprint"),
                       hash=checkpoint.hash_algorithm(
                           {"hash": meta["merge"].get("public_stats_hash",
                                                      checkpoint.LEGACY_HASH)}))


class MergeRefused(Exception):
    """A merge input failed verification; nothing was written."""
