"""tools.plan: per-device bytes against hand computation, real shardings, the fits verdict, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omniopd_jax import sharding
from omniopd_jax.configs import math as math_config
from omniopd_jax.models import hf
from omniopd_jax.models import lm as model
from omniopd_jax.tools import plan
from omniopd_jax.train import step as train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# vocab 256, hidden 64, ffn 128, 2 layers, 4 heads / 2 kv heads of 16, untied, no biases.
HF_SMALL = dict(
  model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
)  # fmt: skip
NORMS = 2 * 2 * 64 + 64  # two RMSNorm weights per layer and the final one: replicated
MATRICES = 256 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # embed, head, layers


def small_config(**overrides):
  c = math_config.get_config("smoke").copy_and_resolve_references()
  c.batch_size, c.max_prompt_len, c.rollout.max_new_tokens = 16, 64, 32
  c.eval.batch_size, c.eval.max_new_tokens = 8, 0
  c.micro_batches = 1
  c.model.update(dtype="float32", param_dtype="float32", base_dtype="bfloat16")
  for k, v in overrides.items():
    target = c
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return c


def small_model():
  return hf.config_from_hf(HF_SMALL)


def test_small_model_counts():
  assert small_model().num_params() == MATRICES + NORMS == 106816


# (mesh, per-device parameter count, rollout rows per device, kv heads per device), by hand:
#   fsdp:8 shards every matrix's embed dimension (64 / 8); norms stay whole.
#   data:2,tensor:4 shards vocab (256/4), heads (4/4) and ffn (128/4) but not the 2 kv heads
#   (2 % 4 != 0: k/v stay whole), nothing over data; rows split over data only.
MESHES = [
  (dict(data=1, fsdp=8, tensor=1), MATRICES // 8 + NORMS, 16 // 8, 2),
  (
    dict(data=2, fsdp=1, tensor=4),
    2 * 256 * 64 // 4 + 2 * (2 * 64 * 64 // 4 + 2 * 64 * 32 + 3 * 64 * 128 // 4) + NORMS,
    16 // 2,
    2,
  ),
  (dict(data=1, fsdp=2, tensor=2), MATRICES // 4 + NORMS, 16 // 2, 1),
]


@pytest.mark.parametrize("mesh,params_dev,rows,kv_dev", MESHES)
def test_hand_computation(mesh, params_dev, rows, kv_dev):
  config = small_config()
  p = plan.plan(config, small_model(), mesh)
  assert p["params"] == params_dev * 4  # float32
  # AdamW: mu and nu like the parameters (float32), plus two int32 step counts (adam, schedule).
  assert p["optimizer"] == 2 * params_dev * 4 + 2 * 4
  assert p["base"] == params_dev * 2  # bfloat16
  assert p["gradients"] == params_dev * 4
  # KV cache: rows x (prompt 64 + 32 new) x 2 layers x (k, v) x kv heads x 16 x float32.
  assert p["kv_cache"] == rows * 96 * 2 * 2 * kv_dev * 16 * 4
  assert p["kv_cache_eval"] == rows // 2 * 96 * 2 * 2 * kv_dev * 16 * 4  # eval batch 8
  heads_dev, ffn_dev, vocab_dev = (1, 32, 64) if mesh["tensor"] == 4 else (4 // mesh["tensor"],
    128 // mesh["tensor"], 256 // mesh["tensor"])  # fmt: skip
  # Update: 6 float32 [u, L, V] buffers: logits, log-softmax, grad; base logits, log-softmax, probs.
  assert p["logits"] == 6 * rows * 32 * vocab_dev * 4
  t = 64 + 32 - 1
  per_token = (4 * 64 + 3 * heads_dev * 16 + 3 * kv_dev * 16 + 4 * ffn_dev) * 4 + heads_dev * t * (
    12 + 4
  )
  assert p["activations"] == 2 * rows * t * per_token
  assert p.phase("resident") == params_dev * (4 + 8 + 2) + 8
  assert p.phase("update") == p["gradients"] + p["logits"] + p["activations"]
  assert p.peak == p.phase("resident") + max(p.phase("rollout"), p.phase("update"))


def test_options_change_the_right_lines():
  mesh = dict(data=1, fsdp=8, tensor=1)
  base = plan.plan(small_config(), small_model(), mesh)
  no_kl = plan.plan(small_config(**{"omniopd.kl_anchor": False}), small_model(), mesh)
  assert no_kl["base"] == 0 and no_kl["logits"] == base["logits"] // 2
  micro = plan.plan(small_config(micro_batches=2), small_model(), mesh)
  assert micro["gradients"] == 2 * base["gradients"]  # the accumulator
  assert micro["logits"] * 2 == base["logits"] and micro["activations"] * 2 == base["activations"]
  bf16 = plan.plan(small_config(**{"model.dtype": "bfloat16"}), small_model(), mesh)
  assert bf16["kv_cache"] * 2 == base["kv_cache"]
  remat = plan.plan(small_config(), small_model(), mesh, remat=True)
  # Layer inputs (2 layers x 2 rows x 95 tokens x 64 x float32) + one of the 2 layers' full set.
  assert remat["activations"] == 2 * 2 * 95 * 64 * 4 + base["activations"] // 2
  # Policies save the layer input plus q (4 heads x 16, unsharded) k, v (2 x 16 each), o (64) and,
  # for "dots", the MLP's gate, up (128 each) and down (64) outputs too.
  for policy, extra in (("full", 0), ("dots_except_mlp", 64 + 32 + 32 + 64),
                        ("dots", 64 + 32 + 32 + 64 + 128 + 128 + 64)):  # fmt: skip
    p = plan.plan(small_config(**{"model.remat": policy}), small_model(), mesh)
    assert p["activations"] == 2 * 2 * 95 * (64 + extra) * 4 + base["activations"] // 2, policy
  sft = plan.plan(small_config(method="sft"), small_model(), mesh)
  assert sft["kv_cache"] == 0 and sft["kv_cache_eval"] == base["kv_cache_eval"]
  group = plan.plan(small_config(**{"omniopd.weight_form": "group"}), small_model(), mesh)
  # 16 x 2 forks x 4 drafts = 128 rows (16 per device), prefix bucket(96) = 96, + chunk 8 slots.
  assert group["kv_cache_drafts"] == 16 * (96 + 8) * 2 * 2 * 2 * 16 * 4


def test_matches_real_sharded_state():
  """The abstract-mesh plan equals the bytes each of 8 real (CPU) devices holds."""
  config, cfg = small_config(), small_model()
  mesh_sizes = dict(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(list(mesh_sizes.items()))
  tx = train_step.make_optimizer(config.optimizer, config.num_steps)

  def init():
    m = model.CausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    return train_step.init_state(nnx.state(m, nnx.Param), tx, 0)

  abstract = jax.eval_shape(init)
  shardings = train_step.state_shardings(abstract, mesh)
  # Zeros placed with the training shardings (no compile needed, unlike a jitted init).
  leaves, treedef = jax.tree.flatten(abstract)
  placed = [
    jax.device_put(np.zeros(x.shape, x.dtype), s)
    for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
  ]
  state = jax.tree.unflatten(treedef, placed)
  device = jax.devices()[0]

  def on_device(tree):
    return sum(
      s.data.nbytes
      for x in jax.tree.leaves(tree)
      for s in x.addressable_shards
      if s.device == device
    )

  p = plan.plan(config, cfg, mesh_sizes)
  assert p["params"] == on_device(state.params)
  assert p["optimizer"] == on_device(state.opt_state)


def test_fits_verdict():
  ok, usable = plan.fits(int(16 * plan.GIB * 0.9), "v5e", 0.1)
  assert ok and usable == int(16 * plan.GIB * 0.9)
  assert not plan.fits(usable + 1, "v5e", 0.1)[0]
  assert plan.fits(80 * plan.GIB, "H100", 0.0)[0] and not plan.fits(80 * plan.GIB + 1, "H100", 0)[0]
  assert plan.fits(plan.plan(small_config(), small_model(), dict(data=1, fsdp=8, tensor=1)).peak,
                   "v5e")[0]  # fmt: skip
  with pytest.raises(ValueError, match="choose from"):
    plan.fits(1, "tpu9000")


def test_paper_scale_needs_micro_batches():
  """Qwen3-1.7B, :pod on one H100: the full update does not fit; micro_batches makes it fit."""
  config = math_config.get_config("pod")
  cfg = plan.model_config(config, preset="qwen3-1.7b")
  one = dict(data=1, fsdp=1, tensor=1)
  p = plan.plan(config, cfg, one)
  assert p["params"] == cfg.num_params() * 4 == 1_720_574_976 * 4
  assert not plan.fits(p.peak, "H100")[0]
  micro = plan.min_micro_batches(config, cfg, one, "H100")
  assert micro is not None and config.batch_size % micro == 0
  fitted = config.copy_and_resolve_references()
  fitted.micro_batches = micro
  assert plan.fits(plan.plan(fitted, cfg, one).peak, "H100")[0]
  smaller = [m for m in range(1, micro) if config.batch_size % m == 0]
  fitted.micro_batches = smaller[-1]
  assert not plan.fits(plan.plan(fitted, cfg, one).peak, "H100")[0]


def test_presets_match_published_sizes():
  counts = {k: hf.config_from_hf(v).num_params() for k, v in plan.PRESETS.items()}
  assert counts["smollm2-135m"] == 134_515_008
  assert counts["llama3.2-1b"] == 1_235_814_400
  assert round(counts["qwen3-0.6b"] / 1e9, 2) == 0.60
  assert round(counts["qwen3-1.7b"] / 1e9, 2) == 1.72
  assert counts["qwen3-4b"] == 4_022_468_096 and counts["qwen3-8b"] == 8_190_735_360
  q = hf.config_from_hf(plan.PRESETS["qwen3-1.7b"])
  assert (q.num_hidden_layers, q.hidden_size, q.num_attention_heads) == (28, 2048, 16)
  assert (q.num_key_value_heads, q.dim_per_head, q.intermediate_size) == (8, 128, 6144)
  assert q.vocab_size == 151936 and q.tie_word_embeddings and q.qk_norm


def test_parse_mesh():
  assert plan.parse_mesh("fsdp:8") == dict(data=1, fsdp=8, tensor=1)
  assert plan.parse_mesh("data:2, fsdp:-1", num_devices=16) == dict(data=2, fsdp=8, tensor=1)
  for bad, match in [("fsdp:-1", "num_devices"), ("pipe:2", "axis:size"), ("fsdp:0", ">= 1")]:
    with pytest.raises(ValueError, match=match):
      plan.parse_mesh(bad)


def test_model_config_sources(tmp_path):
  config = small_config()
  with pytest.raises(ValueError, match="--preset"):
    plan.model_config(config)
  (tmp_path / "config.json").write_text(json.dumps(HF_SMALL))
  assert plan.model_config(config, config_path=str(tmp_path)) == small_model()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    plan.model_config(config, config_path=str(tmp_path / "missing"))


def test_format_plan():
  config = small_config()
  text = plan.format_plan(
    plan.plan(config, small_model(), dict(data=1, fsdp=2, tensor=1)), config, "v5e"
  )
  assert "-> FITS" in text and "peak = resident + max(rollout, update)" in text
  assert "8 rows x 96 slots x 2 layers x 2 x 2 kv heads x 16 x 4 B" in text
  assert "trainable parameters (float32)" in text and "106,816 parameters" in text


def test_cli_with_compile(tmp_path):
  """The CLI end to end (JSON), with XLA's numbers for the compiled update step on CPU."""
  hf_one_layer = dict(HF_SMALL, num_hidden_layers=1)
  (tmp_path / "config.json").write_text(json.dumps(hf_one_layer))
  cmd = [
    sys.executable, "-m", "omniopd_jax.tools.plan", "--config=configs/math.py:smoke",
    "--config.batch_size=16", "--config.max_prompt_len=16", "--config.rollout.max_new_tokens=16",
    "--config.eval.batch_size=8", "--config.omniopd.kl_anchor=false",
    f"--model_config={tmp_path / 'config.json'}", "--mesh=data:1,fsdp:1,tensor:1",
    "--accelerator=v5e", "--json", "--compile",
  ]  # fmt: skip
  # LLVM optimisation level 0 halves the compile time; buffer sizes do not depend on it.
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  data = json.loads(out.stdout)
  n_params = hf.config_from_hf(hf_one_layer).num_params()
  assert data["lines"]["params"] == n_params * 4 and data["lines"]["base"] == 0
  assert data["lines"]["kv_cache"] == 16 * 32 * 1 * 2 * 2 * 16 * 4  # prompt bucket 16 + 16 new
  assert data["fits"] is True
  assert data["peak"] == data["phases"]["resident"] + max(
    data["phases"]["rollout"], data["phases"]["update"]
  )
  # XLA's arguments are exactly the planned resident state, the batch and step + rng (12 bytes).
  compiled = data["compiled"]
  batch = 16 * (32 * 4 + 32 + 16 * 4 + 16 + 2 * (4 + 1 + 4))  # tokens, masks, response, forks
  assert compiled["argument"] == data["phases"]["resident"] + batch + 12
  assert compiled["alias"] > 0  # the state is donated
  assert 0.5 < data["phases"]["update"] / compiled["temp"] < 2.0


def test_tiled_head_and_fused_attention_lines():
  """The update's head line counts vocabulary tiles, not [u, L, V]; fused attention drops T^2."""
  dense = small_config()
  tiled = small_config(**{"model.head": "tiled", "model.attention": "blockwise",
                          "model.head_vocab_tile": 32})  # fmt: skip
  mesh = dict(data=1, fsdp=8, tensor=1)
  p_dense, p_tiled = plan.plan(dense, small_model(), mesh), plan.plan(tiled, small_model(), mesh)
  rows, length, seq = 2, 32, 64 + 32 - 1
  # Student and base: 3 float32 [u, L, T] arrays each, their hidden states, the float32 carry.
  assert p_tiled["logits"] == 3 * 2 * rows * length * 32 * 4 + rows * length * 64 * (2 * 4 + 4)
  scores = 4 * seq * (12 + 4) - 4 * 4  # per token: dense scores minus the fused lse
  assert p_dense["activations"] - p_tiled["activations"] == 2 * rows * seq * scores


def test_paper_scale_goals_of_the_scale_issue():
  """Qwen3-1.7B batch 64 (8192 new tokens) fits a v5e-8 and Qwen3-8B batch 64 fits 8xH100."""
  mesh = dict(data=1, fsdp=8, tensor=1)
  for preset, chip in (("qwen3-1.7b", "v5e"), ("qwen3-8b", "H100")):
    config = math_config.get_config("pod")
    config.batch_size, config.rollout.max_new_tokens = 64, 8192
    cfg = plan.model_config(config, preset=preset)
    assert plan.min_micro_batches(config, cfg, mesh, chip, remat=True) is not None
    config.model.update(head="dense", attention="dense")
    assert plan.min_micro_batches(config, cfg, mesh, chip, remat=True) is None


def test_compiled_tiled_update_needs_less_temporary_memory():
  """XLA's memory analysis of the real update (8 CPU devices, fsdp): the tiled head and blockwise
  attention need a fraction of the dense path's temporaries once the vocabulary dominates."""
  cfg = hf.config_from_hf(dict(HF_SMALL, vocab_size=4096, num_hidden_layers=1))
  mesh = dict(data=1, fsdp=8, tensor=1)
  temps = {}
  for head, attention in (("dense", "dense"), ("tiled", "blockwise")):
    config = small_config(**{"model.head": head, "model.attention": attention,
                             "model.head_vocab_tile": 256})  # fmt: skip
    config.batch_size, config.max_prompt_len, config.rollout.max_new_tokens = 8, 16, 256
    temps[head] = plan.compiled_update_memory(config, cfg, mesh)["temp"]
  assert temps["tiled"] * 3 < temps["dense"], temps
