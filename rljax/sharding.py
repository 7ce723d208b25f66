"""Device mesh and the one table of logical-axis rules.

Every parameter and activation is named with logical axes (`embed`, `mlp`,
`heads`, ...); `LOGICAL_RULES` maps those names onto the three mesh axes:

  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters sharded along `embed` (ZeRO-3 style),
  tensor  Megatron-style tensor parallelism over heads / mlp / vocab.

A role (policy, reference, critic, sampler) may use its own mesh or rules; the
same code runs on 1 CPU, simulated CPU devices, several processes, GPUs, TPUs.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # activations and batches
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes.

    One size may be -1 and is filled so the product equals the device count.
    Axis types are Auto (sharding propagated by XLA from in/out shardings).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: axis sizes must be positive or -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"make_mesh: {n} devices are not divisible by fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices")
    # Keep devices of one process contiguous along the leading (data) axis so
    # process-local batches map onto local devices.
    dev_array = np.asarray(devices, dtype=object).reshape(sizes)
    try:
        from jax.sharding import AxisType

        return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    except (ImportError, TypeError):  # older jax: every mesh is Auto
        return Mesh(dev_array, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the dimension they shard (replicate instead).

    Small models on big meshes (e.g. 2 kv heads on tensor=4) stay runnable.
    """
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for a in axes:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules=LOGICAL_RULES) -> NamedSharding:
    spec = logical_to_spec(names, rules)
    if shape is not None:
        spec = _fit_spec(spec, shape, mesh)
    return NamedSharding(mesh, spec)


def is_axis_names(x) -> bool:
    """A leaf of a logical-axes pytree: a tuple of axis names (or None)."""
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def tree_shardings(logical_axes, shapes, mesh: Mesh, rules=LOGICAL_RULES):
    """Map a pytree of logical-name tuples (and matching shapes) to NamedShardings."""
    return jax.tree.map(
        lambda names, s: named_sharding(mesh, names, s.shape, rules),
        logical_axes, shapes, is_leaf=is_axis_names,
    )


def param_shardings(model, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding for every parameter of `model` (a `rljax.models.Model`)."""
    return tree_shardings(model.logical_axes(), model.param_shapes(), mesh, rules)


def shard_params(params, shardings):
    """Place a (host or single-device) params pytree onto its shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=LOGICAL_RULES) -> NamedSharding:
    """Leading (batch) axis over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def shard_batch(batch, mesh: Mesh, rules=LOGICAL_RULES):
    """Put every array of a batch pytree on the mesh, split along the batch axis.

    On one process the arrays are the global batch; on several processes each
    passes its own slice (process-local data) and gets one global array.
    """
    n_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    out = []
    for path, x in leaves:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        name = jax.tree_util.keystr(path) or "batch"
        if x.ndim == 0:
            out.append(jax.device_put(x, replicated(mesh)))
            continue
        sharding = batch_sharding(mesh, x.ndim, rules)
        if jax.process_count() > 1:
            global_rows = x.shape[0] * jax.process_count()
            if global_rows % n_shards:
                raise ValueError(f"shard_batch: {name} has {global_rows} global rows, not divisible by "
                                 f"data*fsdp = {n_shards}")
            out.append(jax.make_array_from_process_local_data(sharding, np.asarray(x)))
        else:
            if x.shape[0] % n_shards:
                raise ValueError(f"shard_batch: {name} has {x.shape[0]} rows, not divisible by data*fsdp = {n_shards}")
            out.append(jax.device_put(x, sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


def constrain(x: jax.Array, mesh: Mesh | None, names: Sequence[str | None], rules=LOGICAL_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity when `mesh` is None."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))
