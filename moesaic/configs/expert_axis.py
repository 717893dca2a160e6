"""How large a mesh's `expert` axis may be for a model of n experts (jax-free, so that the
plan command checks it before jax starts with its fake devices).

A merged model runs expert-parallel on any expert axis by padding its experts to a multiple of
it with slots that are never routed (`moesaic.model.expert_parallel`). An axis at least twice
the experts would leave half of its devices or more holding only padding, and a dense model
(one expert) has nothing to split: both are refused.
"""

from __future__ import annotations


def check_expert_axis(n_experts: int, expert_axis: int, where: str = "--mesh") -> None:
    """ValueError naming `where` when `expert_axis` devices cannot usefully split
    `n_experts` experts."""
    if expert_axis <= 1:
        return
    if n_experts <= 1:
        raise ValueError(f"{where}: expert={expert_axis} on a dense model (one expert); "
                         "it has no experts to split, use expert=1")
    if expert_axis >= 2 * n_experts:
        raise ValueError(f"{where}: expert={expert_axis} is larger than the model's "
                         f"{n_experts} experts (at most {2 * n_experts - 1}: an expert axis "
                         "may exceed the experts only by padding fewer slots than there are "
                         "experts)")
