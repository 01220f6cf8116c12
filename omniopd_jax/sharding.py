"""Mesh construction and logical-axis sharding: the only module that knows mesh axis names.

Model parameters carry logical axis names (`logical_axes` metadata, e.g. ("embed", "mlp")); a rules
table (from config) maps each logical name to mesh axes of the ("data", "fsdp", "tensor") mesh.
"""

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("norm", None),
  ("layers", None),  # the stacked layer axis of scan_layers: every device holds every layer
)


def rules_from_config(config_rules) -> tuple:
  """config.sharding_rules (lists after a JSON/YAML round trip) -> the hashable rules tuple."""
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config_rules)


def make_mesh(shape: Sequence[tuple[str, int]] | None = None, devices=None) -> jax.sharding.Mesh:
  """A mesh from [(axis, size), ...]; one size may be -1 (all remaining devices).

  The default puts every device on "data". Axes are Auto (classic GSPMD propagation).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape or [("data", -1), ("fsdp", 1), ("tensor", 1)])
  names = tuple(name for name, _ in shape)
  if set(names) != set(MESH_AXES) or len(names) != len(MESH_AXES):
    raise ValueError(f"mesh axes must be exactly {MESH_AXES}, got {names}")
  sizes = [size for _, size in shape]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(names, sizes))} needs {np.prod(sizes)} devices, have {len(devices)}"
    )
  return jax.make_mesh(
    tuple(sizes),
    names,
    axis_types=(jax.sharding.AxisType.Auto,) * len(names),
    devices=devices,
  )


def logical_to_spec(axes, shape, mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for an array with logical `axes` and `shape`.

  A dimension stays replicated when its rule maps to nothing, when the mesh axis is already used by
  another dimension, or when the dimension does not divide evenly (e.g. 3 kv-heads on tensor=2).
  """
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(axes or (), shape):
    target = table.get(name)
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(a for a in targets if a not in used and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in targets])) if targets else 1
    if not targets or dim % size:
      spec.append(None)
      continue
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else targets)
  spec += [None] * (len(shape) - len(spec))
  return P(*spec)


def variable_shardings(tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for every nnx.Variable in `tree` (a module or a state), from its metadata."""

  def one(v):
    if not isinstance(v, nnx.Variable):
      return NamedSharding(mesh, P())
    meta = v.get_metadata()
    return NamedSharding(mesh, logical_to_spec(meta.get("logical_axes"), v.shape, mesh, rules))

  state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(module_fn, mesh, rules=DEFAULT_RULES):
  """Build `module_fn()` with every parameter created already sharded (no full copy anywhere)."""
  abstract = nnx.eval_shape(module_fn)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = variable_shardings(abstract_state, mesh, rules)

  def init():
    return nnx.state(module_fn())

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_module(module, mesh, rules=DEFAULT_RULES):
  """Move an existing module's variables onto `mesh` following their logical axes (in place)."""
  state = nnx.state(module)
  shardings = variable_shardings(state, mesh, rules)
  nnx.update(module, jax.device_put(state, shardings))
  return module


def batch_sharding(mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Rows split over the batch axes, every other dimension replicated."""
  target = dict(rules).get("batch")
  targets = (target,) if isinstance(target, str) else tuple(target or ())
  return NamedSharding(mesh, P(targets or None, *([None] * (ndim - 1))))


def global_batch(local_rows: np.ndarray, mesh, rules=DEFAULT_RULES) -> jax.Array:
  """Assemble a global array from this process's rows (every process passes its own rows)."""
  sharding = batch_sharding(mesh, np.ndim(local_rows), rules)
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows))
