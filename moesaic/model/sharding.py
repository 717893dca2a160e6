"""Logical axes -> mesh axes. Model code names logical axes only; the config's rules table
maps them onto the mesh ('data', 'fsdp', 'expert', 'tensor') (docs/design.md, contract 5)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_active: dict = {}


def make_mesh(shape: dict | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with sizes from `shape`; one -1 fills the rest."""
    devices = list(jax.devices() if devices is None else devices)
    shape = {axis: int((shape or {}).get(axis, -1 if axis == "data" else 1)) for axis in MESH_AXES}
    unknown = [s for s in shape.values() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape.values() if s != -1)
    if unknown:
        if len(devices) % known:
            raise ValueError(f"mesh {shape}: {len(devices)} devices not divisible by {known}")
        shape = {a: (len(devices) // known if s == -1 else s) for a, s in shape.items()}
    if math.prod(shape.values()) != len(devices):
        raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices, "
                         f"have {len(devices)}")
    grid = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once, and
    (given `mesh` and `shape`) a dimension the mesh axes do not divide stays replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used
                      and (mesh is None or mesh.shape[n] > 1))
        if mesh is not None and shape is not None and names:
            if shape[i] % math.prod(mesh.shape[n] for n in names):
                names = ()
        used.update(names)
        spec.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*spec)


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("axes")
    if axes is None:
        raise ValueError(f"variable of shape {variable.shape} has no logical axes")
    return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A NamedSharding for every variable of `state` (abstract or concrete)."""
    def one(variable):
        spec = logical_to_spec(variable_axes(variable), rules, mesh, variable.shape)
        return NamedSharding(mesh, spec)
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
    """Within this context, `constrain` in model code pins activations onto `mesh`."""
    previous = dict(_active)
    _active.update(mesh=mesh, rules=tuple(rules))
    try:
        yield
    finally:
        _active.clear()
        _active.update(previous)


def active() -> tuple[Mesh, tuple] | None:
    """The (mesh, rules) of the enclosing `activate`, or None outside one."""
    return (_active["mesh"], _active["rules"]) if _active else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation by logical axes; a no-op outside `activate`."""
    if not _active:
        return x
    mesh = _active["mesh"]
    spec = logical_to_spec(axes, _active["rules"], mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
