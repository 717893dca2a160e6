"""The `--mesh` and `--dispatch` of the commands that run a merged model (`eval`,
`tune-router`, and `--mesh` of `generate`, whose decoding runs `dropless`): the model
expert-parallel over the mesh's `expert` axis whatever its expert
count (`moesaic.model.expert_parallel`).

    moesaic eval --model M --data D --mesh data=1,expert=4 [--dispatch all_to_all]

Sizes are axis=size pairs over (data, fsdp, expert, tensor), unnamed axes 1; the mesh takes
the first devices of this process. A mesh that needs more devices than there are, or an expert
axis the model's experts cannot fill, is refused before the model is read (exit 2).
"""

from __future__ import annotations

import argparse
import math

from moesaic.launch.plan import parse_mesh

DISPATCHES = ("dropless", "all_to_all")


def add_arguments(parser: argparse.ArgumentParser, *, dispatch: bool = True) -> None:
    """--mesh, and --dispatch unless `dispatch` is False."""
    parser.add_argument("--mesh", default="",
                        help="device mesh as axis=size pairs over data, fsdp, expert, tensor, "
                             "e.g. data=1,expert=4 (the experts split over the expert axis, "
                             "padded to a multiple of it); default: data-parallel over the "
                             "local devices")
    if not dispatch:
        return
    parser.add_argument("--dispatch", choices=DISPATCHES, default="dropless",
                        help="how tokens reach their experts: left to the compiler (dropless, "
                             "the default) or sent explicitly by all-to-all over the expert "
                             "axis")


def build(text: str, n_experts: int | None):
    """The jax Mesh of --mesh `text` over this process's first devices (None for no --mesh);
    ValueError naming --mesh when it does not fit the devices or `n_experts`."""
    if not text:
        return None
    shape = parse_mesh(text)
    if n_experts is not None:
        from moesaic.model.expert_parallel import check_expert_axis

        check_expert_axis(n_experts, shape["expert"], f"--mesh {text}")
    import jax

    from moesaic.model.sharding import make_mesh

    devices = jax.local_devices()
    need = math.prod(shape.values())
    if need > len(devices):
        raise ValueError(f"--mesh {text}: needs {need} devices, this process has "
                         f"{len(devices)} ({devices[0].platform})")
    return make_mesh(shape, devices=devices[:need])


def experts_of(path: str) -> int | None:
    """The expert count of the checkpoint at `path` (None when it is no model checkpoint:
    loading it then says why)."""
    from moesaic.model import checkpoint

    if not path or not checkpoint.is_complete(path):
        return None
    model = checkpoint.read_meta(path).get("model")
    if not isinstance(model, dict):  # a branch artifact or the like: loading names it
        return None
    return int(model.get("n_experts", 1))
