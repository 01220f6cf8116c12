"""The rollout's own sharding: decode with weights replicated (or only tensor-sharded) and rows
split over the data axes, resharded on device from the training state once per step.

Under the training layout (fsdp) a decode step gathers every weight and all-reduces activations
several times per layer per token; decoding reads all weights every token, so the cheaper layout
is to gather them once per rollout (Tunix's `reshard` is the model):

  layout = decode_sharding.decode_rules(rules, replicate=decode_sharding.fits_replicated(state))
  reshard = decode_sharding.make_reshard_fn(state, mesh, layout)
  decode_state = reshard(train_state)          # on device: one all-gather per weight per step
"""

import re

import jax
import numpy as np
from flax import nnx

from omniopd_jax import sharding

# Logical weight axes that a tensor-sharded decode keeps split over "tensor"; everything else
# (embed, head_dim, norm) is replicated, and the batch rule (rows) is kept from the training rules.
TENSOR_AXES = ("vocab", "mlp", "heads", "kv_heads")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def decode_rules(rules=sharding.DEFAULT_RULES, *, replicate: bool = True) -> tuple:
  """Rules for decoding: rows as in `rules`; weights replicated, or split over "tensor" only."""
  out = []
  for name, target in rules:
    if name == "batch":
      out.append((name, target))
    else:
      out.append((name, "tensor" if not replicate and name in TENSOR_AXES else None))
  return tuple(out)


def param_bytes(state) -> int:
  leaves = jax.tree.leaves(state)
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))


def fits_replicated(state, fraction: float = 0.3, device=None) -> bool:
  """Whether a full copy of the parameters takes at most `fraction` of one device's memory (the
  rest is for the training state and the KV cache). Devices that report no limit (CPU): True."""
  device = device or jax.devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  return limit is None or param_bytes(state) <= fraction * limit


def make_reshard_fn(state, mesh, rules):
  """A jitted `fn(state) -> state` that moves parameters into the decode layout, on device.

  `state` (arrays or their abstract shapes) fixes the tree; the input keeps whatever sharding it
  has (the training layout), the output gets `rules`. Not donated: training keeps its copy.
  """
  out_shardings = sharding.variable_shardings(state, mesh, rules)
  return jax.jit(lambda s: s, out_shardings=out_shardings)


LAYOUTS = ("auto", "replicated", "tensor", "train")


def decode_layout_state(model_or_state, mesh, rules=sharding.DEFAULT_RULES, layout="auto"):
  """(state in the decode layout, the rules it follows) for `layout` auto | replicated | tensor |
  train (keep the training shardings)."""
  state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
  if layout == "auto" and jax.process_count() > 1:
    # Multi-process: the resharded decode deadlocks in Gloo's context set-up on CPU (tests/
    # test_multihost.py); keep the training layout there until the reshard is proven on pods.
    layout = "train"
  if layout == "train":
    return state, tuple(rules)
  if layout not in LAYOUTS:
    raise ValueError(f"decode layout={layout!r}: one of {LAYOUTS}")
  replicate = layout == "replicated" or (layout == "auto" and fits_replicated(state))
  rules = decode_rules(rules, replicate=replicate)
  key = (jax.tree.structure(state), mesh, rules)
  if key not in _RESHARD_FNS:
    _RESHARD_FNS[key] = make_reshard_fn(state, mesh, rules)
  return _RESHARD_FNS[key](state), rules


_RESHARD_FNS: dict = {}


def count_collectives(hlo_text: str) -> dict[str, int]:
  """How many of each collective op a compiled HLO module holds (async start/done counted once)."""
  counts = {}
  for op in COLLECTIVES:
    counts[op] = len(re.findall(rf"= [^=]*? {op}(-start)?\(", hlo_text))
  return counts
