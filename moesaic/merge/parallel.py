"""Loading a merged model expert-parallel: its experts split over the mesh's `expert` axis.

An expert count the expert axis does not divide is refused, not padded: the rules would
silently replicate the expert dimension (sharding.logical_to_spec keeps an undivided
dimension whole), and a padded expert would change the checkpoint's shapes and every
fingerprint. The message names the divisors that work; merge or remove a party, or pick
another mesh.
"""

from __future__ import annotations

import pathlib

import jax

from moesaic.model import checkpoint
from moesaic.model.sharding import Rules
from moesaic.model.transformer import Decoder


def expert_axis_divisors(n_experts: int, n_devices: int) -> list[int]:
    return [d for d in range(1, n_devices + 1) if n_devices % d == 0 and n_experts % d == 0]


def load_merged(path: str | pathlib.Path, mesh: jax.sharding.Mesh, rules: Rules
                ) -> tuple[Decoder, dict]:
    """`checkpoint.load` onto `mesh`, refusing an expert axis that does not divide the experts."""
    meta = checkpoint.read_meta(path)
    n_experts = int(meta["model"]["n_experts"])
    axis = int(mesh.shape.get("expert", 1))
    if n_experts % axis:
        raise ValueError(
            f"{path}: {n_experts} experts do not split over a mesh expert axis of {axis}; "
            f"expert axis sizes that work with {mesh.size} devices: "
            f"{expert_axis_divisors(n_experts, mesh.size)} (or merge/remove a party so "
            f"the count divides)")
    return checkpoint.load(path, mesh=mesh, rules=rules)
