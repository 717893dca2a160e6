"""The router kinds a merge can build, by name. One small module each; each exposes
`build(inputs: RouterInputs) -> Router`.

    learned-rows  the rows and biases each branch trained (FlexOlmo)
    centroid      per layer, each party's normalised mean router input
    ridge         per layer, the closed-form ridge solution from summed X^T X and X^T y (DUME)
    random        frozen random rows, seeded (the control)
    contrast      per layer, each party's mean router input minus the public data's, as a
                  nearest-centroid boundary against the public expert
    arrow         per layer, the top right singular vector of each party's weight update
                  (training-free, from the weights alone; low-rank and FFN parties)

A router's rows only ever depend on its inputs in slot order, so removing or adding a party
and building again gives the router a merge made at once would have. With an MoE base, the
kinds that give the base one "public" row keep the base's choice among its own experts: its
centred rows (`base_rows_within`) and its biases (`keep_base_bias`, applied by `get`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import numpy as np

KINDS = {
    "learned-rows": "moesaic.routing.learned_rows",
    "centroid": "moesaic.routing.centroid",
    "ridge": "moesaic.routing.ridge",
    "random": "moesaic.routing.random",
    "contrast": "moesaic.routing.contrast",
    "arrow": "moesaic.routing.arrow",
}

# The options each kind reads (`RouterInputs.options`); any other is refused, never ignored.
OPTIONS = {
    "learned-rows": (),
    "centroid": ("scale",),
    "ridge": ("ridge_lambda", "scale"),
    "random": ("seed", "std"),
    "contrast": ("margin", "selectivity"),
    "arrow": ("scale",),
}


def check_options(kind: str, options: dict) -> None:
    unknown = sorted(set(options) - set(OPTIONS.get(kind, ())))
    if unknown:
        takes = ", ".join(OPTIONS[kind]) or "none"
        raise ValueError(f"router {kind!r} takes no option {', '.join(unknown)} (it takes: "
                         f"{takes})")


@dataclasses.dataclass
class RouterInputs:
    """What a router kind may use. Slots: the base's experts first, then the parties."""

    n_layers: int
    d_model: int
    sources: list[str]  # one per slot
    base_experts: int
    base_rows: np.ndarray | None  # (L, Eb, D) the base router rows (an MoE base), else None
    base_bias: np.ndarray | None  # (L, Eb)
    party_rows: Callable[[int], np.ndarray]  # party index -> its learned row (L, D)
    party_bias: Callable[[int], np.ndarray]  # party index -> its learned bias (L,)
    party_stat: Callable[[int, str, int], np.ndarray]  # (party, stat, layer) -> array
    party_tokens: list[int]
    public_stat: Callable[[str, int], np.ndarray] | None  # (stat, layer), or None
    public_tokens: int
    options: dict  # kind options (ridge_lambda, seed, ...)
    # (party, layer) -> the party's update of the projections reading the router input, as
    # (in, out) blocks (arrow); None where the merge does not give them
    party_update: Callable[[int, int], list[np.ndarray]] | None = None

    @property
    def n_parties(self) -> int:
        return len(self.sources) - self.base_experts

    @property
    def n_experts(self) -> int:
        return len(self.sources)


@dataclasses.dataclass
class Router:
    rows: np.ndarray  # (L, E, D) float32
    bias: np.ndarray  # (L, E) float32
    inputs: dict  # what the rows were computed from (recorded in the merged meta)


# kinds whose base-expert rows come from `base_rows_within`: their base slots get the base's
# biases back (`keep_base_bias`). learned-rows keeps the base's rows and biases itself;
# random draws fresh rows for every slot.
KEEP_BASE_CHOICE = ("centroid", "ridge", "contrast", "arrow")


def get(kind: str) -> Callable[[RouterInputs], Router]:
    if kind not in KINDS:
        raise ValueError(f"unknown router kind {kind!r}; one of {sorted(KINDS)}")
    build = importlib.import_module(KINDS[kind]).build
    if kind not in KEEP_BASE_CHOICE:
        return build
    return lambda inputs: keep_base_bias(inputs, build(inputs))


def base_rows_within(inputs: RouterInputs, public_row_ld: np.ndarray) -> np.ndarray:
    """Rows of the base's experts when the router kind gives one row to "public": every base
    expert gets that row plus its base router row minus their mean, so the base's own
    choice among its experts is unchanged (softmax ignores a shared shift; the biases are
    kept by `keep_base_bias`) and the kind decides public versus the parties. (L, Eb, D):
    no rows at all without base experts (BTX-style)."""
    lyr, eb = public_row_ld.shape[0], inputs.base_experts
    public = np.broadcast_to(public_row_ld[:, None, :], (lyr, eb, public_row_ld.shape[-1]))
    public = public.astype(np.float32)
    if inputs.base_rows is None or eb == 0:
        return public
    centred = inputs.base_rows - inputs.base_rows.mean(axis=1, keepdims=True)
    return public + centred.astype(np.float32)


def keep_base_bias(inputs: RouterInputs, router: Router) -> Router:
    """The base's experts keep the biases the base router had (the model clamps them the same
    way in the merged model: expert 0 stays the public one), so the base's own choice among
    its experts is unchanged; the kinds leave those slots at 0. A base without biases: 0."""
    if inputs.base_bias is None or inputs.base_experts == 0:
        return router
    bias = router.bias.copy()
    bias[:, :inputs.base_experts] = inputs.base_bias
    return dataclasses.replace(router, bias=bias.astype(np.float32),
                               inputs={**router.inputs, "base_bias": "the base router's"})
