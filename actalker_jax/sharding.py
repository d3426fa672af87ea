"""One sharding vocabulary: logical axis names, their mapping onto a device mesh, and constraints.

Every parameter of the models carries a `logical_axes` tuple in its metadata (one name or None per
dimension) and the main activations pass through `constrain(x, axes)`. Names:

  batch, frames, length, embed, heads, mlp, conv_in, conv_out, state

A mesh has the axes ("data", "fsdp", "tensor"). `axis_rules(mesh, rules)` activates a mapping from
logical names to mesh axes; outside it, `constrain` is the identity, so models run unsharded on one
device without any set-up.
"""

import contextlib
import threading
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "frames", "length", "embed", "heads", "mlp", "conv_in", "conv_out", "state")
MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over `embed`, tensor parallelism over heads / mlp, batch over (data, fsdp).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_context = threading.local()


def _check_axes(axes: LogicalAxes) -> None:
    for name in axes:
        if name is not None and name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r}; known axes: {LOGICAL_AXES}")


def logical_to_spec(axes: LogicalAxes, rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per spec."""
    _check_axes(axes)
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context, `constrain` shards activations on `mesh` by `rules`."""
    previous = getattr(_context, "active", None)
    _context.active = (mesh, tuple(rules))
    try:
        yield
    finally:
        _context.active = previous


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint by logical axis names; the identity outside `axis_rules`."""
    if x.ndim != len(axes):
        raise ValueError(f"constrain: array of shape {x.shape} got {len(axes)} logical axes {tuple(axes)}")
    active = getattr(_context, "active", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fit_spec(x.shape, logical_to_spec(axes, rules), mesh)))


def _fit_spec(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. a 1-frame axis on 8 devices)."""
    fitted = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, product = [], 1
        for name in names:
            if size % (product * mesh.shape[name]) == 0:
                kept.append(name)
                product *= mesh.shape[name]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def variable_spec(variable, rules: Rules = DEFAULT_RULES, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec of one nnx Variable from its `logical_axes` metadata.

    With `mesh`, axes that do not divide a dimension are dropped (small or odd-sized parameters stay
    replicated along that mesh axis).
    """
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    axes = variable.get_metadata().get("logical_axes") or (None,) * len(value.shape)
    spec = logical_to_spec(axes, rules)
    return _fit_spec(value.shape, spec, mesh) if mesh is not None else spec


def param_specs(state, rules: Rules = DEFAULT_RULES, mesh: Mesh | None = None):
    """PartitionSpecs for an nnx.State of parameters (same tree, a spec per Variable); see `variable_spec`."""
    from flax import nnx  # local: keeps this module importable without flax for launch scripts

    return jax.tree.map(lambda v: variable_spec(v, rules, mesh), state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over all devices; one axis may be -1 (whatever is left).

    Raises ValueError naming the sizes when they do not multiply to the device count.
    """
    import numpy as np

    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by fsdp*tensor*data = {known} "
                             f"(data={data}, fsdp={fsdp}, tensor={tensor})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {int(np.prod(sizes))} "
                         f"does not match the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)
