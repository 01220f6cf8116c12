"""Scanned layers (config model.scan_layers) and what a layer saves for its backward pass (remat).

With scan_layers, `CausalLM` holds one DecoderLayer whose parameters are every layer's stacked on a
leading axis (logical axis "layers", never sharded) and runs it with one jax.lax.scan, so XLA
compiles one layer instead of L in every program. Its dense KV cache is a StackedKVCache [L, ...]
that rides in the scan's carry, each layer reading and writing its own slice in place.
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

# What a layer keeps for its backward pass (config model.remat; True = "full", False = "none"):
# none: everything (no recompute); full: only the layer's input; dots: the weight matmuls' outputs
# (dots without batch dimensions: the attention einsums, [T, T] scores included, are recomputed);
# dots_except_mlp: only the attention projections (q, k, v, o), the MLP's are recomputed.
REMAT_POLICIES = ("none", "full", "dots", "dots_except_mlp")
ATTENTION_PROJECTIONS = ("query_proj", "key_proj", "value_proj", "out_proj")  # checkpoint names
LAYERS_AXIS = "layers"  # logical axis of stacked layer parameters (scan_layers; never sharded)


@flax.struct.dataclass
class StackedKVCache:
  """Every layer's dense KV cache in one pair of arrays (scan_layers): keys [L, B, KV, D, S],
  values [L, B, KV, S, D]. Inside the layer scan it rides in the carry with `layer` set to the
  running layer, which writes its new keys in place and reads its own slice: no step copies it.
  """

  k: jax.Array  # [L, B, KV, D, S]
  v: jax.Array  # [L, B, KV, S, D]
  layer: jax.Array | None = None  # int32 scalar inside the scan

  @property
  def num_slots(self) -> int:
    return self.v.shape[3]

  def write(self, k, v, cache_index):
    """k, v [B, T, KV, D] at slots cache_index.. of this layer -> (cache, keys [B, KV, D, S],
    values [B, KV, S, D] of this layer)."""
    i, at, zero = (jnp.asarray(n, jnp.int32) for n in (self.layer, cache_index, 0))
    new_k = k.transpose(0, 2, 3, 1)[None].astype(self.k.dtype)  # [1, B, KV, D, T]
    new_v = v.transpose(0, 2, 1, 3)[None].astype(self.v.dtype)  # [1, B, KV, T, D]
    keys = jax.lax.dynamic_update_slice(self.k, new_k, (i, zero, zero, zero, at))
    values = jax.lax.dynamic_update_slice(self.v, new_v, (i, zero, zero, at, zero))
    layer = lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)
    return self.replace(k=keys, v=values), layer(keys), layer(values)


def map_cache(cache, fn):
  """`fn(k [B, KV, D, S], v [B, KV, S, D]) -> (k, v)` applied to every layer of a dense cache
  (a per-layer list, or a StackedKVCache through vmap over its layer axis)."""
  if isinstance(cache, StackedKVCache):
    k, v = jax.vmap(fn)(cache.k, cache.v)
    return cache.replace(k=k, v=v)
  return [fn(k, v) for k, v in cache]


def remat_policy(remat) -> str:
  """config model.remat (a policy name, or a bool: True = "full", False = "none") -> policy name."""
  if isinstance(remat, bool) or remat is None:
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: choose from {REMAT_POLICIES} (or a bool)")
  return remat


def checkpoint_policy(remat):
  """The jax.checkpoint policy of a remat policy name (None: save nothing but the inputs)."""
  name = remat_policy(remat)
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == "dots_except_mlp":
    return jax.checkpoint_policies.save_only_these_names(*ATTENTION_PROJECTIONS)
  return None


def stack_layers(layers: list) -> nnx.Module:
  """One module like layers[0] whose parameters are the layers' stacked on a new leading axis
  (logical axis LAYERS_AXIS)."""
  graphdef, state = nnx.split(layers[0])
  states = [nnx.state(layer) for layer in layers]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  stacked = jax.tree.map(
    lambda v: v.replace(logical_axes=(LAYERS_AXIS, *v.get_metadata()["logical_axes"])),
    stacked,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
  return nnx.merge(graphdef, stacked)
