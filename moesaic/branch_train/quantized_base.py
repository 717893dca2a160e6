"""The start of a QLoRA job (`config.branch.lora.quantize` int8 or nf4): the base read from
its checkpoint a stored chunk (one layer) at a time on the host, checked against its
fingerprint on the way, its blocks' projection matrices quantized one layer at a time, and
only the quantized codes and scales placed on the devices. The whole unquantized base is
never on a device, so a 7B nf4 branch starts where its step fits (`moesaic plan` reports the
start's peak beside the step's).

    base, hashes = load(path, meta, sc, cfg, verify=True)

`base` is a `base_model.Base` whose flat parameters are held as the step holds its frozen
tree (`Precision`): the projections `quantized.Quantized`, the tensors the model reads in the
compute dtype cast on the host, the rest as stored, each placed with the step's sharding.
Everything the start computes under the base (the router statistics, the owner's row) runs
on this model, whose layer scan dequantizes one layer at a time, as the step's does: the
statistics are the quantized base's, not the stored one's (docs/low-rank.md, "The start:
quantized as it loads": equal to the dequantized base's, 15% of their scale from the float32
base's on the 2-layer test model).

Verifying is `checkpoint.verify`'s, in the same read: every stored tensor hashed
(`checkpoint.scan`, which also finds the first NaN or Inf) and the fingerprint compared
before anything is returned; the refusals name the base as verify names it. `hashes` are the
stored tensors' hashes, read once (the artifact's frozen hashes are the stored base's).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moesaic.branch_train import base_model
from moesaic.model import checkpoint, damage, params, quantized
from moesaic.model.config import ModelConfig


def place(host: np.ndarray, sharding) -> jax.Array:
    """A host array placed with `sharding`, each device given only its shard (every
    transfer of the start's base to a device goes through here)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@functools.cache
def _quantizer(kind: str, name: str):
    return jax.jit(functools.partial(quantized.quantize_layer, kind=kind, name=name))


def quantize_layer(layer: np.ndarray, kind: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scale) of one layer's float slice, brought back to the host: the only float
    piece of a projection a device sees is one layer of it."""
    codes, scale = _quantizer(kind, name)(layer)
    return np.asarray(codes), np.asarray(scale)


def _passing(pieces: Iterator[np.ndarray], take) -> Iterator[np.ndarray]:
    for piece in pieces:
        take(piece)
        yield piece


def load(path: str | pathlib.Path, meta: dict, sc, cfg: ModelConfig, *, verify: bool = True,
         label: str = "base") -> tuple[base_model.Base, dict[str, str]]:
    """(the base held as the step holds it, {stored tensor: hash}); `sc` the job's
    `setup.StepConfig` (its precision and frozen shardings)."""
    path = pathlib.Path(path)
    precision, kind = sc.precision, sc.precision.quantize
    algorithm = checkpoint.hash_algorithm(meta)
    wanted = checkpoint.flatten(nnx.state(checkpoint.abstract_model(cfg)))
    replicated = NamedSharding(sc.mesh, PartitionSpec())
    held, hashes = {}, {}
    try:
        stored = checkpoint.tensor_metadata(path)
        for name in sorted(stored):
            reader = checkpoint.TensorReader(path, name)
            to_quantize = name in wanted and precision.quantizes(name)
            kept: list[np.ndarray] = []

            def take(piece, name=name, to_quantize=to_quantize, kept=kept):
                if to_quantize:  # one layer at a time to the device and back as codes
                    kept.extend(quantize_layer(layer, kind, name) for layer in piece)
                elif name in wanted:
                    kept.append(piece)

            passing = _passing(reader.pieces(), take)
            hashes[name], bad = checkpoint.scan(reader.dtype, reader.shape, passing,
                                                algorithm)
            if bad is not None and verify:
                raise checkpoint.non_finite(label, path, name, bad)
            for _ in passing:  # scan stops at a NaN; --no-verify takes the rest as it is
                pass
            if name not in wanted:
                continue
            sharding = sc.frozen_shardings.get(name)
            if to_quantize:
                host = quantized.Quantized(np.stack([c for c, _ in kept]),
                                           np.stack([s for _, s in kept]), kind)
                held[name] = jax.tree.map(place, host, sharding)
            else:
                whole = kept[0] if len(kept) == 1 else np.concatenate(kept)
                whole = whole.astype(precision.frozen_dtype(name, whole.dtype), copy=False)
                held[name] = place(whole, sharding if sharding is not None else replicated)
            del kept
    except damage.CheckpointDamaged as err:
        raise err.relabel(label) from None
    if verify and checkpoint.fingerprint_of_hashes(hashes) != meta.get("fingerprint"):
        raise checkpoint.fingerprint_mismatch(label, path)
    return base_model.Base(cfg, params.build_model(cfg, held), held, meta), hashes
