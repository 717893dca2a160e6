"""A frozen matrix held quantized (QLoRA's base): int8 or nf4 codes with float32 scales,
dequantized one layer at a time inside the decoder's layer scan.

    held = quantize(w, "nf4", W_GATE)     # w (L, E, D, F) -> Quantized
    w_l = dequantize(held_layer, dtype)   # one layer's slice (E, D, F), in the compute dtype

The arithmetic is qwix's (`qwix.quantize`, `qwix.dequantize`, its QArray and its NF4 buckets,
Dettmers et al. 2023); what this module adds is the layout a branch step needs: a pytree whose
arrays all keep the layer axis first, so `jax.lax.scan` slices codes and scales together and
the model sees one dequantized layer at a time (`dequantize_layer`), and nf4 codes packed two
to a byte (qwix stores nf4 as uint4, which XLA:CPU holds in a byte each).

    int8  per output channel: one absmax scale per column of each layer's matrix (the scale
          reduces over the projection's input axes); 1 byte per weight
    nf4   blocks of 64 along the projection's input axis (`NF4_BLOCK`; the whole axis when 64
          does not divide it), one absmax scale per block; half a byte per weight plus
          4 bytes per 64 weights

Only the blocks' projection matrices are quantized (`INPUT_AXES`): embedding, lm_head, norms,
router rows and biases stay in their dtypes, as in QLoRA.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from moesaic.model.names import ATTN_K, ATTN_O, ATTN_Q, ATTN_V, W_DOWN, W_GATE, W_UP

KINDS = ("none", "int8", "nf4")
NF4_BLOCK = 64
# the input (contracted) axes of each quantizable tensor, layer axis 0 included in the count
INPUT_AXES = {ATTN_Q: (1,), ATTN_K: (1,), ATTN_V: (1,), ATTN_O: (1, 2),
              W_GATE: (2,), W_UP: (2,), W_DOWN: (2,)}


@flax.struct.dataclass
class Quantized:
    """A quantized stacked matrix: `codes` (int8, or nf4 packed two to a uint8 along the last
    axis) and float32 `scale` of the same rank, both with the layer axis first."""
    codes: jax.Array
    scale: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default="int8")

    @property
    def shape(self) -> tuple[int, ...]:
        """The matrix's shape (nf4 codes hold two weights a byte)."""
        *lead, last = self.codes.shape
        return (*lead, last * 2) if self.kind == "nf4" else tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.codes, self.scale))


nnx.register_data_type(Quantized)


def check_kind(kind: str, field: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"{field}={kind!r}: one of {KINDS}")
    return kind


def _how(name: str, shape: tuple[int, ...], kind: str) -> dict:
    """qwix's channelwise/tiled axes for one layer's slice (the layer axis dropped)."""
    inputs = tuple(a - 1 for a in INPUT_AXES[name])
    axes = range(len(shape))
    if kind == "int8":
        return dict(channelwise_axes=tuple(a for a in axes if a not in inputs))
    tiled = inputs[-1]
    block = math.gcd(shape[tiled], NF4_BLOCK)
    return dict(channelwise_axes=tuple(a for a in axes if a != tiled),
                tiled_axes={tiled: block})


def check_shape(name: str, shape: tuple[int, ...], kind: str) -> None:
    """Refuses a tensor this module cannot hold as `kind`, naming it."""
    if name not in INPUT_AXES:
        raise ValueError(f"tensor {name!r} is not a projection that can be held quantized; "
                         f"those are {sorted(INPUT_AXES)}")
    if kind == "nf4" and shape[-1] % 2:
        raise ValueError(f"tensor {name!r} {tuple(shape)}: nf4 packs two weights a byte "
                         "along the last axis, which must be even")


def abstract(name: str, s: jax.ShapeDtypeStruct, kind: str) -> Quantized:
    """The Quantized of ShapeDtypeStructs that `quantize` gives for a tensor of shape `s`."""
    check_shape(name, s.shape, kind)
    return jax.eval_shape(lambda a: quantize(a, kind, name), s)


def quantize(array: jax.Array, kind: str, name: str) -> Quantized:
    """`array` (L, ...) of tensor `name` held as `kind` ("int8" or "nf4"), one layer at a time
    (`jax.lax.map`: the temporaries of one layer, not of the stack)."""
    check_shape(name, array.shape, kind)
    codes, scale = jax.lax.map(lambda layer: quantize_layer(layer, kind, name), array)
    return Quantized(codes, scale, kind)


def quantize_layer(layer: jax.Array, kind: str, name: str) -> tuple[jax.Array, jax.Array]:
    """(codes, scale) of one layer's slice of tensor `name` (its layer axis dropped): what
    `quantize` stacks, and what a start that quantizes as it loads computes a layer at a time
    (`moesaic.branch_train.quantized_base`)."""
    how = _how(name, layer.shape, kind)
    qtype = jnp.int8 if kind == "int8" else "nf4"
    q = qwix.quantize(layer.astype(jnp.float32), qtype, **how)
    codes = q.qvalue
    if kind == "nf4":
        codes = codes.astype(jnp.uint8)
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, q.scale.astype(jnp.float32)


def dequantize(q: Quantized, dtype) -> jax.Array:
    """The matrix `q` holds, in `dtype` (any leading axes: a stack or one layer's slice)."""
    codes = q.codes
    if q.kind == "nf4":
        codes = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(q.shape)
    qtype = jnp.int8 if q.kind == "int8" else "nf4"
    return qwix.dequantize(qwix.QArray(codes, q.scale, None, qtype)).astype(dtype)


def is_quantized(x) -> bool:
    return isinstance(x, Quantized)


def dequantize_layer(layer, dtype):
    """One layer's parameters (a pytree, as the decoder's scan hands them) with every
    Quantized slice dequantized to `dtype`; the identity when none is. Each slice passes an
    optimization barrier first, so XLA cannot hoist the dequantization out of the scan and
    materialize the whole dequantized stack."""
    leaves = jax.tree.leaves(layer, is_leaf=is_quantized)
    if not any(is_quantized(x) for x in leaves):
        return layer
    return jax.tree.map(
        lambda x: dequantize(jax.lax.optimization_barrier(x), dtype) if is_quantized(x) else x,
        layer, is_leaf=is_quantized)
