"""Hugging Face interop: read and write transformers-format directories (config.json, safetensors).

from omniopd_jax.models import hf
model, tokenizer = hf.load_pretrained("hf_dir", dtype="float32")
logits = model(input_ids, attention_mask=attention_mask)  # [B, T, V] float32
hf.save_pretrained(model, tokenizer, "out_dir")            # transformers loads it back
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from omniopd_jax import sharding
from omniopd_jax.models import lm as model_lib

MODEL_TYPES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class UnsupportedConfigError(ValueError):
  """A config.json field names something this model family does not implement."""


def _unsupported(field, value, supported):
  return UnsupportedConfigError(
    f"config.json field `{field}` = {value!r} is not supported (supported: {supported})"
  )


def config_from_hf(hf: dict[str, Any]) -> model_lib.ModelConfig:
  """Map a transformers config dict (v5 `rope_parameters`, or the older `rope_scaling`)."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise _unsupported("model_type", model_type, sorted(MODEL_TYPES))
  if hf.get("hidden_act", "silu") != "silu":
    raise _unsupported("hidden_act", hf.get("hidden_act"), ["silu"])
  if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
    raise _unsupported("use_sliding_window", True, [False])
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in model_lib.ROPE_TYPES:
    raise _unsupported("rope_parameters.rope_type", rope_type, list(model_lib.ROPE_TYPES))
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise _unsupported(
      "rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], [1.0]
    )
  attention_bias = bool(hf.get("attention_bias", False))
  return model_lib.ModelConfig(
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    intermediate_size=hf["intermediate_size"],
    num_hidden_layers=hf["num_hidden_layers"],
    num_attention_heads=hf["num_attention_heads"],
    num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
    head_dim=hf.get("head_dim"),
    architecture=model_type,
    rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
    rope_theta=float(rope["rope_theta"]),
    rope_type=rope_type,
    rope_factor=float(rope.get("factor", 1.0)),
    rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
    rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
    rope_original_max_position_embeddings=int(
      rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
    ),
    max_position_embeddings=hf.get("max_position_embeddings", 2048),
    qkv_bias=True if model_type == "qwen2" else attention_bias,
    o_bias=False if model_type == "qwen2" else attention_bias,
    mlp_bias=bool(hf.get("mlp_bias", False)),
    qk_norm=model_type == "qwen3",
    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )


def config_to_hf(cfg: model_lib.ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
  """A transformers-5 config dict for `cfg`, keeping unrelated fields of `base` (e.g. token ids)."""
  rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
  if cfg.rope_type in ("linear", "llama3"):
    rope["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    rope.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
    )
  out = {k: v for k, v in (base or {}).items() if k not in ("rope_scaling", "rope_theta")}
  out.update(
    architectures=[MODEL_TYPES[cfg.architecture]],
    model_type=cfg.architecture,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_hidden_layers,
    num_attention_heads=cfg.num_attention_heads,
    num_key_value_heads=cfg.num_key_value_heads,
    head_dim=cfg.dim_per_head,
    hidden_act="silu",
    rms_norm_eps=cfg.rms_norm_eps,
    rope_parameters=rope,
    max_position_embeddings=cfg.max_position_embeddings,
    tie_word_embeddings=cfg.tie_word_embeddings,
  )
  if cfg.architecture != "qwen2":
    out["attention_bias"] = cfg.qkv_bias
  if cfg.architecture == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  return out


def _hf_names(cfg: model_lib.ModelConfig):
  """(our state path, HF tensor name, to_ours, to_hf) for every parameter."""
  e, d = cfg.hidden_size, cfg.dim_per_head
  h, kv = cfg.num_attention_heads, cfg.num_key_value_heads

  def proj(heads):  # HF [heads*D, E] <-> ours [E, heads, D]
    return (lambda w: w.T.reshape(e, heads, d), lambda w: w.reshape(e, heads * d).T)

  def bias(heads):
    return (lambda b: b.reshape(heads, d), lambda b: b.reshape(heads * d))

  same = (lambda w: w, lambda w: w)
  transpose = (lambda w: w.T, lambda w: w.T)
  out_proj = (lambda w: w.T.reshape(h, d, e), lambda w: w.reshape(h * d, e).T)
  names = [(("embed_tokens",), "model.embed_tokens.weight", *same)]
  for i in range(cfg.num_hidden_layers):
    p, q = ("layers", i), f"model.layers.{i}."
    attn = [("q_proj", h), ("k_proj", kv), ("v_proj", kv)]
    for name, heads in attn:
      names.append(((*p, "self_attn", name, "kernel"), f"{q}self_attn.{name}.weight", *proj(heads)))
      if cfg.qkv_bias:
        names.append(((*p, "self_attn", name, "bias"), f"{q}self_attn.{name}.bias", *bias(heads)))
    names.append(((*p, "self_attn", "o_proj", "kernel"), f"{q}self_attn.o_proj.weight", *out_proj))
    if cfg.o_bias:
      names.append(((*p, "self_attn", "o_proj", "bias"), f"{q}self_attn.o_proj.bias", *same))
    if cfg.qk_norm:
      for name in ("q_norm", "k_norm"):
        names.append(((*p, "self_attn", name, "weight"), f"{q}self_attn.{name}.weight", *same))
    for name in ("gate_proj", "up_proj", "down_proj"):
      names.append(((*p, "mlp", name, "kernel"), f"{q}mlp.{name}.weight", *transpose))
      if cfg.mlp_bias:
        names.append(((*p, "mlp", name, "bias"), f"{q}mlp.{name}.bias", *same))
    for name in ("input_layernorm", "post_attention_layernorm"):
      names.append(((*p, name, "weight"), f"{q}{name}.weight", *same))
  names.append((("norm", "weight"), "model.norm.weight", *same))
  if not cfg.tie_word_embeddings:
    names.append((("lm_head",), "lm_head.weight", *transpose))
  return names


def _safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, name) for name in files]
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(
    f"no model.safetensors or model.safetensors.index.json in {path!r}: pass an HF directory "
    "written by save_pretrained (or convert a GGUF file with `python -m omniopd_jax.tools.import_gguf`)"
  )


def read_hf_config(path: str) -> dict[str, Any]:
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(
      f"{config_path} does not exist: `path` must be a transformers model directory "
      "(config.json + safetensors + tokenizer files)"
    )
  with open(config_path) as f:
    return json.load(f)


def _tensor_groups(cfg: model_lib.ModelConfig):
  """(our state path, [(HF name, to_ours, to_hf)], stacked) for every parameter of our model.

  Unrolled, each parameter is one HF tensor. With scan_layers, a layer parameter at
  ("layers", ...) holds the L tensors `model.layers.{i}.*` stacked on its leading axis, in order.
  """
  names = _hf_names(cfg)
  if not cfg.scan_layers:
    return [(ours, [(hf_name, a, b)], False) for ours, hf_name, a, b in names]
  groups: dict[tuple, list] = {}
  for ours, hf_name, a, b in names:
    key = ("layers", *ours[2:]) if ours[0] == "layers" else ours  # drop the layer index
    groups.setdefault(key, []).append((hf_name, a, b))
  return [(ours, group, ours[0] == "layers") for ours, group in groups.items()]


def load_model(
  path: str, dtype="float32", param_dtype=None, mesh=None, rules=sharding.DEFAULT_RULES,
  scan_layers: bool = False,
):  # fmt: skip
  """Load only the model from an HF directory; parameters go straight to their mesh shardings.

  scan_layers: build the scanned model (ModelConfig.scan_layers), its per-layer tensors stacked.
  """
  dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
  param_dtype = DTYPES[param_dtype] if isinstance(param_dtype, str) else (param_dtype or dtype)
  hf_config = read_hf_config(path)
  cfg = dataclasses.replace(config_from_hf(hf_config), scan_layers=bool(scan_layers))
  abstract = model_lib.abstract_model(cfg, dtype, param_dtype)
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  tensors = {}
  for file in _safetensors_files(path):
    with safe_open(file, framework="numpy") as f:
      for key in f.keys():
        tensors[key] = (file, key)
  missing = [hf_name for _, hf_name, _, _ in _hf_names(cfg) if hf_name not in tensors]
  if missing:
    raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  handles = {}

  def read(hf_name, to_ours):
    file, key = tensors[hf_name]
    if file not in handles:
      handles[file] = safe_open(file, framework="numpy")
    return to_ours(handles[file].get_tensor(key)).astype(param_dtype)

  # One parameter at a time (all L layers of it when stacked): host memory holds one, not all.
  for ours, group, stacked in _tensor_groups(cfg):
    values = [read(hf_name, to_ours) for hf_name, to_ours, _ in group]
    value = np.stack(values) if stacked else values[0]
    variable, hf_name = flat[ours], group[0][0]
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f"{hf_name}: shape {value.shape} does not match config ({variable.shape})")
    if mesh is None:
      device_value = jnp.asarray(value)
    else:
      spec = sharding.logical_to_spec(
        variable.get_metadata().get("logical_axes"), value.shape, mesh, rules
      )
      device_value = jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
    flat[ours] = variable.replace(device_value)
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  # The original config.json (as a string: static, not a pytree), so save_pretrained keeps token
  # ids and other fields this model does not use.
  model.hf_config_json = json.dumps(hf_config)
  return model


def load_tokenizer(path: str):
  """The tokenizer saved beside the model, or None when the directory has none."""
  from transformers import AutoTokenizer

  if not any(
    os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
  ):
    return None
  return AutoTokenizer.from_pretrained(path)


def eos_token_ids(tokenizer, path: str | None = None, hf_config: dict | None = None) -> tuple:
  """Every id that ends a response: the tokenizer's EOS plus `eos_token_id` of config.json and
  generation_config.json (an int or a list: Qwen's <|im_end|> is only there).

  Args:
    tokenizer: an HF tokenizer; path: the model directory (its config.json is read unless
      `hf_config` is given); hf_config: the parsed config.json.

  Returns:
    sorted tuple of ints.
  """
  configs = []
  if hf_config is not None:
    configs.append(hf_config)
  elif path and os.path.exists(os.path.join(path, "config.json")):
    configs.append(read_hf_config(path))
  generation = os.path.join(path, "generation_config.json") if path else ""
  if generation and os.path.exists(generation):
    with open(generation) as f:
      configs.append(json.load(f))
  ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  for cfg in configs:
    value = cfg.get("eos_token_id")
    ids.extend(value if isinstance(value, list) else [] if value is None else [value])
  return tuple(sorted(set(int(i) for i in ids)))


def load_pretrained(
  path: str, dtype="float32", param_dtype=None, mesh=None, rules=sharding.DEFAULT_RULES,
  scan_layers: bool = False,
):  # fmt: skip
  """(model, tokenizer) from an HF directory: config.json + safetensors (+ index) + tokenizer."""
  model = load_model(path, dtype, param_dtype, mesh, rules, scan_layers)
  return model, load_tokenizer(path)


def save_pretrained(
  model: model_lib.CausalLM,
  tokenizer,
  out_dir: str,
  dtype: str | None = None,
  generation_config: dict[str, Any] | None = None,
):
  """Write `model` (and `tokenizer`, if given) as a directory transformers and vLLM load.

  The directory is complete: model.safetensors, config.json, generation_config.json (token ids,
  plus `generation_config`, e.g. the source model's own), the tokenizer files with a real
  `model_max_length`; every file readable by all (0644).
  """
  cfg = model.config
  os.makedirs(out_dir, exist_ok=True)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  tensors = {}
  for ours, group, stacked in _tensor_groups(cfg):
    value = np.asarray(jax.device_get(flat[ours][...]))
    if dtype is not None:
      value = value.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
    for i, (hf_name, _, to_hf) in enumerate(group):  # a stacked parameter: one tensor per layer
      tensors[hf_name] = np.ascontiguousarray(to_hf(value[i] if stacked else value))
  # Write to a temporary name first so a crash never leaves a truncated model.safetensors.
  tmp = os.path.join(out_dir, "model.safetensors.tmp")
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.chmod(tmp, 0o644)  # safetensors creates its file 0600: others could not read the weights
  os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
  base = json.loads(getattr(model, "hf_config_json", None) or "{}")
  hf_config = config_to_hf(cfg, base)
  saved_dtype = str(next(iter(tensors.values())).dtype)
  hf_config["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
    saved_dtype, "float32"
  )
  if tokenizer is not None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      value = getattr(tokenizer, key, None)
      if value is not None and hf_config.get(key) is None:
        hf_config[key] = value
    tokenizer.save_pretrained(out_dir)
    _set_model_max_length(out_dir, cfg.max_position_embeddings)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  _write_generation_config(out_dir, hf_config, generation_config or {})
  return out_dir


def _set_model_max_length(out_dir: str, max_positions: int):
  """A tokenizer without a length limit saves transformers' placeholder 1e30: write the model's
  context length instead, so servers (vLLM) and pipelines truncate where the model does."""
  path = os.path.join(out_dir, "tokenizer_config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    tok_config = json.load(f)
  current = tok_config.get("model_max_length")
  if isinstance(current, (int, float)) and 0 < current <= max_positions:
    return  # a real, tighter limit set on purpose
  tok_config["model_max_length"] = int(max_positions)
  with open(path, "w") as f:
    json.dump(tok_config, f, indent=2, ensure_ascii=False)


def _write_generation_config(out_dir: str, hf_config: dict[str, Any], given: dict[str, Any]):
  """generation_config.json: the model's special token ids, then the given settings on top
  (written as they are: a source model's own file is passed through, not re-validated)."""
  import transformers

  names = ("bos_token_id", "eos_token_id", "pad_token_id")
  ids = {k: hf_config[k] for k in names if hf_config.get(k) is not None}
  settings = {**ids, **given, "transformers_version": transformers.__version__}
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(settings, f, indent=2, sort_keys=True)
