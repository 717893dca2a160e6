"""Mixed precision of a training job: which dtype each of its arrays is held and computed in.

    model.dtype         compute: the matmuls and activations (bfloat16 at scale)
    model.param_dtype   stored: a fresh model's parameters and every checkpoint a job writes
    train.master_dtype  the trainable parameters and the optimizer state while the job runs
                        (default float32: the master copy, whatever model.param_dtype)
    train.frozen_dtype  "compute" (default): the frozen tensors the model only reads in
                        model.dtype (`names.COMPUTE_READ`: embedding, lm_head, attention and
                        expert matrices) are held in it; "stored": as the base stores them
    branch.lora.quantize  "int8" or "nf4" (a low-rank branch only: QLoRA): the frozen
                        blocks' projection matrices are held quantized
                        (`moesaic.model.quantized`) and dequantized one layer at a time in
                        the step; "none" (default)

The step casts the master copy's `COMPUTE_READ` tensors to model.dtype once, at its top
(`Precision.compute_view`); the gradient flows back through the cast to the float32 master,
and AdamW's moments follow the master's dtype. A tensor of `COMPUTE_READ` held in model.dtype
gives the same numbers bit for bit as one held in float32 (the model casts it before any use),
so `frozen_dtype="compute"` halves the frozen base's memory at bfloat16 and changes no result.
Norms, router rows and biases are read in float32 and stay as stored.

What a job writes is in model.param_dtype: its trainable tensors cast back (`Precision.stored`),
and frozen tensors held in model.dtype re-read from the base they came from (the trainer), so
a branch's frozen hashes and an ffn job's model are the base's own. A quantized tensor is
hashed as the base stores it (a layer at a time, on the host): the artifact's frozen hashes
are the unquantized base's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moesaic.model import quantized
from moesaic.model.config import ModelConfig
from moesaic.model.names import COMPUTE_READ

FROZEN_DTYPES = ("compute", "stored")


def _floating(value, field: str) -> np.dtype:
    try:
        dtype = jnp.dtype(str(value))
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"config.{field}={value!r}: must be a floating dtype name "
                         "(float32, bfloat16, ...)")
    return np.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class Precision:
    """The dtypes a job holds its arrays in (the module docstring)."""
    compute: np.dtype  # model.dtype
    master: np.dtype  # train.master_dtype
    frozen_in_compute: bool  # train.frozen_dtype == "compute", and the job has a base
    quantize: str = "none"  # branch.lora.quantize: the frozen projections held int8 or nf4

    @classmethod
    def from_config(cls, train: ml_collections.ConfigDict, cfg: ModelConfig,
                    has_base: bool, quantize: str = "none") -> Precision:
        """The policy of a job's `train` section for its model `cfg`; bad values refused
        naming the field. Only a job with a base (`has_base`) holds frozen tensors in the
        compute dtype or quantized: its writer can read them back from the base."""
        master = _floating(train.get("master_dtype", "float32"), "train.master_dtype")
        frozen = str(train.get("frozen_dtype", "compute"))
        if frozen not in FROZEN_DTYPES:
            raise ValueError(f"config.train.frozen_dtype={frozen!r}: one of {FROZEN_DTYPES}")
        if quantize != "none" and not has_base:
            raise ValueError(f"config.branch.lora.quantize={quantize!r}: only a job that "
                             "starts from a base holds it quantized")
        return cls(np.dtype(cfg.compute_dtype), master, frozen == "compute" and has_base,
                   quantize)

    def quantizes(self, name: str) -> bool:
        """Whether frozen tensor `name` is held quantized."""
        return self.quantize != "none" and name in quantized.INPUT_AXES

    def trainable_shapes(self, shapes: Mapping[str, jax.ShapeDtypeStruct]
                         ) -> dict[str, jax.ShapeDtypeStruct]:
        """The trainable tensors as the job holds them: in the master dtype."""
        return {n: jax.ShapeDtypeStruct(s.shape, self.master) for n, s in shapes.items()}

    def frozen_dtype(self, name: str, stored) -> np.dtype:
        cast = self.frozen_in_compute and name in COMPUTE_READ
        return self.compute if cast else np.dtype(stored)

    def frozen_shapes(self, shapes: Mapping[str, jax.ShapeDtypeStruct]) -> dict:
        """The frozen tensors as held: ShapeDtypeStructs, a `quantized.Quantized` of them
        for a tensor held quantized."""
        return {n: quantized.abstract(n, s, self.quantize) if self.quantizes(n)
                else jax.ShapeDtypeStruct(s.shape, self.frozen_dtype(n, s.dtype))
                for n, s in shapes.items()}

    def held_in_compute(self, frozen: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[str, ...]:
        """The frozen tensors held in another dtype than stored, or quantized (re-read for
        writing)."""
        return tuple(n for n, s in frozen.items()
                     if self.quantizes(n) or self.frozen_dtype(n, s.dtype) != np.dtype(s.dtype))

    def hold_trainable(self, trainable: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Own copies in the master dtype (the step donates them; a slice of the base may
        share its buffer with a frozen tensor)."""
        return {n: jnp.array(a, dtype=self.master, copy=True) for n, a in trainable.items()}

    def hold_frozen(self, frozen: Mapping[str, jax.Array]) -> dict:
        """The frozen tensors as held: cast, or quantized one layer at a time (all of them
        in one compiled program); one already held quantized (a start that quantized as it
        loaded, `moesaic.branch_train.quantized_base`) passes as it is."""
        held = {n: a if quantized.is_quantized(a) or a.dtype == self.frozen_dtype(n, a.dtype)
                else a.astype(self.frozen_dtype(n, a.dtype))
                for n, a in frozen.items()
                if not self.quantizes(n) or quantized.is_quantized(a)}
        kind = self.quantize
        todo = {n: a for n, a in frozen.items() if n not in held}
        if todo:
            held.update(jax.jit(lambda d: {n: quantized.quantize(a, kind, n)
                                           for n, a in d.items()})(todo))
        return {n: held[n] for n in frozen}

    def compute_view(self, trainable: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Inside the step: the master's `COMPUTE_READ` tensors in the compute dtype (what
        the model would cast them to anyway; cast once, before any gather or concatenation)."""
        return {n: a.astype(self.compute) if n in COMPUTE_READ else a
                for n, a in trainable.items()}

    @staticmethod
    def stored(trainable: Mapping[str, jax.Array], dtypes: Mapping[str, np.dtype]
               ) -> dict[str, jax.Array]:
        """The trainable tensors in the dtypes the model stores them in (`dtypes`)."""
        return {n: a if a.dtype == dtypes[n] else a.astype(dtypes[n])
                for n, a in trainable.items()}
