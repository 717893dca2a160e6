"""Checks every merge input before anything is written (docs/design.md, contracts 2 and 9).

A merge refuses (raises `MergeRefused`, naming the branch and the tensor) when:
  - a checkpoint is not committed (a `.partial` folder, no meta);
  - two parties share a source name;
  - a branch started from another base (its base_fingerprint is not the base's);
  - the base's tensors no longer match its recorded fingerprint;
  - a tensor the branch held frozen differs from the base's (its frozen_hashes entry), or a
    base tensor is missing from frozen_hashes (the branch trained it: its expert was fit to
    a shared tensor the merged model will not have);
  - a tensor's shape or dtype does not fit the base;
  - a tensor holds NaN or Inf;
  - a party's expert, row, bias and statistics no longer match the fingerprint the branch
    job recorded (in its artifact, or in the merged checkpoint `remove`/`add` read it from),
    or the public statistics of a merged checkpoint no longer match theirs.
Everything is read a layer at a time, once: the finiteness scan also hashes. A merge runs
`verify` twice: first before writing, with the tensors it streams into the output marked
`deferred` (their hashes are None, and checks that need them wait), then again before the
output is committed, when the writer's read of those tensors has hashed and scanned them
(`View.tap`) and every other hash is the one recorded the first time: one read of each input,
and a merge that fails the second pass removes what it wrote (streaming.save_streaming's
`before_commit`).
"""

from __future__ import annotations

import numpy as np

from moesaic.merge import low_rank
from moesaic.merge.sources import Base, MergeRefused, Party, PublicStats
from moesaic.model import checkpoint, host_memory
from moesaic.model.names import BIAS, FFN_EXPERT, ROUTER, STAT_NAMES, ngram_name, stat_name
from moesaic.routing import ngram


def base_hashes(base: Base) -> dict[str, str]:
    """Per-tensor hashes of the base, checked against its recorded fingerprint."""
    label = f"base {base.path}" + (" (the base inside this merged model)"
                                   if base.origin == "merged" else "")
    hashes = {name: scan(label, view, cause="a model with non-finite weights cannot be merged "
                                            "from", algorithm=base.hash)
              for name, view in sorted(base.tensors.items())}
    if None not in hashes.values() and checkpoint.fingerprint_of_hashes(
            hashes) != base.fingerprint:
        raise MergeRefused(f"{label}: its tensors do not match its recorded "
                           f"fingerprint {base.fingerprint[:12]}...; the checkpoint was "
                           f"modified after it was written")
    return hashes


def _expected_frozen_hash(base: Base, hashes: dict[str, str], name: str, party: Party,
                          algorithm: str):
    if name in hashes:
        return hashes[name]
    if name in (ROUTER, BIAS) and name not in base.tensors:
        # a base without a router (dense) or without bias: the branch froze zeros there
        own = party.own[name]
        shape = (own.shape[0], base.n_experts, *own.shape[2:])
        return checkpoint.tensor_hash(np.zeros(shape, own.dtype), algorithm)
    return None


def check_unique(sources: list[str]) -> None:
    seen = set()
    for source in sources:
        if source in seen:
            raise MergeRefused(f"source {source!r} appears twice; every party's source name "
                               f"must be unique (rename one branch's source or drop it)")
        seen.add(source)


def scan(label: str, view, cause: str = "the job that wrote it diverged",
         algorithm: str = checkpoint.HASH) -> str | None:
    """`checkpoint.tensor_hash` of a stored view, refusing NaN or Inf on the way (one read for
    both, recorded in `view.scans`); None for a `deferred` view not read yet."""
    scans = getattr(view, "scans", {})
    if algorithm not in scans:
        if getattr(view, "deferred", False):
            return None
        scans[algorithm] = checkpoint.scan(view.dtype, view.shape, view.pieces(), algorithm)
        host_memory.release_freed()  # its pieces, freed on tensorstore's threads
    digest, bad = scans[algorithm]
    if bad is not None:
        raise MergeRefused(f"{label}: tensor {view.name!r} holds NaN or Inf (first at index "
                           f"{bad}); {cause}")
    return digest


def _check_shape(label: str, name: str, got, want_shape, want_dtype=None,
                 why: str = "the branch was trained from a model of another shape") -> None:
    if tuple(got.shape) != tuple(want_shape):
        raise MergeRefused(f"{label}: tensor {name!r} has shape {tuple(got.shape)}, the base "
                           f"needs {tuple(want_shape)} ({why})")
    if want_dtype is not None and np.dtype(got.dtype) != np.dtype(want_dtype):
        raise MergeRefused(f"{label}: tensor {name!r} has dtype {got.dtype}, the base has "
                           f"{want_dtype}")


def base_hashes_as(base: Base, hashes: dict[str, dict[str, str]], algorithm: str
                   ) -> dict[str, str]:
    """The base's per-tensor hashes in `algorithm` (a branch made from an older checkpoint
    records sha256): `hashes` {algorithm: hashes} holds the verified ones, others are read
    again once (the base's bytes were checked against its fingerprint already)."""
    if algorithm not in hashes:
        label = f"base {base.path}"
        hashes[algorithm] = {name: scan(label, view, algorithm=algorithm)
                             for name, view in sorted(base.tensors.items())}
    return hashes[algorithm]


def check_party(base: Base, verified: dict[str, dict[str, str]], party: Party,
                row_dtype) -> None:
    """`verified`: {algorithm: per-tensor hashes of the base} (`base_hashes_as`)."""
    label = f"branch {party.source!r} ({party.path})"
    meta = party.meta
    try:
        algorithm = checkpoint.hash_algorithm(meta)
    except ValueError as err:
        raise MergeRefused(f"{label}: {err}") from None
    if meta.get("base_fingerprint") != base.fingerprint:
        raise MergeRefused(f"{label}: trained from another base (base_fingerprint "
                           f"{str(meta.get('base_fingerprint'))[:12]}..., this base is "
                           f"{base.fingerprint[:12]}...); merge it with the base it started from")
    if int(meta.get("base_experts", -1)) != base.n_experts:
        raise MergeRefused(f"{label}: built on a base with {meta.get('base_experts')} experts, "
                           f"this base has {base.n_experts}")
    frozen = dict(meta.get("frozen_hashes") or {})
    hashes = base_hashes_as(base, verified, algorithm)
    for name in sorted(frozen):
        if name in hashes and hashes[name] is None:
            continue  # deferred: checked when the merge's write has read it
        expected = _expected_frozen_hash(base, hashes, name, party, algorithm)
        if expected is None:
            raise MergeRefused(f"{label}: frozen tensor {name!r} is not a tensor of the base")
        if frozen[name] != expected:
            raise MergeRefused(f"{label}: frozen tensor {name!r} differs from the base's "
                               f"(hash {frozen[name][:12]}... vs {expected[:12]}...); the "
                               f"branch changed a tensor it must not train")
    unlisted = sorted(set(hashes) - set(frozen))
    if unlisted:
        raise MergeRefused(f"{label}: base tensor(s) {unlisted} are not in its frozen_hashes: "
                           f"the branch trained them, so its expert does not fit the base")
    cfg = base.cfg
    lyr, d = cfg.n_layers, cfg.d_model
    if party.low_rank:
        low_rank.check_shapes(base, party, label)
    for name in () if party.low_rank else FFN_EXPERT:
        want = list(base.tensors[name].shape)
        want[1] = 1
        _check_shape(label, name, party.own[name], want, base.tensors[name].dtype)
    _check_shape(label, ROUTER, party.own[ROUTER], (lyr, 1, d), row_dtype)
    _check_shape(label, BIAS, party.own[BIAS], (lyr, 1), row_dtype)
    stat_shapes = {"x_sum": (lyr, d), "xtx": (lyr, d, d), "mean_hidden": (lyr, d)}
    for stat in STAT_NAMES:
        _check_shape(label, stat_name(stat), party.stats[stat], stat_shapes[stat])
    # the artifact's fingerprint is over exactly these tensors (moesaic.branch_train.artifact)
    own = {name: scan(label, party.own[name], algorithm=algorithm) for name in sorted(party.own)}
    own.update({stat_name(stat): scan(label, party.stats[stat], algorithm=algorithm)
                for stat in STAT_NAMES})
    if party.ngram is not None:  # the bigram counts (moesaic.routing.ngram)
        for stat, want in ngram.shapes(cfg.vocab_size).items():
            _check_shape(label, ngram_name(stat), party.ngram[stat], want)
            own[ngram_name(stat)] = scan(label, party.ngram[stat], algorithm=algorithm)
    recorded = meta.get("fingerprint")
    if None not in own.values() and checkpoint.fingerprint_of_hashes(own) != recorded:
        raise MergeRefused(f"{label}: its expert, router row, bias and statistics do not match "
                           f"the fingerprint {str(recorded)[:12]}... the branch job recorded; "
                           f"they were modified after it wrote them (merge the artifact it "
                           f"wrote, or train the branch again)")


def public_fingerprint(public: PublicStats) -> str:
    """The public statistics' fingerprint: that of a checkpoint holding only them."""
    label = f"public stats {public.path}"
    return checkpoint.fingerprint_of_hashes({
        stat_name(stat): scan(label, public.stats[stat], algorithm=public.hash)
        for stat in STAT_NAMES})


def router_dtype(base: Base, parties: list[Party]) -> np.dtype:
    if ROUTER in base.tensors:
        return np.dtype(base.tensors[ROUTER].dtype)
    if parties:
        return np.dtype(parties[0].own[ROUTER].dtype)
    return np.dtype(base.cfg.param_dtype)


def router_input(base: Base, parties: list[Party], public: PublicStats | None) -> str:
    """The merged model's model.router_input: the one every branch (and an MoE base, and the
    public statistics) was made with; rows made for different inputs do not mix."""
    made = {p.source: p.router_input for p in parties}
    if base.cfg.is_moe:
        made = {"the base": base.cfg.router_input, **made}
    if not made:  # a dense base and no party left (the last one opted out)
        return public.router_input if public is not None else base.cfg.router_input
    if len(set(made.values())) > 1:
        raise MergeRefused(f"the inputs disagree on model.router_input: {made}; merge branches "
                           "trained with the same router input")
    kind = next(iter(made.values()))
    if public is not None and public.router_input != kind:
        raise MergeRefused(f"public stats {public.path} are sums of router input "
                           f"{public.router_input!r} but the branches route on {kind!r}; "
                           "compute them again for that input")
    return kind


def verify(base: Base, parties: list[Party], public: PublicStats | None = None
           ) -> str | None:
    """Runs every check; returns the public statistics' fingerprint (None without them)."""
    check_unique([p.source for p in parties])
    router_input(base, parties, public)
    verified = {base.hash: base_hashes(base)}
    row_dtype = router_dtype(base, parties)
    for party in parties:
        check_party(base, verified, party, row_dtype)
    if public is not None:
        if public.base_fingerprint and public.base_fingerprint != base.fingerprint:
            raise MergeRefused(f"public stats {public.path}: computed under another model "
                               f"(fingerprint {public.base_fingerprint[:12]}...) than the base "
                               f"{base.path} ({base.fingerprint[:12]}...); compute them again "
                               "under this base (--public-data DIR)")
        cfg = base.cfg
        shapes = {"x_sum": (cfg.n_layers, cfg.d_model), "mean_hidden": (cfg.n_layers, cfg.d_model),
                  "xtx": (cfg.n_layers, cfg.d_model, cfg.d_model)}
        for stat in STAT_NAMES:
            _check_shape(f"public stats {public.path}", stat_name(stat), public.stats[stat],
                         shapes[stat], why="they were computed under a model of another shape")
        found = public_fingerprint(public)
        if public.fingerprint is not None and found != public.fingerprint:
            raise MergeRefused(f"public stats {public.path}: they do not match their recorded "
                               f"fingerprint {public.fingerprint[:12]}...; they were modified "
                               f"after they were written")
        return found
    return None
