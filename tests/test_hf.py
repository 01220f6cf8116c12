"""Parity of our Flax model family with transformers' PyTorch models, through the public hf API."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from omniopd_jax.models import hf

LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 500000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}

# (transformers config class, kwargs): every family and option of the foundation issue.
CASES = {
  "llama_default_tied": (
    transformers.LlamaConfig,
    dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
  ),
  "llama3_rope_gqa2": (
    transformers.LlamaConfig,
    dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
  ),
  "llama_linear_rope_bias_mqa": (
    transformers.LlamaConfig,
    dict(
      num_attention_heads=4,
      num_key_value_heads=1,
      attention_bias=True,
      mlp_bias=True,
      rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ),
  ),
  "qwen2_bias_gqa3": (
    transformers.Qwen2Config,
    dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96, tie_word_embeddings=True),
  ),
  "qwen3_qknorm_head_dim": (
    transformers.Qwen3Config,
    dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
  ),
  "qwen3_attention_bias": (
    transformers.Qwen3Config,
    dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, attention_bias=True),
  ),
}


def make_hf_model(case, path, seed=0):
  config_cls, kwargs = CASES[case]
  base = dict(
    vocab_size=101, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
    max_position_embeddings=64,
  )  # fmt: skip
  config = config_cls(**{**base, **kwargs})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  # Random (not default-initialised) norms and biases so every parameter is actually tested.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(path)
  return model


def padded_batch(vocab, seed=0):
  """Left-padded, right-padded and unpadded rows in one batch."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, size=(3, 12))
  mask = np.ones((3, 12), bool)
  mask[0, :5] = False  # left padding
  mask[1, 8:] = False  # right padding
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return ids, mask, positions


def torch_logits(model, ids, mask, positions):
  with torch.no_grad():
    out = model(
      torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(positions),
    )  # fmt: skip
  return out.logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_and_round_trip(case, tmp_path):
  ref_model = make_hf_model(case, tmp_path / "hf")
  ids, mask, positions = padded_batch(ref_model.config.vocab_size)
  ref = torch_logits(ref_model, ids, mask, positions)

  model, _ = hf.load_pretrained(str(tmp_path / "hf"), dtype="float32")
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert np.abs(ours - ref)[mask].max() < 1e-4

  # Padding is exact: each padded row equals the same tokens run alone, unpadded.
  for row in range(2):
    alone = np.asarray(model(jnp.asarray(ids[row : row + 1, mask[row]])))[0]
    np.testing.assert_allclose(alone, ours[row, mask[row]], atol=1e-5)

  # Our save_pretrained output loads in transformers and gives the same logits.
  hf.save_pretrained(model, None, str(tmp_path / "ours"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
  assert type(reloaded) is type(ref_model)
  assert np.abs(torch_logits(reloaded, ids, mask, positions) - ref)[mask].max() < 1e-5


@pytest.mark.parametrize("case", ["llama_default_tied", "qwen3_qknorm_head_dim", "qwen2_bias_gqa3"])
def test_scanned_layers_load_and_save_per_layer_tensors(case, tmp_path):
  """scan_layers=True: model.layers.{i}.* stack into [L, ...] parameters and save back per layer."""
  ref_model = make_hf_model(case, tmp_path / "hf")
  ids, mask, positions = padded_batch(ref_model.config.vocab_size)
  ref = torch_logits(ref_model, ids, mask, positions)
  unrolled = hf.load_model(str(tmp_path / "hf"))
  model = hf.load_model(str(tmp_path / "hf"), scan_layers=True)
  assert model.config.scan_layers
  stacked = model.layers.mlp.down_proj.kernel[...]  # [L, F, E]
  assert stacked.shape[0] == ref_model.config.num_hidden_layers
  for i, layer in enumerate(unrolled.layers):
    np.testing.assert_array_equal(stacked[i], layer.mlp.down_proj.kernel[...])
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert np.abs(ours - ref)[mask].max() < 1e-4

  hf.save_pretrained(model, None, str(tmp_path / "ours"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
  assert np.abs(torch_logits(reloaded, ids, mask, positions) - ref)[mask].max() < 1e-5
  again = hf.load_model(str(tmp_path / "ours"), scan_layers=True)
  np.testing.assert_array_equal(
    np.asarray(again(jnp.asarray(ids), attention_mask=jnp.asarray(mask))), ours
  )


def test_bfloat16_params_and_compute(tmp_path):
  ref_model = make_hf_model("qwen3_qknorm_head_dim", tmp_path / "hf")
  ids, mask, positions = padded_batch(ref_model.config.vocab_size)
  ref = torch_logits(ref_model, ids, mask, positions)
  model, _ = hf.load_pretrained(str(tmp_path / "hf"), dtype="bfloat16")
  assert model.embed_tokens[...].dtype == jnp.bfloat16
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert ours.dtype == np.float32
  assert np.abs(ours - ref)[mask].max() < 0.1  # bf16 rounding, not a bug
  hf.save_pretrained(model, None, str(tmp_path / "ours"), dtype="bfloat16")
  with open(tmp_path / "ours" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"


def test_sharded_index_is_read(tmp_path):
  ref_model = make_hf_model("llama3_rope_gqa2", tmp_path / "src")
  ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  ids, mask, positions = padded_batch(ref_model.config.vocab_size)
  model, _ = hf.load_pretrained(str(tmp_path / "sharded"))
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert np.abs(ours - torch_logits(ref_model, ids, mask, positions))[mask].max() < 1e-4


@pytest.mark.parametrize(
  "field,value",
  [
    ("model_type", "gpt2"),
    ("rope_parameters.rope_type", "yarn"),
    ("hidden_act", "gelu"),
    ("use_sliding_window", True),
  ],
)
def test_unsupported_config_names_the_field(field, value, tmp_path):
  make_hf_model("qwen2_bias_gqa3", tmp_path)
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  if field == "rope_parameters.rope_type":
    config["rope_parameters"] = {"rope_type": value, "rope_theta": 1e4, "factor": 2.0}
  else:
    config[field] = value
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(hf.UnsupportedConfigError, match=field.replace(".", r"\.")):
    hf.load_pretrained(str(tmp_path))


def test_missing_weights_say_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_pretrained(str(tmp_path))
  make_hf_model("qwen2_bias_gqa3", tmp_path)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="import_gguf"):
    hf.load_pretrained(str(tmp_path))


def test_smollm2_chat_prompts_match_transformers(smollm2_dir):
  model, tokenizer = hf.load_pretrained(smollm2_dir)
  assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
  chats = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}],
  ]
  texts = [
    tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
  ]
  tokenizer.padding_side = "left"
  enc = tokenizer(texts, return_tensors="np", padding=True)
  ids, mask = enc["input_ids"], enc["attention_mask"].astype(bool)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
  ref = torch_logits(ref_model, ids, mask, positions)
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert np.abs(ours - ref)[mask].max() < 5e-4  # |logits| up to ~40: fp32 summation order
  assert np.abs(ours - ref)[:, -1].max() < 1e-4  # the next-token distribution itself
  assert (ours[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).all()


def test_saved_directory_is_complete_and_readable(tmp_path):
  """generation_config.json, 0644 files and a real model_max_length: what transformers' pipeline
  and vLLM read from an exported directory."""
  from omniopd_jax.data import tasks

  tokenizer = tasks.make_char_tokenizer()
  assert tokenizer.model_max_length > 1e29  # transformers' "no limit" placeholder
  config = transformers.LlamaConfig(
    vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96,
  )  # fmt: skip
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
  model, _ = hf.load_pretrained(str(tmp_path / "src"))
  old_umask = os.umask(0o022)
  try:
    out = hf.save_pretrained(
      model,
      tokenizer,
      str(tmp_path / "out"),
      generation_config={"do_sample": True, "temperature": 0.7, "top_k": 5},
    )
  finally:
    os.umask(old_umask)
  names = sorted(os.listdir(out))
  assert {"config.json", "generation_config.json", "model.safetensors"} <= set(names)
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(names)
  for name in names:
    assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o644, name
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert json.load(f)["model_max_length"] == 96
  assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == 96
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
  assert generation.pad_token_id == 0
  assert (generation.do_sample, generation.temperature, generation.top_k) == (True, 0.7, 5)
  # transformers' pipeline reads the whole directory and generates with it.
  pipe = transformers.pipeline("text-generation", model=out, device="cpu")
  text = pipe("1 + 2 =", max_new_tokens=4, do_sample=False)[0]["generated_text"]
  assert text.startswith("1 + 2 =")


def test_eos_token_ids_from_tokenizer_config_and_generation_config(tmp_path):
  class Tok:
    eos_token_id = 2

  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
  assert hf.eos_token_ids(Tok(), str(tmp_path)) == (2, 7, 9)
  assert hf.eos_token_ids(Tok(), str(tmp_path), hf_config={"eos_token_id": None}) == (2, 9)
  assert hf.eos_token_ids(Tok()) == (2,)
