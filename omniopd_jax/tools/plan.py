"""Memory planner: per-device bytes of a training config on a mesh, from abstract shapes only.

  python -m omniopd_jax.tools.plan --config=configs/math.py:pod --preset=qwen3-1.7b \
      --mesh=data:1,fsdp:8,tensor:1 --accelerator=v5e
  python -m omniopd_jax.tools.plan --config=configs/math.py --model_config=/ckpt/qwen3/config.json \
      --mesh=data:1,fsdp:1,tensor:1 --accelerator=H100 --config.micro_batches=8

Nothing is allocated and no device is needed: parameters come from `nnx.eval_shape` of the real
model, optimizer state from `jax.eval_shape` of the real optimizer on them, per-device sizes from
the real PartitionSpecs (train_step.state_shardings, sharding.logical_to_spec) on an AbstractMesh.

What is counted per device (parameters, optimizer state, frozen base, KV cache, logits, layer
activations, with and without remat) and how well the estimates held: docs/memory_model.md.
"""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from omniopd_jax import sharding
from omniopd_jax.methods import registry
from omniopd_jax.models import hf, layer_scan
from omniopd_jax.models import lm as model
from omniopd_jax.ops import attention as attention_ops
from omniopd_jax.ops import vocab_tiling
from omniopd_jax.rollout import sampler
from omniopd_jax.tools.plan_model import GIB, HBM_GIB, PRESETS, Line, Plan, fits
from omniopd_jax.train import step as train_step

__all__ = ["GIB", "HBM_GIB", "PRESETS", "Line", "Plan", "fits"]  # re-exported: the CLI's vocabulary


_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/math.py[:variant]")
_MESH = flags.DEFINE_string(
  "mesh", "", "e.g. data:1,fsdp:8,tensor:1 (missing axes: 1); '' = config"
)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "device count that a -1 mesh axis fills")
_ACCELERATOR = flags.DEFINE_enum("accelerator", None, list(HBM_GIB), "chip to check the plan on")
_MODEL_CONFIG = flags.DEFINE_string("model_config", "", "HF config.json (or its directory)")
_PRESET = flags.DEFINE_enum("preset", None, list(PRESETS), "a known architecture")
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "fraction of HBM kept free for XLA temporaries")
_JSON = flags.DEFINE_bool("json", False, "print the plan as JSON (bytes per line) instead")
_REMAT = flags.DEFINE_bool("remat", False, "what-if: activations with per-layer rematerialisation")
_COMPILE = flags.DEFINE_bool(
  "compile", False, "also compile the real update step on this backend and print XLA's numbers"
)


def parse_mesh(text: str, num_devices: int = 0) -> dict[str, int]:
  """'data:1,fsdp:8' -> {'data': 1, 'fsdp': 8, 'tensor': 1}; one size may be -1 (num_devices)."""
  sizes = dict.fromkeys(sharding.MESH_AXES, 1)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, size = part.partition(":")
    if name not in sizes or not size.lstrip("-").isdigit():
      raise ValueError(
        f"bad mesh entry {part!r} in {text!r}: write axis:size with axes {sharding.MESH_AXES}, "
        "e.g. --mesh=data:1,fsdp:8,tensor:1"
      )
    sizes[name] = int(size)
  return _resolve(sizes, num_devices)


def _resolve(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  if sorted(sizes) != sorted(sharding.MESH_AXES):
    raise ValueError(f"mesh {sizes}: the axes must be exactly {sharding.MESH_AXES}")
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"mesh {sizes}: sizes must be >= 1, with at most one -1")
  if unknown:
    known = math.prod(s for s in sizes.values() if s != -1)
    if num_devices <= 0 or num_devices % known:
      raise ValueError(
        f"mesh {sizes} has a -1 axis: pass --num_devices (a multiple of {known}) or give every "
        "axis a size, e.g. --mesh=data:1,fsdp:8,tensor:1"
      )
    sizes[unknown[0]] = num_devices // known
  return sizes


def abstract_mesh(mesh_sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
  """A device-free mesh of the given axis sizes: shardings and shard shapes, no devices needed."""
  return jax.sharding.AbstractMesh(
    tuple(mesh_sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES
  )


def model_config(config, preset: str | None = None, config_path: str = "") -> model.ModelConfig:
  """The architecture: --model_config, else --preset, else config.model.student_path."""
  if config_path:
    path = os.path.join(config_path, "config.json") if os.path.isdir(config_path) else config_path
    if not os.path.exists(path):
      raise FileNotFoundError(f"--model_config={config_path!r}: no config.json there")
    with open(path) as f:
      return hf.config_from_hf(json.load(f))
  if preset:
    if preset not in PRESETS:
      raise ValueError(f"unknown preset {preset!r}: choose from {sorted(PRESETS)}")
    return hf.config_from_hf(PRESETS[preset])
  if config.model.student_path:
    return hf.config_from_hf(hf.read_hf_config(config.model.student_path))
  raise ValueError(
    "no model architecture: pass --preset (one of " + ", ".join(PRESETS) + "), "
    "--model_config=path/to/config.json, or set --config.model.student_path"
  )


def _shard_bytes(shape, dtype, spec_or_sharding, mesh) -> int:
  s = spec_or_sharding
  if not isinstance(s, jax.sharding.NamedSharding):
    s = jax.sharding.NamedSharding(mesh, s)
  return math.prod(s.shard_shape(tuple(shape))) * jnp.dtype(dtype).itemsize


def _tree_bytes(tree, shardings, mesh, dtype=None) -> int:
  leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
  assert len(leaves) == len(specs), (len(leaves), len(specs))
  return sum(_shard_bytes(x.shape, dtype or x.dtype, s, mesh) for x, s in zip(leaves, specs))


@functools.lru_cache(maxsize=32)
def _state_bytes(cfg, dtype, param_dtype, base_dtype, opt_items, num_steps, mesh_items, rules):
  """(parameter count, per-device bytes of params, optimizer state, base) from abstract shapes."""
  mesh = abstract_mesh(dict(mesh_items))
  abstract = model.abstract_model(cfg, jnp.dtype(dtype), jnp.dtype(param_dtype))
  params = nnx.state(abstract, nnx.Param)
  tx = train_step.make_optimizer(ml_collections.ConfigDict(dict(opt_items)), num_steps)
  state = jax.eval_shape(lambda p: train_step.init_state(p, tx, 0), params)
  shardings = train_step.state_shardings(state, mesh, rules)
  return (
    sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
    _tree_bytes(state.params, shardings.params, mesh),
    _tree_bytes(state.opt_state, shardings.opt_state, mesh),
    _tree_bytes(state.params, shardings.params, mesh, base_dtype),
  )


def _per_device(n: int, axes, mesh) -> int:
  """Size of a dimension of n split over mesh `axes` (when it divides, as logical_to_spec does)."""
  k = math.prod(mesh.shape[a] for a in axes)
  return n // k if n % k == 0 else n


def plan(config, cfg: model.ModelConfig, mesh_sizes: dict[str, int], remat: bool = False) -> Plan:
  """The per-device memory plan of `config` for architecture `cfg` on a mesh of `mesh_sizes`.

  `remat` (True: "full"; else config.model.remat, a models.layer_scan.REMAT_POLICIES name or a bool)
  counts activations as that per-layer rematerialisation saves them.
  """
  policy = layer_scan.remat_policy(True if remat else config.model.get("remat", False))
  remat = policy != "none"
  mesh = abstract_mesh(mesh_sizes)
  rules = _rules(config)
  table = dict(rules)
  dtype = jnp.dtype(config.model.dtype)
  c = dtype.itemsize

  # Resident: the train state (exactly as train_step builds and shards it) and the frozen base.
  pdt, bdt = config.model.param_dtype, config.model.base_dtype
  opt = tuple(sorted(config.optimizer.to_dict().items()))
  num_params, param_bytes, opt_bytes, base_bytes = _state_bytes(
    cfg, str(dtype), pdt, bdt, opt, config.num_steps, tuple(mesh_sizes.items()), rules
  )
  use_base = train_step.needs_base(config)
  base_bytes = base_bytes if use_base else 0
  lines = [
    Line("params", f"trainable parameters ({pdt})", "resident", param_bytes,
         f"{num_params:,} parameters, sharded by their logical axes"),
    Line("optimizer", "optimizer state (AdamW mu, nu)", "resident", opt_bytes,
         "jax.eval_shape(tx.init) on the abstract parameters"),
    Line("base", f"frozen base parameters ({bdt})", "resident", base_bytes,
         "KL anchor" if use_base else "not needed: this method has no KL anchor"),
  ]  # fmt: skip

  # Rollout phase: the KV cache laid out as the sampler lays it out.
  row_axes = [a for a in sampler.rows_axes(mesh, rules) if mesh.shape[a] > 1]
  n_rows = math.prod(mesh.shape[a] for a in row_axes)
  prompt = sampler.bucket(config.max_prompt_len, sampler.PROMPT_BUCKETS)
  length = config.rollout.max_new_tokens
  kv, d, n = cfg.num_key_value_heads, cfg.dim_per_head, cfg.num_hidden_layers
  axes = lambda name: [a for a in _targets(table, name) if mesh.shape[a] > 1]
  vocab_dev = _per_device(cfg.vocab_size, axes("vocab"), mesh)
  heads_dev = _per_device(cfg.num_attention_heads, axes("heads"), mesh)
  kv_dev = _per_device(kv, axes("kv_heads"), mesh)
  ffn_dev = _per_device(cfg.intermediate_size, axes("mlp"), mesh)

  def kv_line(name, label, rows, slots, prefill):
    padded = sampler.bucket(rows, sampler.BATCH_BUCKETS, n_rows)
    shape = (padded, kv, slots, d)
    spec = sharding.logical_to_spec(model.V_CACHE_AXES, shape, mesh, rules)  # keys: same bytes
    per_layer = _shard_bytes(shape, dtype, spec, mesh)
    b = padded // n_rows
    formula = f"{b} rows x {slots} slots x {n} layers x 2 x {kv_dev} kv heads x {d} x {c} B"
    temps = b * (2 * vocab_dev + heads_dev * prefill * slots) * 4
    return Line(name, label, "rollout", 2 * n * per_layer, formula), temps

  candidates = []
  if config.method != "sft":
    candidates.append(kv_line("kv_cache", "KV cache, training rollouts", config.batch_size,
                              prompt + length, prompt))  # fmt: skip
  eval_len = config.eval.max_new_tokens or length
  candidates.append(kv_line("kv_cache_eval", "KV cache, eval rollouts", config.eval.batch_size,
                            prompt + eval_len, prompt))  # fmt: skip
  if config.method == "omniopd" and config.omniopd.weight_form == "group":
    o = config.omniopd
    prefix = sampler.bucket(prompt + length, sampler.PROMPT_BUCKETS)
    candidates.append(kv_line(
      "kv_cache_drafts", "KV cache, group drafts (all at once)",
      config.batch_size * o.num_forks * o.num_drafts, prefix + o.chunk_len, prefix))  # fmt: skip
  lines += [line for line, _ in candidates]
  temps = max(t for _, t in candidates)
  lines.append(Line("rollout_temporaries", "rollout temporaries (float32)", "rollout", temps,
                    "decode logits + log-softmax, one layer's prefill scores"))  # fmt: skip

  # Update phase: gradients plus the activations one micro-batch saves for the backward pass.
  micro = max(int(config.micro_batches), 1)
  grads = param_bytes * (2 if micro > 1 else 1)
  u = -(-config.batch_size // (n_rows * micro))
  seq = prompt + length - 1
  teacher = config.method == "opd" and config.opd.estimator == "full_vocab"
  # Packed rows (methods/packing.py) run the head on every position, not only the L response
  # ones; a packed micro-batch holds at most a padded one's rows, so the rest bounds it as is.
  head_len = seq + 1 if config.get("pack_sequences", False) else length
  head_line = _head_line(config, cfg, u, head_len, vocab_dev, use_base, teacher, c)
  e, f = cfg.hidden_size, ffn_dev
  fused = attention_ops.resolve(config.model.get("attention", "dense")) != "dense"
  # Dense attention saves float32 scores, masked scores and softmax plus the probabilities in c
  # per query and key; a fused attention saves the float32 log-normaliser per query and head.
  scores = heads_dev * 4 if fused else heads_dev * seq * (12 + c)
  per_token = (4 * e + 3 * heads_dev * d + 3 * kv_dev * d + 4 * f) * c + scores
  # One layer's live set during its backward: every token's, or with model.layer_chunk (blockwise
  # attention) the whole sequence's input, output gradient and input gradient in c, keys and
  # values in float32 with their float32 gradients, plus one query chunk's full set.
  layer_chunk = int(config.model.get("layer_chunk", 0))
  if layer_chunk > 0 and fused and attention_ops.resolve(config.model.attention) == "blockwise":
    chunk = min(layer_chunk, seq)
    one_layer = u * seq * (3 * e * c + 4 * kv_dev * d * 4) + u * chunk * per_token
  else:
    one_layer = u * seq * per_token
  if remat:  # each layer's input (and the policy's matmul outputs) saved; one layer's set lives
    # during its backward. dots: q, k, v, o and the MLP's gate, up, down; dots_except_mlp: q-o.
    attn_dots = heads_dev * d + 2 * kv_dev * d + e
    saved = e + {"full": 0, "dots": attn_dots + 2 * f + e, "dots_except_mlp": attn_dots}[policy]
    layer_acts = n * u * seq * saved * c + one_layer
    acts_formula = f"{n} x {u} x {seq} x {saved} x {c} B + one layer ({one_layer:,} B)"
  else:
    layer_acts = n * u * seq * per_token
    acts_formula = f"{n} layers x {u} rows x {seq} tokens x {per_token:,} B"
  attn = "fused attention" if fused else "dense attention"
  lines += [
    Line("gradients", f"gradients ({pdt})" + (", with accumulator" if micro > 1 else ""),
         "update", grads, "like the parameters" + (" x 2" if micro > 1 else "")),
    head_line,
    Line("activations", f"layer activations, update (remat {policy}, {attn})",
         "update", layer_acts, acts_formula),
  ]  # fmt: skip
  notes = []
  if teacher:
    notes.append("opd full_vocab: the in-process teacher's parameters are not counted")
  return Plan(tuple(lines), dict(mesh_sizes), cfg, tuple(notes))


def _head_line(config, cfg, u, length, vocab_dev, use_base, teacher, c) -> Line:
  """The LM head and the losses' per-vocabulary arrays in the update."""
  models = 1 + use_base + teacher
  if config.model.get("head", "dense") != "tiled":
    n_logits = 3 + 3 * use_base + 3 * teacher
    return Line("logits", "logits, update (float32)", "update",
                n_logits * u * length * vocab_dev * 4,
                f"{n_logits} x {u} rows x {length} x {vocab_dev} vocab x 4 B")  # fmt: skip
  # ops/vocab_tiling: per vocabulary tile, ~3 float32 [u, L, T] arrays per model (logits,
  # exponentials, d logits), the hidden states in the compute dtype and the [u, L, E] float32
  # gradient carry; the head gradient's tiles stay sharded like the head (counted in gradients).
  tile = int(config.model.get("head_vocab_tile", 0)) or vocab_tiling.default_vocab_tile(
    cfg.vocab_size, config.batch_size * length
  )
  tile = min(tile, vocab_dev)
  e = cfg.hidden_size
  size = 3 * models * u * length * tile * 4 + u * length * e * (models * c + 4)
  return Line("logits", f"head tiles, update (vocab tile {tile})", "update", size,
              f"3 x {models} models x {u} x {length} x {tile} x 4 B + hidden and its gradient")  # fmt: skip


def _rules(config) -> tuple:
  return sharding.rules_from_config(config.sharding_rules)


def _targets(table, name):
  target = table.get(name)
  return (target,) if isinstance(target, str) else tuple(target or ())


def min_micro_batches(config, cfg, mesh_sizes, accelerator, headroom=0.1, remat=False):
  """The smallest micro_batches (dividing the batch evenly over the batch axes) that fits."""
  n_rows = math.prod(mesh_sizes[a] for a in _targets(dict(config.sharding_rules), "batch"))
  config = config.copy_and_resolve_references()
  for micro in range(1, config.batch_size + 1):
    if config.batch_size % micro or (config.batch_size // micro) % n_rows:
      continue
    config.micro_batches = micro
    if fits(plan(config, cfg, mesh_sizes, remat).peak, accelerator, headroom)[0]:
      return micro
  return None


def update_batch_shapes(config):
  """The update step's global batch for `config.method`: its typed batch of ShapeDtypeStructs."""
  b, length = config.batch_size, config.rollout.max_new_tokens
  prompt_len = sampler.bucket(config.max_prompt_len, sampler.PROMPT_BUCKETS)
  if config.method == "opd" and config.opd.estimator == "full_vocab":
    raise ValueError("--compile does not build the in-process teacher of opd full_vocab")
  return registry.get(config.method).abstract_batch(config, b, prompt_len, length)


def compiled_update_memory(config, cfg: model.ModelConfig, mesh_sizes: dict[str, int]) -> dict:
  """XLA's per-device bytes for the real jitted update step, lowered from abstract inputs.

  Compiles (nothing is allocated) on the local backend, so it needs prod(mesh) local devices: a
  GPU/TPU host, or CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N for small models.
  Returns argument / output / alias / temp bytes and XLA's peak (argument + output - alias + temp).
  """
  ma = lower_update(config, cfg, mesh_sizes).compile().memory_analysis()
  names = ("argument", "output", "alias", "temp")
  out = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in names}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def lower_update(config, cfg: model.ModelConfig, mesh_sizes: dict[str, int]):
  """The real jitted update step (train.step.make_update_fn) lowered from abstract inputs (a
  jax.stages.Lowered; nothing allocated), with config.model.scan_layers' parameter layout."""
  n = math.prod(mesh_sizes.values())
  if jax.device_count() < n:
    raise ValueError(
      f"--compile needs {n} devices for mesh {mesh_sizes}, this backend has {jax.device_count()} "
      "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
    )
  rules = _rules(config)
  mesh = sharding.make_mesh([(a, mesh_sizes[a]) for a in sharding.MESH_AXES], jax.devices()[:n])
  dtype, pdt = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
  cfg = dataclasses.replace(cfg, scan_layers=bool(config.model.get("scan_layers", False)))
  graphdef, params = nnx.split(model.abstract_model(cfg, dtype, pdt), nnx.Param)
  tx = train_step.make_optimizer(config.optimizer, config.num_steps)
  state = jax.eval_shape(lambda p: train_step.init_state(p, tx, 0), params)
  update = train_step.make_update_fn(config, mesh, graphdef, state, rules)

  def placed(tree, shardings, dtype=None):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [
      jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s)
      for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
    ])  # fmt: skip

  base = None
  if train_step.needs_base(config):
    base = placed(params, update.base_shardings, jnp.dtype(config.model.base_dtype))
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim, rules)
    ),
    update_batch_shapes(config),
  )
  return update.jitted.lower(placed(state, update.shardings), base, batch)


def _gib(x: int) -> str:
  return f"{x / GIB:9.2f}"


def format_plan(p: Plan, config, accelerator: str | None = None, headroom: float = 0.1) -> str:
  """The printed report: one line per item, the phases, the peak and the verdict."""
  m, cfg = p.mesh, p.model
  devices = math.prod(m.values())
  out = [
    f"model  {cfg.architecture}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
    f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv x {cfg.dim_per_head}, "
    f"ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}"
    f"{', tied' if cfg.tie_word_embeddings else ''}; {cfg.num_params() / 1e9:.3f} B parameters",
    f"mesh   {' '.join(f'{k}={v}' for k, v in m.items())} ({devices} devices); method "
    f"{config.method}, batch {config.batch_size}, micro_batches {config.micro_batches}, "
    f"prompt {config.max_prompt_len} + {config.rollout.max_new_tokens} new tokens",
    f"dtypes params {config.model.param_dtype}, compute {config.model.dtype}, "
    f"base {config.model.base_dtype}",
    "",
    f"{'per device':<44}{'GiB':>9}  formula",
  ]
  for phase in ("resident", "rollout", "update"):
    out.append(f"[{phase}]")
    for line in p.lines:
      if line.phase == phase:
        out.append(f"  {line.label:<42}{_gib(line.bytes)}  {line.formula}")
  out += [
    "",
    f"{'resident (params + optimizer + base)':<44}{_gib(p.phase('resident'))}",
    f"{'rollout phase (largest KV cache + temps)':<44}{_gib(p.phase('rollout'))}",
    f"{'update phase (gradients + activations)':<44}{_gib(p.phase('update'))}",
    f"{'total: peak = resident + max(rollout, update)':<44}{_gib(p.peak)}",
  ]
  out += [f"note: {n}" for n in p.notes]
  if accelerator:
    ok, usable = fits(p.peak, accelerator, headroom)
    verdict = "FITS" if ok else "DOES NOT FIT"
    out.append(
      f"{accelerator}: {HBM_GIB[accelerator]} GiB HBM per chip, {usable / GIB:.2f} GiB usable "
      f"with {headroom:.0%} headroom -> {verdict} ({(usable - p.peak) / GIB:+.2f} GiB)"
    )
    if accelerator.startswith("H"):
      out.append(
        "note: JAX preallocates 75% of GPU memory by default; "
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to use this plan"
      )
  return "\n".join(out)


def to_json(p: Plan, accelerator: str | None = None, headroom: float = 0.1) -> dict:
  """The plan as plain data: bytes per line, per phase, the peak and (with an accelerator) fits."""
  phases = {k: p.phase(k) for k in ("resident", "rollout", "update")}
  lines = {line.name: line.bytes for line in p.lines}
  out = dict(mesh=p.mesh, num_params=p.model.num_params(), lines=lines, phases=phases, peak=p.peak)
  if accelerator:
    out["accelerator"] = accelerator
    out["fits"], out["usable"] = fits(p.peak, accelerator, headroom)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, accel, headroom = _CONFIG.value, _ACCELERATOR.value, _HEADROOM.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/math.py:pod")
  try:
    mesh_sizes = (
      parse_mesh(_MESH.value, _NUM_DEVICES.value)
      if _MESH.value
      else _resolve(dict(config.mesh), _NUM_DEVICES.value)
    )
    cfg = model_config(config, _PRESET.value, _MODEL_CONFIG.value)
    p = plan(config, cfg, mesh_sizes, _REMAT.value)
    compiled = compiled_update_memory(config, cfg, mesh_sizes) if _COMPILE.value else None
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  if _JSON.value:
    print(json.dumps(dict(to_json(p, accel, headroom), compiled=compiled), indent=1))
    return
  print(format_plan(p, config, accel, headroom))
  if compiled:
    backend = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    print(
      f"XLA, update step compiled on {backend}: arguments {compiled['argument'] / GIB:.2f}, "
      f"outputs {compiled['output'] / GIB:.2f} (donated {compiled['alias'] / GIB:.2f}), "
      f"temporaries {compiled['temp'] / GIB:.2f} -> {compiled['peak'] / GIB:.2f} GiB; planner "
      f"resident + update: {(p.phase('resident') + p.phase('update')) / GIB:.2f} GiB"
    )
  if accel and not fits(p.peak, accel, headroom)[0]:
    for remat in sorted({_REMAT.value, True}):
      micro = min_micro_batches(config, cfg, mesh_sizes, accel, headroom, remat)
      if micro:
        fitted = config.copy_and_resolve_references()
        fitted.micro_batches = micro
        peak = plan(fitted, cfg, mesh_sizes, remat).peak
        how = "with per-layer remat and " if remat and not _REMAT.value else "with "
        print(f"hint: fits {how}--config.micro_batches={micro} (peak {peak / GIB:.2f} GiB)")
        break
    else:
      print(
        "hint: does not fit at any micro_batches, even with remat: add devices (fsdp/tensor), "
        "shorten rollouts, lower batch_size, or use bfloat16 params/base"
      )


if __name__ == "__main__":
  app.run(main)
