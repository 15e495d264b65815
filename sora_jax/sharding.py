"""The device mesh and the mapping from logical axis names to mesh axes.

Mesh axes: 'data' (pure data parallel), 'fsdp' (data parallel with sharded parameters and
optimizer state), 'tensor' (heads and MLP width), 'sequence' (spacetime tokens). Sizes come
from `config.mesh`; one of them may be -1, meaning "all remaining devices".

Rules (`config.sharding_rules`) map each logical name of `sora_jax.models.axes` to a mesh axis,
a tuple of mesh axes, or None (replicated).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor', 'sequence')

# Named meshes for the usual layouts (configs pick one with `:mesh=NAME`); -1 takes the rest.
MESH_PRESETS = {
    'dp': dict(data=-1, fsdp=1, tensor=1, sequence=1),  # replicated parameters, split batch
    'fsdp': dict(data=1, fsdp=-1, tensor=1, sequence=1),  # parameters, moments, EMA sharded too
    'fsdp_tp': dict(data=1, fsdp=-1, tensor=2, sequence=1),  # + heads and MLP split in two
    'fsdp_tp_sp': dict(data=1, fsdp=-1, tensor=2, sequence=2),  # + spacetime tokens split in two
}


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves -1 and checks that the sizes multiply to `num_devices` (error names the field)."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f'config.mesh.{axis}={size}: a mesh axis size must be positive or -1')
  if len(fill) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {fill}')
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f'config.mesh: {num_devices} devices cannot fill mesh.{fill[0]}=-1 '
                       f'with the other axes multiplying to {known}')
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f'config.mesh {sizes} has {math.prod(sizes.values())} devices but '
                     f'{num_devices} are available')
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, devices=devices, axis_types=axis_types)
  except AssertionError:  # compile-only TPU v4 slices list both cores of a chip, which the physical
    # layout rejects: fall back to the devices in their listed order
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), MESH_AXES, axis_types=axis_types)


def rules_tuple(rules) -> tuple[tuple[str, Any], ...]:
  """Normalises config rules (lists from JSON or the command line) to flax's tuple form."""
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops the mesh axes of dims they do not divide (tiny models on big meshes stay valid)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def logical_to_shardings(logical_specs, abstract_tree, mesh: Mesh, rules):
  """A tree of logical PartitionSpecs + a tree of shapes -> a tree of NamedShardings on `mesh`."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules_tuple(rules))
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
                      mesh_specs, abstract_tree, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules) -> NamedSharding:
  """Shards the leading (batch) axis of an input array by the rule for 'act_batch'."""
  spec = nn.logical_to_mesh_axes(('act_batch',) + (None,) * (ndim - 1), rules_tuple(rules))
  return NamedSharding(mesh, spec)


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the global batch is split (the mesh axes that 'act_batch' maps to)."""
  spec = nn.logical_to_mesh_axes(('act_batch',), rules_tuple(rules))
  axes = spec[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in names]))
